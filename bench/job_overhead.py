"""The fixed cost of a small pipeline job, part by part, with Ray Train's controller polling every 2 s
(Ray's default) against every 0.5 s (what our jobs set, dpo.launch.ray_env_vars).

    python bench/job_overhead.py [--steps 8] [--repeats 2]

Each side runs in a fresh process of its own, one after the other (the poll interval must be set before
Ray starts): Python's imports, ray.init, the train and eval reference stages (48 and 16 pairs of
examples/data, the tiny model, the hf backend), then `--repeats` fits of `--steps` steps on two CPU workers
with a checkpoint every 3 steps and policy/ written. A fit is cut at two points that the run itself
records: when the workers are ready (train/attempts.jsonl: the model loaded and restored) and when
policy/ is written (its config.json's time). Before the first is Ray Train's controller and worker group
and our setup; between them the steps; after the second, the fit's end. Reported: each part's seconds, and
the ratio of the 0.5 s side to the 2 s side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "data")
INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def head(src: str, dst: str, n: int) -> str:
    with open(src, encoding="utf-8") as fh, open(dst, "w", encoding="utf-8") as out:
        out.writelines(line for _, line in zip(range(n), fh))
    return dst


def one_side(work: str, steps: int, repeats: int) -> dict:
    """Runs in the child: the parts' seconds of one side."""
    started = time.time()
    import ray

    from dpo.config import load_config
    from dpo.launch import ray_env_vars, train
    from pipeline.prepare import find_datasets
    from pipeline.models import build_local_model, iter_texts
    from pipeline.precompute import precompute_splits

    parts = {"imports": time.time() - started}
    model = build_local_model(os.path.join(work, "tiny"), iter_texts([os.path.join(EXAMPLES, "train.jsonl")]),
                              preset="tiny", seed=0)
    files = [head(os.path.join(EXAMPLES, "train.jsonl"), os.path.join(work, "train.jsonl"), 48),
             head(os.path.join(EXAMPLES, "eval.jsonl"), os.path.join(work, "eval.jsonl"), 16)]
    at = time.time()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": ray_env_vars()})
    parts["ray.init"] = time.time() - at
    common = [f"model.policy={model}", f"data.train_files=[{files[0]}]", f"data.eval_files=[{files[1]}]",
              "data.max_length=64", "data.max_prompt_length=48", f"run.output_dir={work}/scored"]
    at = time.time()
    precompute_splits(load_config(None, common), ["train", "eval"])
    parts["reference stage (train and eval, one pool)"] = time.time() - at
    fits = []
    for i in range(repeats):
        out = os.path.join(work, f"fit{i}")
        for name in ("reference", "reference_eval"):
            shutil.copytree(os.path.join(work, "scored", name), os.path.join(out, name))
        cfg = load_config(None, common + [f"run.output_dir={out}", f"train.max_steps={steps}", "train.epochs=4",
                                          "train.num_workers=2", "train.batch_size=4", "train.checkpoint_every=3",
                                          "train.eval_every=4", "train.log_every=1", "train.cpus_per_worker=1"])
        at = time.time()
        train(cfg, *find_datasets(cfg))
        end = time.time()
        with open(os.path.join(out, "train", "attempts.jsonl"), encoding="utf-8") as fh:
            ready = json.loads(fh.readline())["started"]
        written = os.path.getmtime(os.path.join(out, "train", "policy", "config.json"))
        fits.append({"fit: start to workers ready": ready - at, "fit: steps and policy/": written - ready,
                     "fit: policy/ to the fit's end": end - written, "fit: in all": end - at})
    for key in fits[0]:
        parts[key] = sum(f[key] for f in fits) / len(fits)
    ray.shutdown()
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        with tempfile.TemporaryDirectory(prefix="job-overhead-") as work:
            print(json.dumps(one_side(work, args.steps, args.repeats)))
        return
    sides = {}
    for interval in ("2", "0.5"):
        env = {**os.environ, INTERVAL: interval, "PYTHONPATH": ROOT}
        out = subprocess.run([sys.executable, __file__, "--side", interval, "--steps", str(args.steps),
                              "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        sides[interval] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'part (seconds)':34s} {'poll 2 s':>9s} {'poll 0.5 s':>11s} {'ratio':>6s}")
    for key in sides["2"]:
        slow, fast = sides["2"][key], sides["0.5"][key]
        print(f"{key:34s} {slow:9.1f} {fast:11.1f} {fast / slow:6.2f}")


if __name__ == "__main__":
    main()
