"""Build the Ray Train TorchTrainer from a config and run it.

The caller (jobs.train) finds the datasets and checks their fingerprints;
this module turns config + datasets into a run and returns what it produced:

    {output_dir}/train/config.yaml      the resolved config
    {output_dir}/train/datasets.json    the fingerprints of the train and eval datasets it trains on
    {output_dir}/train/metrics.jsonl    one line per logged step
    {output_dir}/train/attempts.jsonl   one line per attempt (a job, or a restart after a worker failure):
                                        the step it resumed after and its number of workers
    {output_dir}/train/checkpoints/     step-N/ folders, COMPLETE-marked, each rank's shards (see dpo.checkpoint)
    {output_dir}/train/ray/             Ray Train's run folder: its checkpoints point to those, by step
    {output_dir}/train/policy/          the trained model + tokenizer, Hugging Face format (LoRA: merged)
    {output_dir}/train/adapter/         model.lora's adapter alone, in peft's format (dpo.lora)
    {output_dir}/train/tensorboard/, wandb/, mlflow.db, tracker_runs.json   train.report_to's trackers (dpo.trackers)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import yaml

from dpo import fingerprint as fpr, schema, storage
from dpo.checkpoint import complete_steps, newest, read_metrics
from dpo.config import GLOBAL_BATCH_KEYS, Config, TrainConfig, layout_of_retired_switches, resume_safe
from dpo.errors import UserError
from dpo.model_folders import check_max_length, model_dir, read_model_config
from dpo.job_cpus import bundle_text, free_text, refuse_unless_fits
from dpo.lora import ADAPTER_DIR, check_lora_targets
from dpo.losses import needs_reference
from dpo.trackers import RUNS_FILE, check_trackers

log = logging.getLogger("raydpo.train")

# Ray Train's controller polls its workers every 2 s by default, and the worker group's start, each checkpoint
# report and the run's end each wait for a poll: 10 s of a 35 s fit of 8 steps on 2 CPU workers (measured,
# docs/benchmarks.md). Every 0.5 s costs the controller two calls a second per worker. A value the user set
# is kept.
HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def ray_env_vars() -> dict:
    """Environment variables for every process of the job's Ray (ray.init's runtime_env), the Train
    controller among them."""
    return {HEALTH_CHECK_INTERVAL: os.environ.get(HEALTH_CHECK_INTERVAL, "0.5")}

@dataclass
class DatasetFolder:
    """A finished dataset folder and its manifest (whose `files` lists the Parquet files)."""

    folder: str
    manifest: dict

    @property
    def pairs(self) -> int:
        return int(self.manifest["counts"]["kept"])

    @property
    def scored(self) -> bool:
        return bool(self.manifest.get("layout", {}).get("scored"))


def validate(cfg: Config, train: DatasetFolder) -> None:
    """The user's mistakes that would otherwise surface inside a worker."""
    t = cfg.train  # the loss settings themselves are checked when the config loads
    if needs_reference(t.loss_types) and not train.scored:
        raise UserError(f"{train.folder} holds no reference scores but train.loss_type {t.loss_type} needs "
                        "them; run jobs.precompute_reference (or jobs.pipeline) first")
    model_dir(cfg.model.policy, "model.policy", weights=False)
    _check_policy_context(cfg)
    if t.layout == "shared_prompt" and (cfg.model.attn_implementation or "").startswith("flash"):
        raise UserError(f"train.layout=shared_prompt needs an attention that takes its mask, which "
                        f"model.attn_implementation={cfg.model.attn_implementation} does not; use flex_attention "
                        "(on GPU), sdpa or eager, or another train.layout (auto packs where the model allows)")
    check_lora_targets(cfg, read_model_config(cfg.model.policy, "model.policy", cfg.model.trust_remote_code))
    check_trackers(cfg)
    refuse_unless_training_fits(cfg)
    if train.pairs < t.global_batch:
        made_of = ("train.global_batch_size; lower it" if t.global_batch_size else
                   f"train.batch_size x {'the largest of ' if t.elastic else ''}train.num_workers x train.grad_accum, "
                   "train.global_batch_size being unset; "
                   "lower one of them, or set train.global_batch_size")
        raise UserError(f"{train.folder} holds {train.pairs} pairs, fewer than one global batch of {t.global_batch} "
                        f"({made_of})")


