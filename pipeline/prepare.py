"""Read, validate and tokenize into {run.output_dir}/prepared/ (and prepared_eval/)."""

from __future__ import annotations

import logging
from typing import Optional

from dpo import fingerprint as fpr
from dpo import storage
from dpo.config import Config
from dpo.launch import DatasetFolder
from dpo.losses import needs_reference
from pipeline.read import expand_inputs
from pipeline.stage import run_stage
from pipeline.tokenize import TOKENIZATION_VERSION, load_tokenizer

log = logging.getLogger(__name__)

SPLITS = {"train": ("data.train_files", ""), "eval": ("data.eval_files", "_eval")}


def split_files(cfg: Config, split: str) -> list[str]:
    key, _ = SPLITS[split]
    return expand_inputs(cfg.data.train_files if split == "train" else cfg.data.eval_files, key)


def dataset_folder(cfg: Config, kind: str, split: str) -> str:
    return storage.join(cfg.run.output_dir, kind + SPLITS[split][1])


def dataset_kind(cfg: Config) -> str:
    """What training reads: the reference dataset for a loss that needs the reference, else the prepared one."""
    return "reference" if needs_reference(cfg.train.loss_types) else "prepared"


def find_datasets(cfg: Config) -> tuple[DatasetFolder, Optional[DatasetFolder]]:
    """The finished train (and eval) datasets, refused unless their fingerprints match the config."""
    kind = dataset_kind(cfg)
    found = []
    for split in ["train"] + (["eval"] if cfg.data.eval_files else []):
        folder = dataset_folder(cfg, kind, split)
        expected = fpr.compute(cfg, split_files(cfg, split), with_reference=kind == "reference",
                               tokenization_version=TOKENIZATION_VERSION)
        made_by = "jobs.precompute_reference" if kind == "reference" else "jobs.prepare"
        found.append(DatasetFolder(folder, fpr.check(folder, expected, made_by=made_by)))
    return found[0], (found[1] if len(found) > 1 else None)


def reuse_if_complete(folder: str, fingerprint: dict):
    """The manifest of a finished dataset with this fingerprint; None if there is none to reuse."""
    if not storage.exists(storage.join(folder, fpr.MANIFEST)):
        return None
    manifest = fpr.check(folder, fingerprint)
    log.info("%s is complete and its fingerprint matches: reusing it", folder)
    return manifest


def prepare(cfg: Config, split: str = "train") -> dict:
    files = split_files(cfg, split)
    load_tokenizer(cfg.model.tokenizer_path, cfg.model.trust_remote_code, cfg.model.tokenizer_key)  # fail here, not in a Ray task
    fingerprint = fpr.compute(cfg, files, with_reference=False, tokenization_version=TOKENIZATION_VERSION)
    folder = dataset_folder(cfg, "prepared", split)
    manifest = reuse_if_complete(folder, fingerprint)
    if manifest is None:
        cfg.save(storage.join(folder, "config.yaml"))
        manifest = run_stage(cfg, files, folder, fingerprint, manifest_extra={"kind": "prepared", "split": split})
    return manifest
