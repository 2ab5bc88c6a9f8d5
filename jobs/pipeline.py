"""python -m jobs.pipeline --config FILE [--build-model PRESET] [key=value ...]: reference scores, then training.

Scores the train and eval pairs with the reference model (reusing a finished
reference dataset whose fingerprint matches), then trains. Reference-free
losses (simpo, sft) skip scoring and train from the prepared dataset.

--build-model PRESET builds a small local model (pipeline.models presets) into
model.policy, its tokenizer trained on data.train_files, unless that exact
build is there already: how the quickstart runs without any model download.
"""

from __future__ import annotations

import logging
import time

from dpo import storage
from dpo.config import Config
from dpo.launch import refuse_unless_training_fits
from dpo.errors import UserError
from jobs import train as train_job
from jobs.cli import job
from jobs.logs import show
from jobs.summary import print_dataset_summary, table
from pipeline.models import PRESETS, build_local_model, iter_texts
from pipeline.precompute import precompute_splits
from pipeline.prepare import dataset_folder, dataset_kind, prepare_splits, split_files, splits
from pipeline.scoring_pool import check_pool_fits

log = logging.getLogger("raydpo")


def _flags(parser) -> None:
    parser.add_argument("--build-model", metavar="PRESET", choices=sorted(PRESETS),
                        help="build a local model of this preset into model.policy (kept if already built)")


def build_model(cfg: Config, preset: str) -> None:
    log.info("model.policy: a %s model built from data.train_files into %s", preset, cfg.model.policy)
    try:
        # Without transformers' saving bar: one line on the terminal that says nothing.
        build_local_model(cfg.model.policy, iter_texts(split_files(cfg, "train")), preset=preset, seed=cfg.run.seed,
                          progress_bar=False)
    except ValueError as exc:
        raise UserError(f"--build-model: {exc}") from None


def before_ray(cfg: Config, args) -> None:
    if args.build_model:
        if storage.is_uri(cfg.model.policy):
            raise UserError(f"--build-model builds into a local folder, but model.policy is {cfg.model.policy}; "
                            "build it locally and upload the folder, or drop --build-model")
        build_model(cfg, args.build_model)
    train_job.check_before_ray(cfg)


def main(argv=None) -> None:
    started = time.time()
    with job("pipeline", argv, __doc__, extra=_flags, before_ray=before_ray) as (cfg, args):
        kind = dataset_kind(cfg)
        # Every stage's plan, in the order the stages run, before the first: not after an hour of scoring.
        if kind == "reference":
            check_pool_fits(cfg)
        refuse_unless_training_fits(cfg)
        stage = precompute_splits if kind == "reference" else prepare_splits
        for split, manifest in stage(cfg, splits(cfg)).items():
            print_dataset_summary(f"{kind} ({split})", dataset_folder(cfg, kind, split), manifest)
        train_job.run(cfg)
        show(table("pipeline", [("total time (s)", round(time.time() - started, 1)),
                                 ("output", cfg.run.output_dir)]))


if __name__ == "__main__":
    main()