def refuse_unless_training_fits(cfg: Config) -> None:
    """The worker group's CPUs and GPUs, counted against what this job can use, and its placement: Ray Train
    would retry the group's start without end. Checked again by jobs.pipeline before its first stage."""
    t = cfg.train
    # An elastic group starts with what it gets, from its smallest on.
    workers = f"train.num_workers={t.num_workers}" + (f"'s smallest group of {t.min_workers}," if t.elastic else "")
    refuse_unless_fits(t.min_workers * t.cpus_per_worker,
                       f"the training workers ({workers} x train.cpus_per_worker={t.cpus_per_worker:g})",
                       lower="train.num_workers or train.cpus_per_worker")
    if t.use_gpu:
        refuse_unless_fits(t.min_workers * t.gpus_per_worker,
                           f"the training workers ({workers} x train.gpus_per_worker={t.gpus_per_worker:g}, "
                           "train.use_gpu)", resource="GPU", lower="train.num_workers or train.gpus_per_worker")
    _check_strict_spread(t)


def worker_bundle(cfg: Config) -> dict:
    """What each training worker asks Ray for."""
    t = cfg.train
    return {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}


def scaling_config(cfg: Config):
    """Ray Train's worker group for this config: Ray's (min, max) for an elastic group, which looks for room to
    grow every train.elastic_resize_interval_s."""
    from ray.train import ScalingConfig

    t = cfg.train
    return ScalingConfig(num_workers=tuple(t.num_workers) if t.elastic else t.num_workers,
                         elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
                         use_gpu=t.use_gpu, resources_per_worker=worker_bundle(cfg),
                         placement_strategy=t.placement_strategy)


# How long Ray Train waits for a worker group's workers before it gives that start up (60 s by default).
START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# How long one start of an elastic group waits for its placement. Right after a node is lost Ray Train may still
# count that node's CPUs (the cluster marks a node dead seconds later) and ask for a group that can no longer be
# placed; when the wait ends it counts again and starts the group the nodes now hold.
ELASTIC_START_ATTEMPT_S = 15.0


@contextlib.contextmanager
def _start_bounded_by_stall_timeout(cfg: Config) -> Iterator[int]:
    """Ray Train retries a worker group's start without end while the cluster cannot place it (no GPU, CPUs
    another job holds): each start attempt times out and counts as a controller failure, of which it allows
    any number. Here one attempt lasts run.stall_timeout_s and none is retried, so such a run fails after that
    long; the caller names what it waited for. An elastic group's attempts last ELASTIC_START_ATTEMPT_S each,
    and as many are allowed over the run as make run.stall_timeout_s. Yields the controller_failure_limit for
    the FailureConfig. A group that starts and later fails is restarted under train.max_failures, as before.
    Ray Train reads the variable from the driver's environment when fit() starts; a value the user set is kept."""
    timeout = cfg.run.stall_timeout_s
    attempt = min(timeout or math.inf, ELASTIC_START_ATTEMPT_S) if cfg.train.elastic else timeout
    if attempt is None:
        yield -1
        return
    previous = os.environ.get(START_TIMEOUT)
    os.environ.setdefault(START_TIMEOUT, f"{attempt:g}")
    try:
        yield -1 if timeout is None else math.ceil(timeout / attempt) - 1
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT, None)


def _group_start_failure(cfg: Config, error: BaseException) -> Optional[UserError]:
    """The one line for a fit that failed because its worker group never started, else None."""
    failure = getattr(error, "controller_failure", None)  # ray.train.ControllerError's cause
    if type(failure).__name__ != "WorkerGroupStartupTimeoutError":
        return None
    t, bundle = cfg.train, worker_bundle(cfg)
    attempt = float(os.environ.get(START_TIMEOUT, 0))
    within = f"in {cfg.run.stall_timeout_s:g} s of {attempt:g}-s tries" if t.elastic else f"within {attempt:g} s"
    return UserError(f"run.stall_timeout_s: training's worker group ({t.num_workers} x {bundle_text(bundle)}) did not "
                     f"start {within} (free: {free_text(bundle)}); free "
                     "or add resources, "
                     "ask for fewer (train.num_workers, train.cpus_per_worker, train.gpus_per_worker or "
                     "train.use_gpu), or raise run.stall_timeout_s (null: wait forever)")


def _check_strict_spread(t) -> None:
    """STRICT_SPREAD gives each worker a node of its own; with fewer nodes its placement group waits forever."""
    if t.placement_strategy != "STRICT_SPREAD":
        return
    import ray

    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if t.num_workers > nodes:
        raise UserError(f"train.placement_strategy=STRICT_SPREAD puts each of the train.num_workers={t.num_workers} "
                        f"workers on a node of its own, but the cluster has {nodes}, so it would wait forever; lower "
                        "train.num_workers, use SPREAD or PACK, or add nodes")


def _check_policy_context(cfg: Config) -> None:
    hf_config = read_model_config(cfg.model.policy, "model.policy", cfg.model.trust_remote_code)
    check_max_length(hf_config, max_length=cfg.data.max_length, key="model.policy", path=cfg.model.policy)


