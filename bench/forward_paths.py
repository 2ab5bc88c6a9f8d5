"""The forward DPO needs (dpo.forward) against today's, in training and in hf scoring, on real HH pairs.

    python bench/forward_paths.py [--presets small,medium] [--pairs 64] [--steps 6] [--batch-size 4]
                                  [--max-length 512] [--threads 2] [--score-pairs 64]
                                  [--sides today,shared,response,new]

Sides, on the same model, the same pairs and the same batches:

- today: padded rows (prompt+chosen, prompt+rejected), logits at every position;
- new:   one row per pair (prompt+chosen+rejected, the prompt once), logits only
         at the positions that predict a response token, in checkpointed chunks;
- and, to say where the gain comes from, each change alone:
  shared (one row per pair, full logits) and response (padded, response logits).

Training throughput: every side in one process, each with its own copy of the
model and AdamW, their steps interleaved on the same batches so that other load
on the machine slows all alike. "tokens/s" counts the tokens of both sequences
of a pair, prompt twice, whatever a side computes: the same work done per
second. Step memory: each side alone in a fresh process; the peak RSS of its
steps above the RSS after a first step, when weights, gradients (kept
allocated) and AdamW's state exist: what activations and logits take.
Scoring: pipeline.hf_scorer.HFScorer as the actor runs it (eager attention,
length-sorted batches under reference.batch_tokens), new against today's
path, interleaved in one process.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from hh import HH, hh_texts, load_pairs
from train_throughput import hh_pairs, status_mib

from dpo.config import DataConfig

SIDES = {"today": ("padded", False), "shared": ("shared_prompt", False), "response": ("padded", True),
         "new": ("shared_prompt", True)}


def reset_peak() -> None:
    """VmHWM back to the current RSS (Linux), after glibc has returned freed memory to the system."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
        fh.write("5")


def batches(args, model_dir):
    from dpo.batching import epoch_plan

    pairs = hh_pairs(args, model_dir)
    # Shuffled, not length-grouped: batches of mixed lengths, as a pool of 1 gives.
    return pairs, epoch_plan(pairs.tokens_per_pair, args.batch_size, 1, seed=0, epoch=0)


class Side:
    def __init__(self, model_dir: str, name: str, chunk_size: int):
        import torch
        from transformers import AutoModelForCausalLM

        from dpo.forward import PolicyLogps

        self.layout, response = SIDES[name]
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        self.policy = PolicyLogps(lm, chunk_size, response_logits=response).train()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=1e-5)

    def step(self, pairs, rows) -> float:
        import torch

        from dpo.batching import collate
        from dpo.forward import sequence_logps
        from dpo.losses import preference_loss

        t0 = time.perf_counter()
        mb = collate(pairs, rows, 0, self.layout)
        chosen, rejected = sequence_logps(self.policy, mb.inputs, average=False)
        preference_loss(chosen, rejected, mb.ref_chosen, mb.ref_rejected, loss_type="sigmoid",
                        beta=0.1).losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: not part of the step's peak
        return time.perf_counter() - t0


