"""The GPU checks of the vLLM reference path and bf16 training, in as few device calls as possible.

    bash bench/gpu_check.sh [--phases model,score,jobs] [--out DIR] [--work DIR] [--data HH.jsonl.gz] [--cpu]

(gpu_check.sh installs the carried vLLM wheels and sets the environment, then
runs this file.) Phases, each reusing what an earlier call left in --work:

- model: pipeline.models' "gpu" preset (~350M-parameter Llama) with a
  tokenizer trained on the HH file, then 200 steps of causal-LM warm-up on
  the HH transcripts (32 rows of 512 tokens a step). A random init predicts every token at about -ln V, where bf16
  and fp32 hardly differ; a warmed-up model has peaked distributions like a
  real one, so the measured differences mean something.
- score: bench/gpu_score.py for bfloat16 and float32, one process each:
  vLLM vs transformers token by token, and their throughput and MFU.
- jobs: the real entry points, as a user runs them: precompute_reference
  with reference.backend=vllm in bfloat16 and float32, verify_reference of
  each against transformers on the same GPU, and 1-worker bf16 training from
  the bf16 vLLM-scored dataset (first-step loss against ln 2, tokens/s, MFU),
  then short runs of the same with train.strategy=fsdp, and with
  flex_attention and train.layout=shared_prompt (the prompt once per pair).

Everything lands in --out: gpu_check.json (all numbers so far, also those of
earlier calls), gpu_check.md (the tables for docs/benchmarks.md) and
gpu_check.log (every command's output in this call).
--cpu runs the same plumbing with the tiny preset, transformers only, on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def log_line(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "gpu_check.log", "a", encoding="utf-8") as fh:
        fh.write(text + "\n")


def run(cmd: list[str], out: Path) -> None:
    """Run one command, its output appended to gpu_check.log and echoed; a failure stops the check."""
    log_line(out, f"$ {' '.join(cmd)}")
    started = time.time()
    with open(out / "gpu_check.log", "a", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            fh.write(line)
    if proc.wait() != 0:
        raise SystemExit(f"failed ({proc.returncode}) after {time.time() - started:.0f} s: {' '.join(cmd)}")
    log_line(out, f"# {time.time() - started:.0f} s")


# --------------------------------------------------------------------------- model


def warm_up(base: str, dest: Path, texts: list[str], steps: int, seq_len: int, rows: int, device: str) -> dict:
    """Causal-LM training on the concatenated transcripts; the result saved (float32) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.tokenize import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(base)
    stream = [i for t in texts[::2] for i in tok(t)["input_ids"] + [tok.eos_token_id]]  # the chosen transcripts
    data = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    losses, started = [], time.time()
    for step in range(steps):
        idx = torch.arange(step * rows, (step + 1) * rows) % len(data)
        batch = data[idx].to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.save_pretrained(str(dest), safe_serialization=True)
    tok.save_pretrained(str(dest))
    return {"steps": steps, "rows": rows, "seq_len": seq_len, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "seconds": round(time.time() - started, 1)}


def phase_model(args, out: Path) -> dict:
    from pipeline.models import build_local_model

    work = Path(args.work)
    dest = work / "model"
    spec = {"preset": args.preset, "warmup_steps": args.warmup_steps, "data": os.path.basename(args.data)}
    done = dest / "warmup.json"
    if done.exists() and json.loads(done.read_text()).get("spec") == spec:
        log_line(out, f"model: reusing {dest}")
        return json.loads(done.read_text())
    from hh import hh_texts

    texts = hh_texts(Path(args.data))
    base = build_local_model(work / "base", texts, preset=args.preset, seed=0)
    info = {"spec": spec, **warm_up(base, dest, texts, args.warmup_steps, args.max_length, 4 if args.cpu else 32,
                                    "cpu" if args.cpu else "cuda")}
    done.write_text(json.dumps(info, indent=1))
    log_line(out, f"model: {dest} {json.dumps(info)}")
    return info


# --------------------------------------------------------------------------- score


