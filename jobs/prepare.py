"""python -m jobs.prepare --config FILE [key=value ...]: read, validate and tokenize only."""

from __future__ import annotations

from dpo.model_folders import check_model_folders
from jobs.cli import job
from jobs.summary import print_dataset_summary
from pipeline.prepare import dataset_folder, prepare_splits, splits


def main(argv=None) -> None:
    with job("prepare", argv, __doc__,
             before_ray=lambda cfg, _: check_model_folders(cfg.model, policy=False, reference=False)) as (cfg, _):
        for split, manifest in prepare_splits(cfg, splits(cfg)).items():
            print_dataset_summary(f"prepare ({split})", dataset_folder(cfg, "prepared", split), manifest)


if __name__ == "__main__":
    main()
