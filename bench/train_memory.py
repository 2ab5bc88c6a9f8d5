"""Training-step time and memory: gradient checkpointing on and off, LoRA against full fine-tuning.

    python bench/train_memory.py [--presets small,medium] [--pairs 64] [--steps 6] [--batch-size 4]
                                 [--max-length 512] [--threads 2] [--sides full,checkpointing,lora,lora+checkpointing]

Sides, on the same model, the same HH pairs and the same batches, each built by dpo.sharding.load_policy
as a training worker builds it (one row per pair, logits at response positions only: the CPU default):

- full:               full fine-tuning, every activation kept for the backward;
- checkpointing:      train.gradient_checkpointing=true, each decoder layer recomputed in the backward;
- lora:               model.lora.enabled=true (r 16, alpha 32, dropout 0.05, all seven projections);
- lora+checkpointing: both.

Time: every side in one process with its own model and AdamW, their steps interleaved on the same batches, so
that other load on the machine slows all alike. Memory: each side alone in a fresh process, from its peak RSS
over three steps after a first one:

- step MiB:     above the RSS after the first step, when weights, gradients (kept allocated) and AdamW's
                state exist: what the step's activations and logits take;
- training MiB: above the RSS before the model was loaded: weights, gradients, AdamW and activations.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

from forward_paths import batches, reset_peak, side_alone
from hh import HH, hh_texts
from train_throughput import status_mib

SIDES = {"full": [], "checkpointing": ["train.gradient_checkpointing=true"], "lora": ["model.lora.enabled=true"],
         "lora+checkpointing": ["model.lora.enabled=true", "train.gradient_checkpointing=true"]}


class Side:
    def __init__(self, model_dir: str, name: str):
        import torch

        from dpo.config import load_config
        from dpo.sharding import load_policy

        cfg = load_config(None, [f"model.policy={model_dir}", *SIDES[name]])
        self.policy = load_policy(cfg, torch.device("cpu"), rank=0).train()
        trained = [p for p in self.policy.parameters() if p.requires_grad]
        self.trained_parameters = sum(p.numel() for p in trained)
        self.optimizer = torch.optim.AdamW(trained, lr=1e-5)

    def step(self, pairs, rows) -> float:
        import torch

        from dpo.batching import collate
        from dpo.forward import sequence_logps
        from dpo.losses import preference_loss

        t0 = time.perf_counter()
        mb = collate(pairs, rows, 0, "shared_prompt")
        chosen, rejected = sequence_logps(self.policy, mb.inputs, average=False)
        preference_loss(chosen, rejected, mb.ref_chosen, mb.ref_rejected, loss_type="sigmoid",
                        beta=0.1).losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: not part of the step's peak
        return time.perf_counter() - t0


def child(args) -> None:
    """Memory of one side alone, in a fresh process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    pairs, plan = batches(args, args.model)
    gc.collect()
    before_model = status_mib("VmRSS")
    side = Side(args.model, args.child)
    side.step(pairs, plan[0])
    gc.collect()
    reset_peak()
    after_first = status_mib("VmRSS")
    for i in range(1, 4):
        side.step(pairs, plan[i % len(plan)])
    peak = status_mib("VmHWM")
    print(json.dumps({"step_mib": peak - after_first, "train_mib": peak - before_model,
                      "trained_parameters": side.trained_parameters}))


def speed(args, model_dir) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    pairs, plan = batches(args, model_dir)
    sides = {name: Side(model_dir, name) for name in args.sides.split(",")}
    seconds = {name: 0.0 for name in sides}
    for i in range(1 + args.steps):  # step 0 warms up
        rows = plan[i % len(plan)]
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            elapsed = sides[name].step(pairs, rows)
            seconds[name] += elapsed if i else 0.0
    return {name: {"step_s": s / args.steps} for name, s in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,medium")
    ap.add_argument("--pairs", type=int, default=64, help="HH pairs the training batches are cut from")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per side (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per training step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated: " + ", ".join(SIDES))
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not HH.exists():
        sys.exit(f"{HH} is absent: this benchmark reads Anthropic HH pairs from ../shared/data")
    from pipeline.models import build_local_model

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {args.threads}, HH pairs, max_length {args.max_length}, batch {args.batch_size} pairs x "
          f"{args.steps} steps, shared_prompt layout, response-only logits")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for preset in args.presets.split(","):
            model = build_local_model(os.path.join(tmp, preset), hh_texts(HH, limit=2000), preset=preset, seed=0)
            results = speed(args, model)
            for name in results:
                results[name].update(side_alone(__file__, name, model))
            full = results.get("full")
            print(f"\n## {preset}\n{'side':20}{'trained params':>16}{'step s':>9}{'x full':>8}{'step MiB':>10}"
                  f"{'x full':>8}{'training MiB':>14}{'x full':>8}")
            for name, r in results.items():
                ratio = (lambda key: f"{r[key] / full[key]:7.2f}x") if full else (lambda key: f"{'':>8}")
                print(f"{name:20}{r['trained_parameters']:16,}{r['step_s']:9.2f}{ratio('step_s')}"
                      f"{r['step_mib']:10.0f}{ratio('step_mib')}{r['train_mib']:14.0f}{ratio('train_mib')}")


if __name__ == "__main__":
    main()
