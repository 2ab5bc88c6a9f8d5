"""Reference scoring on CPU: vLLM's CPU build against the hf backend, side by side.

    python bench/vllm_cpu_throughput.py [--presets small,medium] [--pairs 64] [--rounds 2] [--threads 2]
                                        [--max-length 512] [--batch-tokens 16384]

Each side is the pipeline's own scorer, as a scoring actor builds it
(pipeline.vllm_scorer.VLLMScorer with vllm_scorer_args;
HFScorer), in a process of its own, on the same model folder, the same HH pairs
tokenized by the pipeline, and the same token budget (reference.batch_tokens).
vLLM runs twice: as the pipeline builds it on the CPU build (not compiled) and
compiled (reference.vllm_compile=true). The sides alternate (hf, vllm, vllm+c,
then the reverse, ...) so that other load on the machine falls on all. Each process reports its start-up (model load; for vLLM
also the engine's processes, compilation and KV cache) and its scoring time
separately, so tokens/s is given with and without start-up.

MFU is against this machine's measured fp32 matmul peak at the same threads
(a 2048 x 2048 matmul, best of several), counting 2 x the parameters that a
token's forward multiplies (every weight but the input embedding) per real token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hh import HH, hh_texts, load_pairs

# vllm: the engine as the pipeline builds it on the CPU build (reference.vllm_compile unset: not compiled);
# vllm+c: with reference.vllm_compile=true (torch.compile, vLLM's own default).
KINDS = ("hf", "vllm", "vllm+c")


def matmul_peak_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = 0.0
    for _ in range(8):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
    return best


def child(args) -> None:
    """One side in a fresh process: start-up, then the pairs scored; prints one JSON line."""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # what Ray sets for an actor of that many CPUs
    from dpo.config import load_config
    from pipeline.tokenize import load_tokenizer

    cfg = load_config(None, [f"model.policy={args.model}", f"data.max_length={args.max_length}",
                             f"data.max_prompt_length={args.max_length // 2}",
                             f"reference.batch_tokens={args.batch_tokens}", "reference.backend=vllm",
                             *(["reference.vllm_compile=true"] if args.child == "vllm+c" else [])])
    pairs = load_pairs(args.pairs, load_tokenizer(args.model), cfg.data, Path(args.data))
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    t0 = time.perf_counter()
    if args.child != "hf":
        from pipeline.vllm_scorer import VLLMScorer, vllm_scorer_args
        from pipeline.vllm_scorer import require_vllm

        scorer = VLLMScorer(*vllm_scorer_args(cfg, require_vllm(cfg.reference)))
    else:
        import torch

        from pipeline.hf_scorer import HFScorer

        torch.set_num_threads(args.threads)
        scorer = HFScorer(args.model, batch_tokens=args.batch_tokens, device="cpu")
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = [s for replies in zip(*scorer.score(pairs)) for s in replies]  # every chosen, then every rejected
    scoring = time.perf_counter() - t0
    if args.child != "hf":
        scorer.close()
    print(json.dumps({"startup_s": startup, "scoring_s": scoring, "scores": scores,
                      "tokens": sum(len(p) + len(r) for p, r in seqs)}))


def side(args, kind: str, model: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", model] + sys.argv[1:]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def multiplied_params(model: str) -> int:
    """Weights a token's forward multiplies: all but the input embedding (a lookup)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attention + mlp) + c.hidden_size * c.vocab_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,medium", help="pipeline.models presets, comma-separated")
    ap.add_argument("--pairs", type=int, default=64, help="first N usable HH pairs (2N sequences)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per side and preset, alternating")
    ap.add_argument("--threads", type=int, default=2, help="threads of each side (OMP_NUM_THREADS)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=16384, help="reference.batch_tokens of both sides")
    ap.add_argument("--data", default=str(HH))
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not Path(args.data).exists():
        sys.exit(f"{args.data} is absent: this benchmark reads Anthropic HH pairs from ../shared/data")
    from pipeline.models import build_local_model
    from pipeline.vllm_scorer import installed_vllm

    peak = matmul_peak_gflops(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads each side, {installed_vllm()}, {args.pairs} HH pairs, max_length "
          f"{args.max_length}, batch_tokens {args.batch_tokens}, {args.rounds} rounds; fp32 matmul peak "
          f"{peak:.1f} GFLOP/s")
    print(f"{'preset':>8} {'params':>7} {'side':>6} {'start s':>8} {'score s':>8} {'tok/s':>8} "
          f"{'tok/s+start':>11} {'MFU':>6}")
    with tempfile.TemporaryDirectory(prefix="bench-vllm-cpu-") as tmp:
        for preset in args.presets.split(","):
            model = build_local_model(os.path.join(tmp, preset), hh_texts(Path(args.data), limit=2000),
                                      preset=preset, seed=0)
            params = multiplied_params(model)
            runs: dict[str, list[dict]] = {k: [] for k in KINDS}
            for r in range(args.rounds):
                for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
                    runs[kind].append(side(args, kind, model))
            totals = {}
            for kind, rs in runs.items():
                tokens = sum(x["tokens"] for x in rs)
                start, score = sum(x["startup_s"] for x in rs), sum(x["scoring_s"] for x in rs)
                totals[kind] = tokens / score
                mfu = 2 * params * tokens / score / (peak * 1e9)
                print(f"{preset:>8} {params / 1e6:6.0f}M {kind:>6} {start / len(rs):8.1f} {score / len(rs):8.2f} "
                      f"{tokens / score:8.0f} {tokens / (start + score):11.0f} {mfu:6.1%}")
            diff = max(abs(a - b) for a, b in zip(runs["vllm"][0]["scores"], runs["hf"][0]["scores"]))
            compiled = max(abs(a - b) for a, b in zip(runs["vllm+c"][0]["scores"], runs["vllm"][0]["scores"]))
            print(f"{preset:>8}: vllm / hf tokens/s {totals['vllm'] / totals['hf']:.2f}x, vllm+c / vllm "
                  f"{totals['vllm+c'] / totals['vllm']:.2f}x without start-up; max |score difference| vllm-hf "
                  f"{diff:.2e}, vllm+c-vllm {compiled:.2e} nats per sequence; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
