"""Training state that survives a restart: checkpoints and the metrics log.

`TrainState` is what a checkpoint saves of a worker; `save` and `restore` are
the whole protocol, every rank taking part.

A checkpoint is one folder, `{output_dir}/train/checkpoints/step-{N:08d}/`:

    .metadata, __R_0.distcp   the weights and the AdamW state, written by
                   torch.distributed.checkpoint (DCP): rank R writes only the
                   shards it holds (under fsdp, 1/world of every tensor; under
                   ddp, where every rank holds every tensor, DCP writes each
                   tensor once, from one rank)
    scheduler.pt   LR scheduler state
    state.json     {"step": N, "epoch": E, "skipped_batches": S}: the last
                   finished step (the data position follows from it, see
                   dpo.batching) and the batches skipped as non-finite so far
    COMPLETE       written last, once every rank's files are in place

Nothing in it is per rank: DCP reads the shards into any number of ranks,
under ddp and fsdp alike, and no RNG state is kept, since the training loop
seeds each micro-batch's random draws from (seed, step, micro-batch) alone
(dpo.batching.micro_batch_seed). So a run resumes on any number of workers.
A checkpoint written before that holds an rng.pt, by rank, which is not read.

Every rank writes straight into that folder and reads its own shards straight
from it (a local or shared path, or a URI through DCP's fsspec writer), so a
checkpoint is stored once and never passes through one rank. Ray Train gets a
pointer: `ray.train.report` copies a reported folder into its run folder
(`train/ray/checkpoint-N/`), so what it receives is a folder holding only
state.json, which names the step. Ray registers a report after the
call returns, so a worker that dies at the wrong moment can lose the newest
one; a restart therefore takes our newest complete folder, which is never
older than Ray's latest, and never silently starts again from step 0.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from dpo import storage

COMPLETE = "COMPLETE"
STATE = "state.json"


@dataclass
class TrainState:
    """What a checkpoint saves of a worker, and a restart restores."""

    model: torch.nn.Module      # as the step runs it (DDP, FSDP): its trained parameters as this rank holds them
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int = 0               # the last step done
    skipped: int = 0            # batches skipped as non-finite up to `step`


def _tensors(state: TrainState) -> dict:
    """What a checkpoint holds of the model and the optimizer, as this rank holds it (under fsdp, its DTensor
    shards), keyed by parameter name (PolicyLogps's, `lm.`-prefixed): the one place that says which tensors
    a checkpoint saves and restores.

    What it holds of the model: the parameters that train, as this rank holds them. All of them, or under
    model.lora the adapters alone (dpo.lora): the frozen base is model.policy's, read again by a restore."""
    # Imported here, as DCP is below: a job's driver reads checkpoint folders with this module and never needs
    # torch.distributed.checkpoint (0.6 CPU-seconds of import).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(state.model, options=StateDictOptions(ignore_frozen_params=True)),
            "optimizer": get_optimizer_state_dict(state.model, state.optimizer)}


def restore(state: TrainState, train_dir: str, *, lora: bool) -> Optional[dict]:
    """Load the newest complete checkpoint into `state`; each rank reads only the shards it holds.

    Returns its state.json, None on a fresh start.
    """
    dest = newest(storage.join(train_dir, "checkpoints"))
    if dest is None:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    tensors = _tensors(state)  # the optimizer's state tensors are made here, zero, to be read into
    read_shards(dest, tensors)
    # Under model.lora the checkpoint holds only the adapters: the base stays as loaded.
    set_model_state_dict(state.model, tensors["model"], options=StateDictOptions(strict=not lora))
    set_optimizer_state_dict(state.model, state.optimizer, tensors["optimizer"])
    state.scheduler.load_state_dict(load(dest, "scheduler.pt"))
    saved = read_state(dest)
    state.step, state.skipped = int(saved["step"]), int(saved["skipped_batches"])
    return saved


