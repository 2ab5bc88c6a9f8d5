"""Read, tokenize and score with the reference model into {run.output_dir}/reference/ (and reference_eval/)."""

from __future__ import annotations

import logging

from dpo import fingerprint as fpr
from dpo import storage
from dpo.config import Config, UserError
from pipeline.prepare import dataset_folder, reuse_if_complete, split_files
from pipeline.scoring import ReferenceScorer, actor_pool, check_reference_model
from pipeline.stage import run_stage
from pipeline.tokenize import TOKENIZATION_VERSION, load_tokenizer

log = logging.getLogger(__name__)


def scoring_setup(cfg: Config) -> dict:
    """What decides the scores besides the fingerprint: cached shards made otherwise are not mixed in."""
    return {"reference.backend": cfg.reference.backend, "model.dtype": cfg.model.dtype}


def _check_setup(folder: str, manifest: dict, cfg: Config) -> None:
    found = manifest.get("layout", {})
    for key, value in scoring_setup(cfg).items():
        if found.get(key) != value:
            raise UserError(
                f"{folder} was scored with {key}={found.get(key)} but the config gives {key}={value}; "
                "set it back, or write the new scores into a new run.output_dir"
            )


def precompute(cfg: Config, split: str = "train") -> dict:
    files = split_files(cfg, split)
    # Fail here, not in a Ray task or actor, when the tokenizer or model cannot load.
    load_tokenizer(cfg.model.tokenizer_path, cfg.model.trust_remote_code)
    check_reference_model(cfg)
    fingerprint = fpr.compute(cfg, files, with_reference=True, tokenization_version=TOKENIZATION_VERSION)
    folder = dataset_folder(cfg, "reference", split)
    manifest = reuse_if_complete(folder, fingerprint)
    if manifest is not None:
        _check_setup(folder, manifest, cfg)
        return manifest
    cfg.save(storage.join(folder, "config.yaml"))
    extra = {
        "kind": "reference",
        "split": split,
        "backend": cfg.reference.backend,
        "dtype": cfg.model.dtype,
        "reference_model": cfg.model.reference_path,
        "num_actors": cfg.reference.num_actors,
        "batch_tokens": cfg.reference.batch_tokens,
    }
    with actor_pool(cfg, folder) as pool:
        return run_stage(cfg, files, folder, fingerprint, score=lambda ds: ds.map_batches(ReferenceScorer, **pool),
                         manifest_extra=extra, layout_extra=scoring_setup(cfg))
