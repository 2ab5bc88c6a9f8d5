"""python -m jobs.verify_reference --config FILE --sample N: rescore N cached pairs with transformers and compare.

The difference of a summed log-prob grows with the reply's length, so the
tolerance bounds each pair's difference divided by its response tokens (nats
per token), for the chosen and the rejected reply alike. Defaults:

- float32: 1e-3 nats/token. The hf path reproduces its own scores to ~1e-6 per
  token; vLLM in fp32 differs from transformers by ~1e-5..1e-4 per token; a
  wrong model, wrong tokens or a corrupted file differs by 0.1 or more. 1e-3
  leaves a 10x margin over honest noise and 100x under a real error.
- bfloat16: 0.1 nats/token. vLLM and transformers in bf16 differ by about
  0.01-0.05 per token on average, with single tokens near 0.3; averaged over a
  reply that stays well under 0.1, while a wrong model is far above it.
"""

from __future__ import annotations

import json
import random
import sys

from dpo import fingerprint as fpr
from dpo import schema, storage
from dpo.errors import UserError
from dpo.model_folders import check_model_folders, model_dir
from jobs.cli import job, log
from jobs.logs import show
from jobs.summary import table
from pipeline.prepare import dataset_folder, split_files
from pipeline.hf_scorer import HFScorer
from pipeline.tokenize import TOKENIZATION_VERSION

TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}
COLUMNS = schema.TOKEN_COLUMNS + schema.SCORE_COLUMNS


def _options(parser) -> None:
    parser.add_argument("--sample", type=int, default=64, help="pairs to rescore (default 64)")
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed |difference| per response token, nats "
                             f"(default by model.dtype: {TOLERANCE})")
    parser.add_argument("--json", metavar="FILE", help="also write the summary and every pair's differences here")


def compare(rows: list[dict], fresh: list[tuple[float, float]]) -> list[dict]:
    """Per pair: cached minus fresh, absolute and per response token, for chosen and rejected."""
    out = []
    for row, (chosen, rejected) in zip(rows, fresh):
        dc = row[schema.REF_CHOSEN_LOGP] - chosen
        dr = row[schema.REF_REJECTED_LOGP] - rejected
        per_token = max(abs(dc) / max(len(row[schema.CHOSEN_IDS]), 1), abs(dr) / max(len(row[schema.REJECTED_IDS]), 1))
        out.append({"pair_id": row[schema.PAIR_ID], "chosen_diff": dc, "rejected_diff": dr,
                    "abs_diff": max(abs(dc), abs(dr)), "per_token": per_token})
    return out


def main(argv=None) -> None:
    with job("verify_reference", argv, __doc__, extra=_options,
             before_ray=lambda cfg, _: check_model_folders(cfg.model, policy=False, reference=True)) as (cfg, args):
        if args.sample < 1:
            raise UserError(f"--sample {args.sample}: give at least 1 pair to rescore")
        folder = dataset_folder(cfg, "reference", args.split)
        files = split_files(cfg, args.split)
        expected = fpr.compute(cfg, files, with_reference=True, tokenization_version=TOKENIZATION_VERSION)
        manifest = fpr.check(folder, expected)
        ids = storage.read_parquet_files(folder, manifest["files"], columns=[schema.PAIR_ID]).column(0).to_pylist()
        picked = sorted(random.Random(cfg.run.seed).sample(range(len(ids)), min(args.sample, len(ids))))
        rows = storage.read_parquet_files(folder, manifest["files"], columns=COLUMNS).take(picked).to_pylist()
        log.info("rescoring %d of %d pairs of %s with transformers (%s)", len(rows), len(ids), folder,
                 cfg.model.dtype)
        scorer = HFScorer(model_dir(cfg.model.reference_path, cfg.model.reference_key), dtype=cfg.model.dtype,
                          batch_tokens=cfg.reference.batch_tokens, trust_remote_code=cfg.model.trust_remote_code,
                          attn_implementation=cfg.model.attn_implementation,
                          logits_chunk_size=cfg.model.logits_chunk_size)
        diffs = compare(rows, scorer.score([(r[schema.PROMPT_IDS], r[schema.CHOSEN_IDS], r[schema.REJECTED_IDS])
                                            for r in rows]))
        tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[cfg.model.dtype]
        worst = sorted(diffs, key=lambda d: -d["per_token"])
        n = len(diffs)
        show(table(f"verify reference ({args.split}; cached {manifest.get('backend')}/{manifest.get('dtype')} "
                    f"vs hf/{cfg.model.dtype})", [
                        ("pairs rescored", n),
                        ("mean |diff| per pair", f"{sum(d['abs_diff'] for d in diffs) / n:.3g}"),
                        ("max |diff| per pair", f"{max(d['abs_diff'] for d in diffs):.3g}"),
                        ("mean |diff| per token", f"{sum(d['per_token'] for d in diffs) / n:.3g}"),
                        ("max |diff| per token", f"{worst[0]['per_token']:.3g}"),
                        ("tolerance per token", f"{tolerance:.3g}"),
                    ]))
        for d in worst[:5]:
            show(json.dumps({k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in d.items()}))
        bad = [d for d in diffs if not d["per_token"] <= tolerance]  # NaN fails too
        if args.json:
            storage.write_text(args.json, json.dumps({
                "folder": folder, "cached": f"{manifest.get('backend')}/{manifest.get('dtype')}",
                "fresh": f"hf/{cfg.model.dtype}", "tolerance_per_token": tolerance, "failed": len(bad),
                "pairs": diffs}, indent=1))
        if bad:
            show(f"FAILED: {len(bad)} of {n} pairs differ by more than {tolerance:g} nats per token, worst "
                 f"{', '.join(d['pair_id'] for d in worst[:3])}; the cached scores do not match the reference "
                 "model: rerun jobs.precompute_reference into a new run.output_dir", err=True)
            sys.exit(1)
        show(f"OK: all {n} pairs within {tolerance:g} nats per token")


if __name__ == "__main__":
    main()