DATASETS_FILE = "datasets.json"  # train/: the fingerprints of the datasets the run trains on


def _check_resumable(cfg: Config, train_dir: str, datasets: dict) -> None:
    """Refuse to continue checkpoints written under another config, or trained on other data.

    `datasets`: {"train": fingerprint, "eval": fingerprint or None} of the datasets this run reads. Every
    config key counts but those marked RESUMABLE (dpo.config); the fingerprints catch what the keys cannot
    show, such as an input file edited in place and scored again."""
    saved_path = storage.join(train_dir, "config.yaml")
    if not complete_steps(storage.join(train_dir, "checkpoints")) or not storage.exists(saved_path):
        return
    saved = _dotted(yaml.safe_load(storage.read_text(saved_path)) or {})
    if "train.layout" not in saved:  # saved before train.layout replaced the two switches
        saved["train.layout"] = layout_of_retired_switches(saved.get("train.packing", "auto"),
                                                           saved.get("train.prefix_sharing", "auto"),
                                                           saved.get("model.attn_implementation"))
    # A key the saved config lacks was added since that run, which ran with its default.
    default = _dotted(Config().model_dump(mode="json"))
    now = _dotted(cfg.model_dump(mode="json"))
    changed = [key for key, value in now.items() if not resume_safe(key) and saved.get(key, default.get(key)) != value]
    if changed:
        raise UserError(f"{train_dir} holds checkpoints of a run with another {changed[0]}"
                        f"{' (and ' + ', '.join(changed[1:]) + ')' if changed[1:] else ''}, and training resumes "
                        "from them; set it back to resume, or delete that folder (or set run.output_dir) to start over")
    # The keys that split a step are RESUMABLE, the step's size is not: it names the data position and the mean.
    saved_global_batch = TrainConfig.model_construct(**{
        key: saved[f"train.{key}"] for key in GLOBAL_BATCH_KEYS if f"train.{key}" in saved}).global_batch
    if saved_global_batch != cfg.train.global_batch:
        raise UserError(f"{train_dir} holds checkpoints of a run with another train.global_batch_size "
                        f"({saved_global_batch} pairs a step, now {cfg.train.global_batch}), and training resumes "
                        "from them; set train.global_batch_size to "
                        f"{saved_global_batch} to resume on any train.num_workers (unset, it is train.batch_size x "
                        "train.num_workers x train.grad_accum), or delete that folder (or set run.output_dir) to "
                        "start over")
    datasets_path = storage.join(train_dir, DATASETS_FILE)
    if not storage.exists(datasets_path):  # written by every run since the record exists
        return
    trained_on = json.loads(storage.read_text(datasets_path))
    for split, fingerprint in datasets.items():
        before = trained_on.get(split)
        fields = fpr.diff(fingerprint, before) if fingerprint and before else [] if fingerprint == before else [
            "input_files"]
        if fields:
            what = fpr.FIELD_FIXES.get(fields[0], fields[0]).replace("data.train_files", f"data.{split}_files")
            raise UserError(f"{train_dir} holds checkpoints of a run trained on another {split} dataset "
                            f"({what}), and training resumes from them; put "
                            "that data and config back to resume, or delete that folder (or set run.output_dir) "
                            "to start over")


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{"model.lora.r": 16, ...}: a nested config's values by dotted key, as the user sets them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _with_absolute_paths(cfg: Config) -> Config:
    """Workers run in another directory: relative local paths would not resolve there."""
    cfg = cfg.model_copy(deep=True)
    for section, key in [("run", "output_dir"), ("model", "policy"), ("model", "reference"), ("model", "tokenizer")]:
        value = getattr(getattr(cfg, section), key)
        if value and not storage.is_uri(value):
            setattr(getattr(cfg, section), key, os.path.abspath(value))
    return cfg


def read_pairs(data: DatasetFolder):
    """The columns training reads, laid out for dpo.batching.Pairs (sorted by pair id, each column
    one array). Each column as read is let go once laid out: one copy of the data, plus one column."""
    from dpo.batching import pairs_batch

    names = schema.TOKEN_COLUMNS + (schema.SCORE_COLUMNS if data.scored else [])
    table = storage.read_parquet_files(data.folder, data.manifest["files"], columns=names)
    columns = {name: table.column(name) for name in names}
    del table
    batch = pairs_batch(columns.pop, names)
    if data.scored:
        refuse_nonfinite_scores(data.folder, batch)
    return batch