def child(args) -> None:
    """Step memory of one side alone, in a fresh process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    pairs, plan = batches(args, args.model)
    side = Side(args.model, args.child, args.chunk_size)
    side.step(pairs, plan[0])
    gc.collect()
    reset_peak()
    base = status_mib("VmRSS")
    for i in range(1, 4):
        side.step(pairs, plan[i % len(plan)])
    print(json.dumps({"step_mib": status_mib("VmHWM") - base}))


def train_speed(args, model_dir) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    pairs, plan = batches(args, model_dir)
    sides = {name: Side(model_dir, name, args.chunk_size) for name in args.sides.split(",")}
    seconds = {name: 0.0 for name in sides}
    tokens = 0
    for i in range(1 + args.steps):  # step 0 warms up
        rows = plan[i % len(plan)]
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in order:
            elapsed = sides[name].step(pairs, rows)
            seconds[name] += elapsed if i else 0.0
        tokens += int(pairs.tokens_per_pair[rows].sum()) if i else 0
    return {name: {"tokens_per_s": tokens / s} for name, s in seconds.items()}


def score_speed(args, model_dir) -> dict:
    """tokens/s of the hf scorer, new against today's path, interleaved rounds; and their largest difference."""
    import torch

    from pipeline.hf_scorer import HFScorer
    from pipeline.tokenize import load_tokenizer

    torch.set_num_threads(args.threads)
    pairs = load_pairs(args.score_pairs, load_tokenizer(model_dir),
                       DataConfig(max_length=args.max_length, max_prompt_length=args.max_length // 2))
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    new = HFScorer(model_dir, batch_tokens=args.batch_tokens, device="cpu")
    today = HFScorer(model_dir, batch_tokens=args.batch_tokens, device="cpu")
    today.runtime.layout, today.runtime.policy.response_only = "padded", False
    scorers = {"new": new, "today": today}
    seconds = {name: 0.0 for name in scorers}
    scores = {}
    for r in range(args.rounds):
        for name in (scorers if r % 2 == 0 else list(scorers)[::-1]):
            t0 = time.perf_counter()
            scores[name] = scorers[name].score(pairs)
            seconds[name] += time.perf_counter() - t0
    worst = max(abs(a - b) for x, y in zip(scores["new"], scores["today"]) for a, b in zip(x, y))
    return {"tokens_per_s": {name: tokens * args.rounds / s for name, s in seconds.items()},
            "max_abs_diff_nats": worst, "pairs": len(pairs)}


def side_alone(script: str, side: str, model: str) -> dict:
    """`script --child side` in a fresh process, on the same arguments: what that side alone measured (its
    last output line, JSON), so that no other side's allocations sit in its peak."""
    cmd = [sys.executable, script, "--child", side, "--model", model] + sys.argv[1:]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,medium")
    ap.add_argument("--pairs", type=int, default=64, help="HH pairs the training batches are cut from")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per side (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per training step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=1024, help="model.logits_chunk_size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-pairs", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=16384, help="reference.batch_tokens")
    ap.add_argument("--rounds", type=int, default=2, help="scoring rounds per side")
    ap.add_argument("--sides", default=",".join(SIDES), help="training sides, comma-separated: " + ", ".join(SIDES))
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
          f"torch threads {args.threads}, HH pairs, max_length {args.max_length}, training batch {args.batch_size} "
          f"pairs x {args.steps} steps, logits chunk {args.chunk_size}, scoring {args.score_pairs} pairs x "
          f"{args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        for preset in args.presets.split(","):
            model = build_local_model(os.path.join(tmp, preset), hh_texts(HH, limit=2000), preset=preset, seed=0)
            speed = train_speed(args, model)
            for name in speed:
                speed[name].update(side_alone(__file__, name, model))
            scoring = score_speed(args, model)
            today = speed["today"]
            print(f"\n## {preset}\n{'training':22}{'tokens/s':>10}{'x today':>9}{'step MiB':>10}{'x today':>9}")
            for name, r in speed.items():
                print(f"{name:22}{r['tokens_per_s']:10.0f}{r['tokens_per_s'] / today['tokens_per_s']:8.2f}x"
                      f"{r['step_mib']:10.0f}{r['step_mib'] / today['step_mib']:8.2f}x")
            s = scoring["tokens_per_s"]
            print(f"{'hf scoring':22}{'tokens/s':>10}{'x today':>9}\n{'today':22}{s['today']:10.0f}{1:8.2f}x\n"
                  f"{'new':22}{s['new']:10.0f}{s['new'] / s['today']:8.2f}x   (largest difference "
                  f"{scoring['max_abs_diff_nats']:.2e} nats over {2 * scoring['pairs']} sequences)")


if __name__ == "__main__":
    main()
