"""python -m jobs.precompute_reference --config FILE [key=value ...]: score every pair with the reference model."""

from __future__ import annotations

from dpo.model_folders import check_model_folders
from jobs.cli import job
from jobs.summary import print_dataset_summary
from pipeline.precompute import precompute_splits
from pipeline.prepare import dataset_folder, splits


def main(argv=None) -> None:
    with job("precompute_reference", argv, __doc__,
             before_ray=lambda cfg, _: check_model_folders(cfg.model, policy=False, reference=True)) as (cfg, _):
        for split, manifest in precompute_splits(cfg, splits(cfg)).items():
            print_dataset_summary(f"reference scores ({split}, {manifest['backend']}, {manifest['dtype']})",
                                  dataset_folder(cfg, "reference", split), manifest)


if __name__ == "__main__":
    main()