def phase_score(args, out: Path) -> dict:
    results = {}
    for dtype in args.dtypes:
        dest = Path(args.work) / f"score-{dtype}.json"
        run([sys.executable, str(HERE / "gpu_score.py"), "--model", str(Path(args.work) / "model"),
             "--data", args.data, "--dtype", dtype, "--backends", args.backends, "--json", str(dest),
             "--rounds", str(args.rounds), "--max-length", str(args.max_length),
             "--max-prompt-length", str(args.max_length // 2)], out)
        results[dtype] = json.loads(dest.read_text())
    return results


# --------------------------------------------------------------------------- jobs


def job_config(args) -> Path:
    import yaml

    work = Path(args.work)
    cfg = {
        "run": {"name": "gpu_check", "output_dir": str(work / "runs"), "seed": 0},
        "data": {"train_files": [os.path.abspath(args.data)], "max_length": args.max_length,
                 "max_prompt_length": args.max_length // 2},
        "model": {"policy": str(work / "model"), "dtype": "bfloat16"},
        "reference": {"backend": "hf" if args.cpu else "vllm", "num_actors": 1,
                      "gpus_per_actor": 0 if args.cpu else 1, "batch_tokens": 32768, "pairs_per_call": 1024},
        "train": {"num_workers": 1, "use_gpu": not args.cpu, "cpus_per_worker": 1 if args.cpu else 4,
                  "loss_type": "sigmoid", "beta": 0.1, "learning_rate": 1.0e-6, "lr_scheduler": "constant",
                  "batch_size": 8, "epochs": 2, "max_steps": args.train_steps, "log_every": 1,
                  "checkpoint_every": 100000, "save_policy": False},
    }
    path = work / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_summary(metrics_path: Path, params: int, peak: float | None) -> dict:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steady = [r["tokens_per_second"] for r in rows[10:]] or [r["tokens_per_second"] for r in rows]
    rate = sorted(steady)[len(steady) // 2]  # the median step: the first ones compile and allocate
    return {"steps": rows[-1]["step"], "first_loss": rows[0]["loss"], "ln2": math.log(2),
            "first_margin": rows[0]["rewards/margins"], "last_loss": rows[-1]["loss"],
            "last_accuracy": rows[-1]["rewards/accuracies"], "median_tokens_per_s": rate,
            # forward + backward: 6 FLOPs per parameter and token
            "mfu": round(6 * params * rate / peak, 4) if peak else None}


def phase_jobs(args, out: Path) -> dict:
    from gpu_score import count_params, peak_flops

    from jobs.verify_reference import TOLERANCE

    config = job_config(args)
    results = {}
    for dtype in args.dtypes:
        run_dir = Path(args.work) / "runs" / f"{'hf' if args.cpu else 'vllm'}-{dtype}"
        common = [f"model.dtype={dtype}", f"run.output_dir={run_dir}"]
        run([sys.executable, "-m", "jobs.precompute_reference", "--config", str(config), *common], out)
        manifest = json.loads((run_dir / "reference" / "_manifest.json").read_text())
        verify = Path(args.work) / f"verify-{dtype}.json"
        run([sys.executable, "-m", "jobs.verify_reference", "--config", str(config), *common,
             "--sample", str(args.verify_sample), "--json", str(verify), "--tolerance", "1e9"], out)
        pairs = json.loads(verify.read_text())["pairs"]
        per_token = sorted(d["per_token"] for d in pairs)
        results[dtype] = {
            "precompute": {"backend": manifest.get("backend"), "counts": manifest.get("counts"),
                           "timings": manifest.get("timings")},
            "verify": {"pairs": len(pairs), "per_token_mean": sum(per_token) / len(per_token),
                       "per_token_p99": per_token[int(0.99 * (len(per_token) - 1))], "per_token_max": per_token[-1],
                       "per_pair_max": max(d["abs_diff"] for d in pairs),
                       "default_tolerance": TOLERANCE[dtype], "within_default": per_token[-1] <= TOLERANCE[dtype]},
        }
        if dtype == args.train_dtype:
            params = count_params(str(Path(args.work) / "model"))
            run([sys.executable, "-m", "jobs.train", "--config", str(config), *common], out)
            results[dtype]["train"] = train_summary(run_dir / "train" / "metrics.jsonl", params, peak_flops(dtype))
            variants = {
                # The sharded path on CUDA (NCCL mesh, meta-device start), briefly: one worker, same first step.
                "train_fsdp": ["train.strategy=fsdp", f"train.max_steps={args.fsdp_steps}"],
                # The prompt once per pair under FlexAttention's block mask (no backward on CPU): against the
                # padded sdpa run above, it decides whether train.layout=auto should share the prompt on GPU.
                "train_flex_shared": ["model.attn_implementation=flex_attention", "train.layout=shared_prompt",
                                      f"train.max_steps={args.fsdp_steps}"],
            }
            for key, overrides in variants.items():
                if args.cpu and key == "train_flex_shared":
                    continue
                variant_dir = run_dir.with_name(f"{run_dir.name}-{key}")
                shutil.rmtree(variant_dir, ignore_errors=True)
                shutil.copytree(run_dir / "reference", variant_dir / "reference")
                run([sys.executable, "-m", "jobs.train", "--config", str(config), f"model.dtype={dtype}",
                     f"run.output_dir={variant_dir}", *overrides], out)
                results[dtype][key] = train_summary(variant_dir / "train" / "metrics.jsonl", params, peak_flops(dtype))
    return results


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [f"# GPU check {report['date']} on {report['device']}", ""]
    for dtype, r in report.get("score", {}).items():
        lines += [f"## Scoring, {dtype}: {r['parameters'] / 1e6:.0f}M parameters, {r['sequences']} sequences, "
                  f"{r['tokens_per_pass']} tokens a pass, {r['rounds']} passes, batch_tokens {r['batch_tokens']}", "",
                  "| backend | tokens/s | MFU | mean / p99 / max per-token diff | max per-sequence diff |",
                  "|---|---:|---:|---|---:|"]
        for name, b in r["backends"].items():
            a = b["agreement_with_oracle"]
            tok = a.get("per_token")
            tok_text = f"{tok['mean']:.2g} / {tok['p99']:.2g} / {tok['max']:.2g}" if tok else "-"
            mfu = f"{b['mfu']:.1%}" if b["mfu"] is not None else "-"
            lines.append(f"| {name} | {b['tokens_per_s']:,} | {mfu} | {tok_text} | {a['per_sequence_sum']['max']:.3g} |")
        if "vllm_over_hf" in r:
            lines.append(f"\nvLLM / hf throughput: **{r['vllm_over_hf']}x**")
        lines.append("")
    for dtype, r in report.get("jobs", {}).items():
        v = r["verify"]
        lines += [f"## Jobs, {dtype}", "",
                  f"- precompute_reference ({r['precompute']['backend']}): counts {json.dumps(r['precompute']['counts'])}, "
                  f"timings {json.dumps(r['precompute']['timings'])}",
                  f"- verify_reference against hf, {v['pairs']} pairs: per-token |diff| mean {v['per_token_mean']:.3g}, "
                  f"p99 {v['per_token_p99']:.3g}, max {v['per_token_max']:.3g}; max per pair {v['per_pair_max']:.3g}; "
                  f"{'within' if v['within_default'] else 'OUTSIDE'} the default tolerance {v['default_tolerance']:g}"]
        for key, name in (("train", "train"), ("train_fsdp", "train with train.strategy=fsdp"),
                          ("train_flex_shared", "train with flex_attention and train.layout=shared_prompt")):
            if key not in r:
                continue
            t = r[key]
            mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "-"
            lines.append(f"- {name}, 1 worker, {t['steps']} steps: first-step loss {t['first_loss']:.5f} "
                         f"(ln 2 = {t['ln2']:.5f}), margin {t['first_margin']:.3g}; last loss {t['last_loss']:.4f}; "
                         f"median {t['median_tokens_per_s']:,.0f} tokens/s, MFU {mfu}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="model,score,jobs")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--work", default="/tmp/gpu_check")
    ap.add_argument("--data", default=str(ROOT / ".hh" / "harmless-base-test.jsonl.gz"))
    ap.add_argument("--dtypes", default="bfloat16,float32", help="of score and jobs; training runs in the first")
    ap.add_argument("--cpu", action="store_true", help="the plumbing on CPU: tiny preset, transformers only, "
                                                       "float32")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.data):
        sys.exit(f"{args.data} is absent: copy ../shared/data/hh-rlhf/ into .hh/ (git-ignored) and carry it, "
                 "or pass --data")
    args.preset = "tiny" if args.cpu else "gpu"
    args.max_length = 256 if args.cpu else 512  # within the preset's positions
    args.warmup_steps = 20 if args.cpu else 200
    args.backends = "hf" if args.cpu else "vllm,hf"
    args.dtypes = ["float32"] if args.cpu else args.dtypes.split(",")
    args.train_dtype = "float32" if args.cpu else "bfloat16"
    args.train_steps = 5 if args.cpu else 300
    args.fsdp_steps = 3 if args.cpu else 30
    args.rounds = 1 if args.cpu else 3
    args.verify_sample = 32 if args.cpu else 512
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)

    import torch

    # The report grows in --work, which outlives a device call on a warm machine ($OUT does not).
    report_path = Path(args.work) / "gpu_check.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    phases = {"model": phase_model, "score": phase_score, "jobs": phase_jobs}
    for name in args.phases.split(","):
        found = phases[name](args, out)
        # score and jobs are keyed by dtype: a call for one dtype keeps an earlier call's other
        report[name] = {**report.get(name, {}), **found} if name != "model" else found
        report_path.write_text(json.dumps(report, indent=1))
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
