"""Training-step throughput and memory: cached reference scores vs a live reference model.

    python bench/train_throughput.py [--pairs 256] [--steps 20] [--batch-size 8] [--max-length 256]
                                     [--threads 1] [--preset small]

Both sides run the loop of dpo.train_loop on one worker: the same batches
(dpo.batching, one row per pair), the same AdamW step, the same loss. They differ in where
the reference log-probs come from:

- cached (ours): read from the reference dataset, a column next to the token ids;
- live (TRL without precompute_ref_log_probs): a frozen copy of the policy
  scores every batch with an extra forward pass.

Throughput: both sides in one process, their steps interleaved on the same
batches, so other load on the machine slows both alike. Memory: each side
alone in a fresh process, so its peak RSS is its own. "Training memory"
is the peak RSS minus the RSS before any model was loaded, the peak counted
from then on (Python, torch and
the data are the same on both sides). The model is pipeline.models' "small"
preset (~19M parameters) with its tokenizer trained on the HH file itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from hh import HH, hh_texts, load_pairs

from dpo.config import DataConfig


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    # "5" resets VmHWM to the current RSS (Linux): the peak of tokenizing the data must not count.
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
        fh.write("5")


def hh_pairs(args, model_dir):
    """`args.pairs` HH pairs as training reads them (dpo.batching.Pairs), cut to `args.max_length`."""
    import pyarrow as pa

    from dpo.batching import Pairs
    from pipeline.tokenize import load_tokenizer

    raw = load_pairs(args.pairs, load_tokenizer(model_dir),
                     DataConfig(max_length=args.max_length, max_prompt_length=args.max_length // 2))
    rng = np.random.default_rng(0)
    return Pairs.from_tables([pa.table({
        "pair_id": [f"{i:06d}" for i in range(len(raw))],
        "prompt_ids": [p for p, _, _ in raw], "chosen_ids": [c for _, c, _ in raw],
        "rejected_ids": [r for _, _, r in raw],
        # stand-ins for cached scores: the cost of reading them is what is measured
        "ref_chosen_logp": rng.normal(-100, 10, len(raw)), "ref_rejected_logp": rng.normal(-100, 10, len(raw)),
    })])


def setup(args, model_dir):
    import torch

    from dpo.batching import epoch_plan

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs = hh_pairs(args, model_dir)
    return pairs, epoch_plan(pairs.tokens_per_pair, args.batch_size, 8, seed=0, epoch=0)


class Side:
    """One worker's training state; `live` adds a frozen reference that scores every batch."""

    def __init__(self, model_dir: str, live: bool):
        import torch
        from transformers import AutoModelForCausalLM

        from dpo.forward import PolicyLogps

        self.policy = PolicyLogps(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), 1024).train()
        self.reference = None
        if live:
            self.reference = PolicyLogps(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                         1024).eval()
            self.reference.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=1e-5)

    def step(self, mb) -> float:
        import torch

        from dpo.forward import sequence_logps
        from dpo.losses import preference_loss

        t0 = time.perf_counter()
        chosen, rejected = sequence_logps(self.policy, mb.inputs, average=False)
        if self.reference is None:
            ref_c, ref_r = mb.ref_chosen, mb.ref_rejected
        else:
            with torch.no_grad():
                ref_c, ref_r = sequence_logps(self.reference, mb.inputs, average=False)
        preference_loss(chosen, rejected, ref_c, ref_r, loss_type="sigmoid", beta=0.1).losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def child(args) -> None:
    """Peak memory of one side alone, in a fresh process; prints one JSON line."""
    from dpo.batching import collate

    pairs, plan = setup(args, args.model)
    gc.collect()
    reset_peak()
    base = status_mib("VmRSS")
    side = Side(args.model, live=args.child == "live")
    for i in range(3):
        side.step(collate(pairs, plan[i % len(plan)], 0, "shared_prompt"))
    peak = status_mib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak, "train_mib": peak - base}))


def speed(args, model_dir) -> dict:
    """Both sides in one process, steps interleaved, so load from elsewhere hits both alike."""
    from dpo.batching import collate

    pairs, plan = setup(args, model_dir)
    sides = {"cached": Side(model_dir, live=False), "live": Side(model_dir, live=True)}
    times = {k: [] for k in sides}
    tokens = 0
    for i in range(args.warmup + args.steps):
        mb = collate(pairs, plan[i % len(plan)], 0, "shared_prompt")
        for name, side in sides.items():
            elapsed = side.step(mb)
            if i >= args.warmup:
                times[name].append(elapsed)
        tokens += mb.tokens if i >= args.warmup else 0
    return {k: {"steps_per_s": len(v) / sum(v), "tokens_per_s": tokens / sum(v)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker with 1 CPU has 1)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["cached", "live"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not HH.exists():
        sys.exit(f"{HH} is absent: this benchmark reads Anthropic HH pairs from ../shared/data")
    from pipeline.models import build_local_model

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        model = build_local_model(os.path.join(tmp, "model"), hh_texts(HH, limit=2000), preset=args.preset, seed=0)
        results = speed(args, model)
        for mode in ("cached", "live"):
            cmd = [sys.executable, __file__, "--child", mode, "--model", model] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode].update(json.loads(out.strip().splitlines()[-1]))
    c, v = results["cached"], results["live"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {args.threads}, preset {args.preset}, batch {args.batch_size} pairs, "
          f"max_length {args.max_length}, {args.steps} steps")
    print(f"{'':22}{'cached (ours)':>15}{'live reference':>16}{'ratio':>8}")
    print(f"{'steps/s':22}{c['steps_per_s']:15.3f}{v['steps_per_s']:16.3f}{c['steps_per_s'] / v['steps_per_s']:7.2f}x")
    print(f"{'tokens/s':22}{c['tokens_per_s']:15.0f}{v['tokens_per_s']:16.0f}{c['tokens_per_s'] / v['tokens_per_s']:7.2f}x")
    print(f"{'peak RSS (MiB)':22}{c['peak_rss_mib']:15.0f}{v['peak_rss_mib']:16.0f}"
          f"{c['peak_rss_mib'] / v['peak_rss_mib']:7.2f}x")
    print(f"{'training memory (MiB)':22}{c['train_mib']:15.0f}{v['train_mib']:16.0f}"
          f"{c['train_mib'] / v['train_mib']:7.2f}x")


if __name__ == "__main__":
    main()
