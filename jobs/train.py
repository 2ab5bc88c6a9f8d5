"""python -m jobs.train --config FILE [key=value ...]: DPO training on Ray Train.

Reads the reference dataset (or, for reference-free losses, the prepared one)
that the config's own fingerprint matches, and writes {run.output_dir}/train/.
"""

from __future__ import annotations

from typing import Optional

from dpo import fingerprint as fpr
from dpo.config import Config
from dpo.model_folders import check_model_folders
from dpo.trackers import check_trackers
from dpo.launch import DatasetFolder, train
from dpo.losses import needs_reference
from jobs.cli import job
from jobs.logs import show
from jobs.summary import table
from pipeline.prepare import dataset_folder, split_files
from pipeline.tokenize import TOKENIZATION_VERSION


def dataset_kind(cfg: Config) -> str:
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


def print_train_summary(result: dict) -> None:
    m = result["metrics"]

    def num(key):
        value = m.get(key)
        return "-" if value is None else f"{value:.4f}"

    rows = [("train pairs", result["train_pairs"]), ("eval pairs", result["eval_pairs"]),
            ("steps", result["steps"]), ("time (s)", result["seconds"]),
            ("loss", num("loss")), ("rewards/accuracies", num("rewards/accuracies")),
            ("rewards/margins", num("rewards/margins"))]
    if "eval/loss" in m:
        rows += [("eval/loss", num("eval/loss")), ("eval/rewards/accuracies", num("eval/rewards/accuracies")),
                 ("eval/rewards/margins", num("eval/rewards/margins"))]
    rows += [("metrics", result["metrics_path"]), ("report", result.get("report") or "-"),
             ("policy", result["policy"] or "not saved")]
    show(table("train", rows))


def run(cfg: Config) -> dict:
    train_data, eval_data = find_datasets(cfg)  # before any worker starts: a mismatch is a clean error
    result = train(cfg, train_data, eval_data)
    print_train_summary(result)
    return result


def check_before_ray(cfg: Config, _args=None) -> None:
    """The model folders and trackers training needs, checked before Ray starts."""
    check_model_folders(cfg.model, policy=True, reference=needs_reference(cfg.train.loss_types))
    check_trackers(cfg)


def main(argv=None) -> None:
    with job("train", argv, __doc__, before_ray=check_before_ray) as (cfg, _):
        run(cfg)


if __name__ == "__main__":
    main()
