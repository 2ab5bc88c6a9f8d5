"""python -m jobs.train --config FILE [key=value ...]: DPO training on Ray Train.

Reads the reference dataset (or, for reference-free losses, the prepared one)
that the config's own fingerprint matches, and writes {run.output_dir}/train/.
"""

from __future__ import annotations

from dpo.config import Config
from dpo.model_folders import check_model_folders
from dpo.trackers import check_trackers
from dpo.launch import train
from dpo.losses import needs_reference
from jobs.cli import job
from jobs.logs import show
from jobs.summary import table
from pipeline.prepare import find_datasets


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
