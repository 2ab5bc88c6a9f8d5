"""python -m jobs.precompute_reference --config FILE [key=value ...]: score every pair with the reference model."""

from __future__ import annotations

from dpo.model_folders import check_model_folders
from jobs.cli import job
from jobs.summary import print_dataset_summary
from pipeline.precompute import precompute
from pipeline.prepare import dataset_folder


def main(argv=None) -> None:
    with job("precompute_reference", argv, __doc__,
             before_ray=lambda cfg, _: check_model_folders(cfg.model, policy=False, reference=True)) as (cfg, _):
        splits = ["train"] + (["eval"] if cfg.data.eval_files else [])
        for split in splits:
            manifest = precompute(cfg, split)
            print_dataset_summary(f"reference scores ({split}, {manifest['backend']}, {manifest['dtype']})",
                                  dataset_folder(cfg, "reference", split), manifest)


if __name__ == "__main__":
    main()
