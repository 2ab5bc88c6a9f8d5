"""Read, validate and tokenize into {run.output_dir}/prepared/ (and prepared_eval/)."""

from __future__ import annotations

import logging
from typing import Callable, Optional

from dpo import fingerprint as fpr
from dpo import storage
from dpo.config import Config
from dpo.launch import DatasetFolder
from dpo.losses import needs_reference
from pipeline.read import expand_inputs
from pipeline.stage import Part, run_stage
from pipeline.tokenize import TOKENIZATION_VERSION, load_tokenizer

log = logging.getLogger(__name__)

SPLITS = {"train": ("data.train_files", ""), "eval": ("data.eval_files", "_eval")}


def splits(cfg: Config) -> list[str]:
    """The splits a job makes datasets of: train, and eval where data.eval_files names any."""
    return ["train"] + (["eval"] if cfg.data.eval_files else [])


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
    for split in splits(cfg):
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


def parts_to_make(cfg: Config, kind: str, wanted: list[str], fingerprint_of: Callable[[list[str]], dict],
                  manifest_extra: dict) -> tuple[dict[str, dict], list[Part]]:
    """The manifests of the wanted splits' finished datasets with matching fingerprints, to reuse, and a
    stage Part for each other split (its config.yaml saved)."""
    reused, parts = {}, []
    for split in wanted:
        files = split_files(cfg, split)
        fingerprint = fingerprint_of(files)
        folder = dataset_folder(cfg, kind, split)
        manifest = reuse_if_complete(folder, fingerprint)
        if manifest is not None:
            reused[split] = manifest
            continue
        cfg.save(storage.join(folder, "config.yaml"))
        parts.append(Part(split, files, folder, fingerprint, {"kind": kind, "split": split, **manifest_extra}))
    return reused, parts


def prepare(cfg: Config, split: str = "train") -> dict:
    """One split's prepared dataset, made or reused: its manifest."""
    return prepare_splits(cfg, [split])[split]


def prepare_splits(cfg: Config, wanted: list[str]) -> dict[str, dict]:
    """The wanted splits' prepared datasets, made (in one stream) or reused: manifests by split."""
    load_tokenizer(cfg.model.tokenizer_path, cfg.model.trust_remote_code, cfg.model.tokenizer_key)  # fail here, not in a Ray task
    reused, parts = parts_to_make(
        cfg, "prepared", wanted,
        lambda files: fpr.compute(cfg, files, with_reference=False, tokenization_version=TOKENIZATION_VERSION), {})
    made = run_stage(cfg, parts) if parts else {}
    return {split: reused.get(split) or made[split] for split in wanted}
