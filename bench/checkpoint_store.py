"""What a checkpoint costs on an object store against local disk: save and load, side by side.

    python bench/checkpoint_store.py [--preset medium] [--repeats 3]

One process, no process group (DCP then writes one rank's files), a Llama of the preset with its AdamW state
made by one step: the checkpoint a worker writes. Each repeat saves and loads it through the calls a worker
makes (dpo.checkpoint: the step's folder, the DCP shards, the small states, COMPLETE; then `restore` of the
newest complete one into a fresh model and optimizer), once into a local temporary folder and once into
s3://bench/run on moto's S3 server on loopback (a process of its own, found through the AWS variables, as a
job finds MinIO or S3), the two sides alternating so that whatever else loads the machine loads both. The
loaded weights are checked equal to the saved ones on both sides.

moto keeps objects in memory and serves them from one Python process: the ratio is what S3's protocol
costs through the same clients (pyarrow for the states, s3fs under DCP for the shards) over loopback, not
the throughput of a real store, which the network in between decides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from dpo import checkpoint as ckpt  # noqa: E402
from dpo import storage  # noqa: E402
from pipeline.models import PRESETS, llama_config  # noqa: E402
from conftest import moto_s3  # noqa: E402  the tests' S3 server on loopback, and the AWS variables set for it

MIB = 2**20


def train_state(preset: str, seed: int) -> ckpt.TrainState:
    """A policy of the preset with AdamW's two moments made by one step, as a worker holds it after a step."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**PRESETS[preset]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ids = torch.randint(0, PRESETS[preset]["vocab_size"], (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    return ckpt.TrainState(model=model, optimizer=optimizer, scheduler=scheduler, step=1)


def save(state: ckpt.TrainState, train_dir: str) -> float:
    """dpo.checkpoint.save's writes, without its report to Ray Train: seconds."""
    start = time.perf_counter()
    root = storage.join(train_dir, "checkpoints")
    dest = ckpt.begin(root, state.step)
    ckpt.write_shards(dest, ckpt._tensors(state))
    ckpt.write_states(dest, scheduler_state=state.scheduler.state_dict(), step=state.step, epoch=0,
                      skipped_batches=0, total_steps=10)
    ckpt.finish(root, state.step, keep=1)
    return time.perf_counter() - start


def load(preset: str, train_dir: str, saved: ckpt.TrainState) -> float:
    """dpo.checkpoint.restore into a fresh policy and optimizer of another seed: seconds; the weights and
    moments read must be those saved."""
    fresh = train_state(preset, seed=1)
    start = time.perf_counter()
    ckpt.restore(fresh, train_dir, lora=False)
    seconds = time.perf_counter() - start
    want, got = saved.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want), "the loaded weights differ from the saved ones"
    moments = [(saved.optimizer.state[p]["exp_avg_sq"], fresh.optimizer.state[q]["exp_avg_sq"])
               for p, q in zip(saved.model.parameters(), fresh.model.parameters())]
    assert all(torch.equal(a, b) for a, b in moments), "the loaded AdamW state differs from the saved one"
    return seconds


def folder_bytes(train_dir: str) -> int:
    fs, path = storage.resolve(storage.join(train_dir, "checkpoints"))
    import pyarrow.fs as pafs

    return sum(i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if i.type == pafs.FileType.File)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import boto3

    with moto_s3():
        boto3.client("s3").create_bucket(Bucket="bench")
        state = train_state(args.preset, seed=0)
        parameters = sum(p.numel() for p in state.model.parameters())
        times = {side: {"save": [], "load": []} for side in ("local", "store")}
        sizes = {}
        with tempfile.TemporaryDirectory() as tmp:
            dirs = {"local": os.path.join(tmp, "run"), "store": "s3://bench/run"}
            for repeat in range(args.repeats):
                for side in ("local", "store") if repeat % 2 == 0 else ("store", "local"):
                    times[side]["save"].append(save(state, dirs[side]))
                    sizes[side] = folder_bytes(dirs[side])
                    times[side]["load"].append(load(args.preset, dirs[side], state))
                    print(side, repeat, {k: round(v[-1], 2) for k, v in times[side].items()}, flush=True)
        median = {side: {op: statistics.median(v) for op, v in ops.items()} for side, ops in times.items()}
        print(json.dumps({"preset": args.preset, "parameters": parameters,
                          # DCP's .metadata names the checkpoint's path: a few bytes apart
                          "checkpoint_mib": {side: round(n / MIB, 1) for side, n in sizes.items()},
                          "repeats": args.repeats,
                          "median_s": {s: {k: round(v, 2) for k, v in m.items()} for s, m in median.items()},
                          "store_over_local": {op: round(median["store"][op] / median["local"][op], 2)
                                               for op in ("save", "load")},
                          "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()},
                         indent=1))


if __name__ == "__main__":
    main()