def _put_pairs(data: DatasetFolder):
    """The dataset in Ray's object store, once: every worker maps that copy (one per node) instead of
    holding its own, and this process keeps only the reference."""
    import pyarrow as pa
    import ray

    ref = ray.put(read_pairs(data))
    pa.default_memory_pool().release_unused()  # what reading and laying out freed, the allocator would keep
    return ref


def refuse_nonfinite_scores(folder: str, table) -> None:
    """A NaN reference score would turn every loss it touches into NaN; refuse the dataset instead."""
    import numpy as np

    finite = np.ones(table.num_rows, dtype=bool)
    for column in schema.SCORE_COLUMNS:
        values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        finite &= np.isfinite(values)
    if not finite.all():
        ids = [table.column(schema.PAIR_ID)[i].as_py() for i in np.flatnonzero(~finite)[:3]]
        raise UserError(f"{folder} holds non-finite reference scores for {int((~finite).sum())} pair(s), e.g. "
                        f"{ids}; it was not written by this version's precompute, which refuses them. "
                        "Delete it and rerun jobs.precompute_reference")


def train(cfg: Config, train_data: DatasetFolder, eval_data: Optional[DatasetFolder] = None) -> dict:
    """Run DPO training; return the final metrics and where the outputs are."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from dpo.train_loop import ATTEMPTS_FILE, train_loop_per_worker

    validate(cfg, train_data)
    cfg = _with_absolute_paths(cfg)
    t = cfg.train
    train_dir = storage.join(cfg.run.output_dir, "train")
    datasets = {"train": train_data.manifest.get("fingerprint"),
                "eval": eval_data.manifest.get("fingerprint") if eval_data is not None else None}
    _check_resumable(cfg, train_dir, datasets)
    if not complete_steps(storage.join(train_dir, "checkpoints")):
        # A run that starts over gets new tracker runs, and its own record of attempts.
        for name in (RUNS_FILE, ATTEMPTS_FILE):
            storage.delete_file(storage.join(train_dir, name))
    cfg.save(storage.join(train_dir, "config.yaml"))
    storage.write_text(storage.join(train_dir, DATASETS_FILE), json.dumps(datasets, indent=1))

    # Held here until fit() returns: a restarted worker gets the data from these again.
    train_pairs = _put_pairs(train_data)
    eval_pairs = _put_pairs(eval_data) if eval_data is not None else None
    with _start_bounded_by_stall_timeout(cfg) as controller_failure_limit:
        trainer = TorchTrainer(
            train_loop_per_worker,
            # Whole dataset on every rank: the epoch plan, not Ray Data, decides who trains on what.
            train_loop_config={"config": cfg.model_dump(mode="json"), "train_pairs": train_pairs,
                               "eval_pairs": eval_pairs},
            scaling_config=scaling_config(cfg),
            run_config=RunConfig(
                name="ray",
                storage_path=train_dir if storage.is_uri(train_dir) else os.path.abspath(train_dir),
                failure_config=FailureConfig(max_failures=t.max_failures,
                                             controller_failure_limit=controller_failure_limit),
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            ),
        )
        started = time.time()
        try:
            result = trainer.fit()
        except Exception as exc:
            stalled = _group_start_failure(cfg, exc)
            if stalled is None:
                raise
            raise stalled from None
    if result.return_value is not None:  # what stopped training (dpo.train_loop.train_loop_per_worker)
        raise UserError(result.return_value)
    final = dict(result.metrics or {})
    metrics_path = storage.join(train_dir, "metrics.jsonl")
    history = read_metrics(metrics_path)
    report = _draw_report(cfg, train_dir) if history else None
    return {
        "metrics": history[-1] if history else final,
        "steps": history[-1]["step"] if history else 0,
        "train_pairs": train_data.pairs,
        "eval_pairs": eval_data.pairs if eval_data is not None else 0,
        "seconds": round(time.time() - started, 1),
        "metrics_path": metrics_path,
        "report": report,
        "policy": storage.join(train_dir, "policy") if t.save_policy else None,
        "adapter": storage.join(train_dir, ADAPTER_DIR) if t.save_policy and cfg.model.lora.enabled else None,
        "checkpoint": newest(storage.join(train_dir, "checkpoints")),
    }


def _draw_report(cfg: Config, train_dir: str) -> str:
    """train/report.png from metrics.jsonl, drawn on the driver (also when train_dir is a URI)."""
    import tempfile

    from dpo.report import plot_report

    with tempfile.TemporaryDirectory() as tmp:
        png = plot_report(storage.join(train_dir, "metrics.jsonl"), os.path.join(tmp, "report.png"),
                          title=f"{cfg.run.name}: DPO training")
        with open(png, "rb") as fh:
            storage.write_bytes(storage.join(train_dir, "report.png"), fh.read())
    return storage.join(train_dir, "report.png")
