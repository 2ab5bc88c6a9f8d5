"""vLLM against transformers on one GPU: per-token agreement and reference-scoring throughput.

    python bench/gpu_score.py --model DIR --data HH.jsonl.gz --dtype bfloat16 [--backends vllm,hf]
                              [--rounds 3] [--batch-tokens 32768] [--sample 256] [--json FILE]

Both backends run the pipeline's own scorers (pipeline.vllm_scorer.VLLMScorer with
vllm_engine_args, HFScorer) on the same token ids: every usable HH pair,
chosen and rejected, tokenized by the project's code. vLLM starts first and
takes --gpu-memory-utilization of the GPU; transformers uses what is left.

- Agreement: for --sample sequences, every response token's log-prob from
  each backend against transformers run one sequence per forward (no
  padding, no batch effects): the oracle. Reported per token and per
  sequence (|difference of the sums|, and that divided by the length).
- Throughput: tokens through the forward (prompt + response) per second over
  --rounds passes after a warm-up pass, and the model FLOP utilisation
  2 x parameters x tokens/s over the GPU's dense peak for the dtype.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from hh import HH, load_pairs

from dpo.config import load_config
from pipeline.tokenize import load_tokenizer

# Dense peak FLOP/s by device name and dtype (NVIDIA data sheets; fp32 without TF32,
# which torch leaves off for matmuls by default). The first matching name wins.
PEAK_FLOPS = [
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}),
    ("H200", {"bfloat16": 989e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
]


def peak_flops(dtype: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[dtype] for key, peaks in PEAK_FLOPS if key in name), None)


def count_params(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            total += sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    return total


def oracle_token_logps(model, seqs, device) -> list[list[float]]:
    """One sequence per forward, nothing padded: what each response token's log-prob is."""
    out = []
    with torch.inference_mode():
        for prompt, response in seqs:
            ids = torch.tensor([list(prompt) + list(response)], device=device)
            # Position t predicts token t + 1: plain log-softmax of the full logits, none of dpo's code.
            logits = model(input_ids=ids).logits[0, :-1].float()
            logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(logps[len(prompt) - 1:].double().tolist())
    return out


def agreement(sums: list[float], oracle: list[list[float]], tokens: list[list[float]] | None = None) -> dict:
    """|difference| from the oracle: per sequence (of the sums, and per response token), and per token."""
    per_seq = np.array([abs(s - sum(o)) for s, o in zip(sums, oracle)])
    per_seq_token = np.array([abs(s - sum(o)) / len(o) for s, o in zip(sums, oracle)])
    out = {"sequences": len(sums),
           "per_sequence_sum": {"mean": float(per_seq.mean()), "p99": float(np.quantile(per_seq, 0.99)),
                                "max": float(per_seq.max())},
           "per_sequence_per_token": {"mean": float(per_seq_token.mean()), "max": float(per_seq_token.max())}}
    if tokens is not None:
        per_token = np.abs(np.concatenate([np.subtract(t, o) for t, o in zip(tokens, oracle)]))
        out["per_token"] = {"tokens": int(per_token.size), "mean": float(per_token.mean()),
                            "p50": float(np.quantile(per_token, 0.5)), "p99": float(np.quantile(per_token, 0.99)),
                            "max": float(per_token.max())}
    return out


def timed(score, seqs, rounds: int) -> float:
    score(seqs[: min(len(seqs), 64)])  # warm-up: compilation, CUDA graphs, allocator
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        score(seqs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=str(HH))
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--backends", default="vllm,hf", help="comma-separated: vllm, hf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=32768, help="reference.batch_tokens of both backends")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--sample", type=int, default=256, help="sequences compared token by token")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    cfg = load_config(None, [f"model.policy={args.model}", f"model.dtype={args.dtype}",
                             f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_prompt_length}",
                             f"reference.batch_tokens={args.batch_tokens}", "reference.gpus_per_actor=1",
                             f"reference.gpu_memory_utilization={args.gpu_memory_utilization}"])
    pairs = load_pairs(10**9, load_tokenizer(args.model), cfg.data, Path(args.data))
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    sampled_pairs = random.Random(0).sample(pairs, min(args.sample // 2, len(pairs)))
    sample = [(p, c) for p, c, _ in sampled_pairs] + [(p, r) for p, _, r in sampled_pairs]
    tokens = sum(len(p) + len(r) for p, r in seqs)
    params = count_params(args.model)
    peak = peak_flops(args.dtype)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": args.dtype, "parameters": params, "pairs": len(pairs), "sequences": len(seqs),
              "tokens_per_pass": tokens, "rounds": args.rounds, "batch_tokens": args.batch_tokens,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "backends": {}}

    scorers = {}
    if "vllm" in backends:  # first: it sizes its KV cache from the memory free at start
        import vllm

        from pipeline.vllm_scorer import VLLMScorer, vllm_engine_args

        result["vllm"] = vllm.__version__
        scorers["vllm"] = VLLMScorer(vllm_engine_args(cfg))
    if "hf" in backends:
        import transformers

        from pipeline.hf_scorer import HFScorer

        result["transformers"] = transformers.__version__
        scorers["hf"] = HFScorer(args.model, dtype=args.dtype, batch_tokens=args.batch_tokens, device=device,
                                 attn_implementation=cfg.model.attn_implementation)
    oracle_model = scorers["hf"].runtime.policy.lm if "hf" in scorers else None
    if oracle_model is None:
        from transformers import AutoModelForCausalLM

        oracle_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    oracle = oracle_token_logps(oracle_model.eval(), sample, device)

    for name, scorer in scorers.items():
        seconds = timed(scorer.score, pairs, args.rounds)
        rate = tokens * args.rounds / seconds
        # vLLM token by token; the batched hf scorer by its sums (what padding and batching change).
        per_token = scorer.token_logprobs(sample) if name == "vllm" else None
        # In `sample`'s order: every chosen reply, then every rejected one.
        sums = ([sum(t) for t in per_token] if per_token is not None
                else [s for replies in zip(*scorer.score(sampled_pairs)) for s in replies])
        result["backends"][name] = {
            "seconds": round(seconds, 2), "tokens_per_s": round(rate),
            "mfu": round(2 * params * rate / peak, 4) if peak else None,
            "agreement_with_oracle": agreement(sums, oracle, per_token),
        }
    if {"vllm", "hf"} <= set(scorers):
        result["vllm_over_hf"] = round(result["backends"]["vllm"]["tokens_per_s"] /
                                       result["backends"]["hf"]["tokens_per_s"], 2)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
