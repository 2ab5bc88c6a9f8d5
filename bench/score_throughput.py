"""Reference-scoring throughput: length-sorted token-budget batches vs TRL-style fixed batches.

    python bench/score_throughput.py [--pairs 256] [--rounds 2] [--max-length 512] [--batch-size 8]
                                     [--batch-tokens 16384] [--threads 1] [--attn sdpa|eager]

Both sides run the same model object in the same process on the same token ids;
the batching and the forward differ:

- naive (what TRL's precompute_ref_log_probs does): `--batch-size` pairs in
  file order, chosen and rejected stacked into one forward, padded to the
  longest of the batch;
- ours (pipeline.hf_scorer.HFScorer as the actor runs it): each call of
  `--pairs-per-call` pairs sorted by length and packed under `--batch-tokens`
  (longest x count), right-padded, one row per pair (the prompt once) and
  logits only where a response token is predicted (dpo.forward).

The model is pipeline.models' "small" preset (~19M parameters) with its
tokenizer trained on the HH file itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from hh import HH, hh_texts, load_pairs

from dpo.config import DataConfig
from pipeline.models import build_local_model
from pipeline.hf_scorer import HFScorer, pack_by_tokens
from pipeline.tokenize import load_tokenizer

def naive(model, pairs, batch_size: int, pad_id: int) -> list[float]:
    """TRL-style: fixed batches in file order, chosen+rejected in one forward, padded to the longest."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [(p, c) for p, c, _ in chunk] + [(p, r) for p, _, r in chunk]
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (p, r) in enumerate(seqs):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            labels[row, len(p) : len(p) + len(r)] = torch.tensor(r)
            attention[row, : len(p) + len(r)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            targets = labels[:, 1:]
            counted = targets != -100
            picked = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
        sums = torch.where(counted, picked, 0.0).double().sum(-1).tolist()
        n = len(chunk)
        out += [v for pair in zip(sums[:n], sums[n:]) for v in pair]
    return out


def ours(scorer: HFScorer, pairs, pairs_per_call: int) -> list[float]:
    out = []
    for start in range(0, len(pairs), pairs_per_call):
        chunk = pairs[start : start + pairs_per_call]
        out += [v for pair in scorer.score(chunk) for v in pair]
    return out


def padded_tokens_naive(pairs, batch_size: int) -> int:
    total = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        total += 2 * len(chunk) * max(len(p) + max(len(c), len(r)) for p, c, r in chunk)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=256, help="first N usable HH pairs")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="naive: pairs per forward (TRL's default eval batch)")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="ours: reference.batch_tokens")
    ap.add_argument("--pairs-per-call", type=int, default=256, help="ours: reference.pairs_per_call")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timed passes over the pairs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is what a scoring actor with reference.cpus_per_actor=1 gets from Ray")
    ap.add_argument("--attn", default=None, help="model.attn_implementation (default: transformers' choice)")
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "raydpo-bench-small"))
    ap.add_argument("--data", default=str(HH))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = build_local_model(args.model_dir, hh_texts(Path(args.data)), preset="small", seed=0)
    tokenizer = load_tokenizer(model_dir)
    data = DataConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    pairs = load_pairs(args.pairs, tokenizer, data, Path(args.data))

    scorer = HFScorer(model_dir, batch_tokens=args.batch_tokens, device="cpu", attn_implementation=args.attn)
    params = sum(p.numel() for p in scorer.runtime.policy.lm.parameters())
    real = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    scorer.score(pairs[:1])  # warm-up: first-call allocations are not throughput

    # Alternating rounds (naive first, then ours first, ...) so that other load on
    # the machine falls on both sides alike; the times are summed over rounds.
    runs = {"naive": lambda: naive(scorer.runtime.policy.lm, pairs, args.batch_size, scorer.runtime.pad_id),
            "ours": lambda: ours(scorer, pairs, args.pairs_per_call)}
    seconds = {"naive": 0.0, "ours": 0.0}
    scores = {}
    for r in range(args.rounds):
        for name in (["naive", "ours"] if r % 2 == 0 else ["ours", "naive"]):
            t0 = time.perf_counter()
            scores[name] = runs[name]()
            seconds[name] += time.perf_counter() - t0
    done = len(pairs) * args.rounds

    padded_ours = 0
    for start in range(0, len(pairs), args.pairs_per_call):
        chunk = pairs[start : start + args.pairs_per_call]
        lengths = [len(p) + len(c) + len(r) for p, c, r in chunk]  # one row per pair
        padded_ours += sum(lengths[b[0]] * len(b) for b in pack_by_tokens(lengths, args.batch_tokens))
    padded = {"naive": padded_tokens_naive(pairs, args.batch_size), "ours": padded_ours}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; attention {scorer.runtime.policy.lm.config._attn_implementation}")
    print(f"model: {params / 1e6:.1f}M params (preset small); {len(pairs)} HH pairs, max_length {args.max_length}, "
          f"{real} real tokens; {args.rounds} rounds")
    for name, secs in seconds.items():
        print(f"{name:>5}: {secs:7.1f} s  {done / secs:7.2f} pairs/s  {real * args.rounds / secs:8.0f} tokens/s  "
              f"padding {1 - real / padded[name]:.0%} of {padded[name]} computed tokens")
    diff = max(abs(a - b) for a, b in zip(scores["naive"], scores["ours"]))
    print(f"speed-up (ours / naive pairs/s): {seconds['naive'] / seconds['ours']:.2f}x; "
          f"max |score difference| {diff:.2e}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