def save(state: TrainState, train_dir: str, *, rank: int, epoch: int, total_steps: int, keep: int,
         metrics: dict) -> None:
    """Every rank writes its shards into the step's folder; rank 0 then the small states, COMPLETE, and the
    report to Ray Train of a pointer to it."""
    import ray.train

    root = storage.join(train_dir, "checkpoints")
    dest = begin(root, state.step) if rank == 0 else folder(root, state.step)
    if dist.is_initialized():
        dist.barrier()  # no rank writes before rank 0 has emptied the folder
    write_shards(dest, _tensors(state))
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    write_states(dest, scheduler_state=state.scheduler.state_dict(), step=state.step, epoch=epoch,
                 skipped_batches=state.skipped, total_steps=total_steps)
    # dcp.save returns on every rank once the last rank's files and the metadata are written.
    finish(root, state.step, keep)
    with tempfile.TemporaryDirectory(prefix="dpo-ckpt-") as tmp:
        ray.train.report({**metrics, "step": state.step}, checkpoint=ray.train.Checkpoint.from_directory(
            pointer(tmp, state.step)), checkpoint_dir_name=f"checkpoint-{state.step:08d}")


# --------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- folders


def folder(root: str, step: int) -> str:
    return storage.join(root, f"step-{step:08d}")


def begin(root: str, step: int) -> str:
    """An empty folder for step `step`'s checkpoint (rank 0, before any rank writes to it)."""
    dest = folder(root, step)
    storage.delete_dir(dest)  # a half-written one from a try that died
    storage.makedirs(dest)
    return dest


def write_states(dest: str, *, scheduler_state: dict, step: int, epoch: int, skipped_batches: int,
                 total_steps: int) -> None:
    """The small, whole states beside the shards (rank 0); `total_steps` is the LR schedule's horizon."""
    storage.write_bytes(storage.join(dest, "scheduler.pt"), _torch_bytes(scheduler_state))
    storage.write_text(storage.join(dest, STATE), json.dumps({"step": step, "epoch": epoch,
                                                               "skipped_batches": skipped_batches,
                                                               "total_steps": total_steps}))


def finish(root: str, step: int, keep: int) -> None:
    """Mark step `step`'s checkpoint complete (every rank's files are in), drop all but the newest `keep`."""
    storage.write_text(storage.join(folder(root, step), COMPLETE), json.dumps({"step": step}))
    for old in complete_steps(root)[:-keep]:
        storage.delete_dir(folder(root, old))


def write_shards(dest: str, state: dict) -> None:
    """Every rank, together: the tensors of `state` that this rank holds (DTensors: its shards) into `dest`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=dest)


def read_shards(dest: str, state: dict) -> None:
    """Every rank, together: fill `state`'s tensors, in place, from `dest`; each rank reads only what its
    tensors hold (DTensors: its shards), whichever ranks wrote them."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=dest)


def pointer(local_dir: str, step: int) -> str:
    """Fill `local_dir` with what Ray Train is given of step `step`'s checkpoint: its step, no weights."""
    with open(os.path.join(local_dir, STATE), "w", encoding="utf-8") as fh:
        json.dump({"step": step}, fh)
    return local_dir


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load(dest: str, name: str):
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(dest, name))), map_location="cpu")


def read_state(dest: str) -> dict:
    return json.loads(storage.read_text(storage.join(dest, STATE)))


def _subdirs(root: str) -> list[str]:
    fs, path = storage.resolve(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def complete_steps(root: str) -> list[int]:
    steps = []
    for name in _subdirs(root):
        if name.startswith("step-") and storage.exists(storage.join(root, name, COMPLETE)):
            steps.append(int(name[len("step-"):]))
    return sorted(steps)


def newest(root: str) -> Optional[str]:
    """The folder of the newest complete checkpoint; None on a fresh start.

    Ray's latest pointer never names a newer one (a folder is complete before it is reported) but may name
    an older one (its report was lost), so the choice is ours alone."""
    own = complete_steps(root)
    return folder(root, own[-1]) if own else None


# --------------------------------------------------------------------------- metrics log


class JsonLines:
    """A file of one JSON object a line, appended to by rank 0 only."""

    def __init__(self, path: str):
        self.path = path

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if storage.is_uri(self.path):  # object stores cannot append
            old = storage.read_text(self.path) if storage.exists(self.path) else ""
            storage.write_text(self.path, old + line)
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


class MetricsLog(JsonLines):
    """metrics.jsonl, one object per logged step."""

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps past `step`: a resumed run logs them again."""
        if not storage.exists(self.path):
            return
        lines = storage.read_text(self.path).splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        if len(kept) != len(lines):
            storage.write_text(self.path, "".join(ln + "\n" for ln in kept))


def read_metrics(path: str) -> list[dict]:
    """The records of a JsonLines file (metrics.jsonl, attempts.jsonl); none if it does not exist."""
    if not storage.exists(path):
        return []
    return [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln.strip()]
