"""Experiment trackers: train.report_to sends every logged metrics record to TensorBoard, Weights & Biases
and MLflow, from rank 0 only, under run.name and with the resolved config.

Ray Train V2 brings no tracker integration of its own (its RunConfig refuses Tune's logger callbacks);
its guide is to call each tracker's own client inside the train function, on rank 0, and that is
what this module does. Where they write, unless the trackers' own environment variables say otherwise:

    {output_dir}/train/tensorboard/        TensorBoard event files
    {output_dir}/train/wandb/              W&B's run folders (WANDB_DIR moves them; WANDB_MODE=offline
                                           keeps the run there instead of uploading it)
    {output_dir}/train/mlflow.db           MLflow's SQLite store (MLFLOW_TRACKING_URI: a tracking server)
    {output_dir}/train/tracker_runs.json   the W&B and MLflow run ids, so that a resumed run continues them,
                                           and the last step each tracker holds

A run that restarts from a checkpoint logs again the steps it took after that checkpoint. TensorBoard drops
the earlier attempt's events for them (purge_step). W&B and MLflow cannot take a step back (W&B ignores a
step below its last, MLflow appends a second point), so each is sent only the steps it does not hold yet:
MLflow holds a step once it is logged (a synchronous write), W&B once its run is finished (an attempt that
dies loses what W&B had not written), so a resumed run sends W&B again the steps since its last finish,
from metrics.jsonl. Each step reaches each tracker once. The steps a tracker keeps from an earlier attempt
were computed from the same checkpoint, seeds and batches as their rerun.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional

from dpo import storage
from dpo.checkpoint import read_metrics
from dpo.config import Config
from dpo.errors import UserError

# The modules each optional tracker needs on rank 0; raydpo's extra of the tracker's name installs them.
# (TensorBoard's writer, tensorboardX, is a core requirement.)
EXTRA_MODULES = {"wandb": ["wandb"], "mlflow": ["mlflow", "sqlalchemy", "alembic"]}
RUNS_FILE = "tracker_runs.json"
STORED_THROUGH = "stored_through_step"  # RUNS_FILE's record, per tracker, of the last step it holds for certain
DEFAULT_PROJECT = "raydpo"


def check_trackers(cfg: Config) -> None:
    """Refuse a tracker of train.report_to that cannot run, on the driver before Ray starts."""
    for name in cfg.train.report_to:
        for module in EXTRA_MODULES.get(name, []):
            if importlib.util.find_spec(module) is None:
                raise UserError(f"train.report_to lists {name} but the {module} package is not installed; "
                                f"install it with pip install 'raydpo[{name}]'")
    if "mlflow" in cfg.train.report_to:
        mlflow_tracking_uri(storage.join(cfg.run.output_dir, "train"))


def mlflow_tracking_uri(train_dir: str) -> Optional[str]:
    """MLflow's store: None where MLFLOW_TRACKING_URI names one (MLflow reads it itself), else SQLite in
    train_dir. MLflow 3 refuses its ./mlruns file store unless told to allow it; SQLite is its local default."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    if storage.is_uri(train_dir):
        raise UserError(f"train.report_to lists mlflow and run.output_dir is an object-store URI ({train_dir}), "
                        "where MLflow's SQLite store cannot be written; set MLFLOW_TRACKING_URI to a tracking server")
    return f"sqlite:///{os.path.abspath(train_dir)}/mlflow.db"


class Trackers:
    """The trackers rank 0 writes to; on the other ranks, and without train.report_to, none.

    `stored` (kept in RUNS_FILE) is, per tracker, the last step it holds for certain: a run that resumes
    after step `start` sends W&B and MLflow only what they lack, and TensorBoard what it logged past `start`
    again (its purge_step drops the earlier attempt's events)."""

    def __init__(self, writers: dict, runs: dict, runs_path: str) -> None:
        self._writers = writers
        self._runs = runs
        self._runs_path = runs_path

    @property
    def _stored(self) -> dict:
        return self._runs.setdefault(STORED_THROUGH, {})

    def log(self, metrics: dict, step: int) -> None:
        """One metrics.jsonl record."""
        stored = dict(self._stored)
        for name, writer in self._writers.items():
            if writer.replaces_resent_steps or step > self._stored.get(name, 0):
                writer.log(_scalars(metrics), step)
                if writer.stores_at_once:
                    self._stored[name] = max(step, self._stored.get(name, 0))
        if self._stored != stored:
            self._save()

    def send_missing(self, records: list[dict], start: int) -> None:
        """Before a resumed run goes on after step `start`: the records up to it that a tracker may lack (W&B
        holds what an attempt logged only once that attempt finished its run)."""
        for name, writer in self._writers.items():
            for record in records:
                if self._stored.get(name, 0) < record["step"] <= start and not writer.replaces_resent_steps:
                    writer.log(_scalars(record), record["step"])
        self._save()

    def close(self) -> None:
        for name, writer in self._writers.items():
            writer.close()
            self._stored[name] = max(writer.last_step, self._stored.get(name, 0))
        self._save()
        self._writers = {}

    def _save(self) -> None:
        if self._writers:
            storage.write_text(self._runs_path, json.dumps(self._runs))


def _scalars(record: dict) -> dict:
    """A metrics.jsonl record's numbers but the step. Its None values stand for non-finite ones: left out, as
    in a plot gap."""
    return {key: float(value) for key, value in record.items() if key != "step" and isinstance(value, (int, float))}


def open_trackers(cfg: Config, train_dir: str, rank: int, start: int) -> Trackers:
    """The trackers of train.report_to for a run resuming after step `start` (0: none done).

    A restarted or resumed run continues the W&B and MLflow runs it began (their ids are kept in
    train/tracker_runs.json, which dpo.launch deletes when a run starts over): one tracker run per
    training run, however often it restarts, and each step in each tracker once.
    """
    names = cfg.train.report_to
    runs_path = storage.join(train_dir, RUNS_FILE)
    if rank != 0 or not names:
        return Trackers({}, {}, runs_path)
    runs = json.loads(storage.read_text(runs_path)) if storage.exists(runs_path) else {}
    writers: dict = {}
    if "tensorboard" in names:
        writers["tensorboard"] = _TensorBoard(cfg, train_dir, start)
    for name, kind in (("wandb", _WandB), ("mlflow", _MLflow)):
        if name in names:
            writers[name] = kind(cfg, train_dir, runs.get(name))
            runs[name] = writers[name].run_id
    trackers = Trackers(writers, runs, runs_path)
    trackers.send_missing(read_metrics(storage.join(train_dir, "metrics.jsonl")), start)
    return trackers


def _project(cfg: Config, env_var: str) -> str:
    return cfg.train.tracker_project or os.environ.get(env_var) or DEFAULT_PROJECT


class _TensorBoard:
    replaces_resent_steps = True  # purge_step drops the earlier attempt's events
    stores_at_once = True  # flushed at every log

    last_step = 0

    def __init__(self, cfg: Config, train_dir: str, start: int) -> None:
        from tensorboardX import SummaryWriter

        # TensorBoard drops the events an earlier attempt wrote from purge_step on: those a stopped or
        # failed run logged after the checkpoint it resumes from, which it logs again.
        self._writer = SummaryWriter(storage.join(train_dir, "tensorboard"), purge_step=start + 1)
        if start == 0:  # the resolved config in the Text tab, as a Markdown code block
            self._writer.add_text("config", "".join(f"    {line}\n" for line in cfg.to_yaml().splitlines()), 0)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()
        self.last_step = step

    def close(self) -> None:
        self._writer.close()


class _WandB:
    replaces_resent_steps = False
    stores_at_once = False  # what a run logged is written for certain when it finishes
    last_step = 0

    def __init__(self, cfg: Config, train_dir: str, run_id: Optional[str]) -> None:
        import wandb

        local = not (os.environ.get("WANDB_DIR") or storage.is_uri(train_dir))
        self._run = wandb.init(project=_project(cfg, "WANDB_PROJECT"), name=cfg.run.name, id=run_id,
                               resume="allow", config=cfg.model_dump(mode="json"),
                               dir=train_dir if local else None,
                               # Ray already sends the worker's output to the driver's log.
                               settings=wandb.Settings(console="off"))
        self.run_id = self._run.id

    def log(self, scalars: dict, step: int) -> None:
        self._run.log(scalars, step=step)
        self.last_step = step

    def close(self) -> None:
        self._run.finish()


class _MLflow:
    replaces_resent_steps = False
    stores_at_once = True  # log_metrics returns once its store holds the points
    last_step = 0

    def __init__(self, cfg: Config, train_dir: str, run_id: Optional[str]) -> None:
        import mlflow

        uri = mlflow_tracking_uri(train_dir)
        if uri:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(_project(cfg, "MLFLOW_EXPERIMENT_NAME"))
        self.run_id = mlflow.start_run(run_id=run_id, run_name=cfg.run.name).info.run_id
        if run_id is None:  # a resumed run keeps the params it started with: MLflow refuses to change one
            mlflow.log_params(_params(cfg.model_dump(mode="json")))

    def log(self, scalars: dict, step: int) -> None:
        import mlflow

        mlflow.log_metrics(scalars, step=step)
        self.last_step = step

    def close(self) -> None:
        import mlflow

        mlflow.end_run()


def _params(tree: dict, prefix: str = "") -> dict:
    """The resolved config as MLflow params: one per dotted key, each value cut to MLflow's length limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[prefix + key] = text[:MAX_PARAM_VAL_LENGTH]
    return flat
