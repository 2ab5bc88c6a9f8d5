"""Training state that survives a restart: checkpoints and the metrics log.

A checkpoint is one folder:

    model.pt       full (unsharded) model state dict
    optimizer.pt   full optimizer state dict, keyed by parameter name
    scheduler.pt   LR scheduler state
    rng.pt         torch / numpy / random states of every rank, by rank
    state.json     {"step": N, "epoch": E, "skipped_batches": S}: the last
                   finished step (the data position follows from it, see
                   dpo.batching) and the batches skipped as non-finite so far

It goes to Ray Train through `ray.train.report`, and rank 0 also publishes it
as `{output_dir}/train/checkpoints/step-{N:08d}/` with a `COMPLETE` file
written last. Ray uploads a reported checkpoint after the call, so a worker
that dies at the wrong moment can lose the newest one; a restart therefore
takes the newest of Ray's checkpoint and our newest complete folder, and never
silently starts again from step 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from typing import Iterator, Optional

import numpy as np
import pyarrow.fs as pafs
import torch

from dpo import storage

COMPLETE = "COMPLETE"
STATE = "state.json"


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- folders


def write(folder: str, *, model_state: dict, optimizer_state: dict, scheduler_state: dict,
          rng_states: list, step: int, epoch: int, skipped_batches: int) -> None:
    torch.save(model_state, os.path.join(folder, "model.pt"))
    torch.save(optimizer_state, os.path.join(folder, "optimizer.pt"))
    torch.save(scheduler_state, os.path.join(folder, "scheduler.pt"))
    torch.save(rng_states, os.path.join(folder, "rng.pt"))
    with open(os.path.join(folder, STATE), "w", encoding="utf-8") as fh:
        json.dump({"step": step, "epoch": epoch, "skipped_batches": skipped_batches}, fh)


def load(folder: str, name: str):
    # weights_only=False: the RNG states hold numpy/random objects; we wrote these files ourselves.
    return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE), encoding="utf-8") as fh:
        return json.load(fh)


def read_step(folder: str) -> int:
    return int(read_state(folder)["step"])


def _subdirs(root: str) -> list[str]:
    fs, path = storage.resolve(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def publish(local_dir: str, root: str, step: int, keep: int) -> str:
    """Copy a checkpoint folder to root/step-N, mark it complete, drop all but the newest `keep`."""
    dest = storage.join(root, f"step-{step:08d}")
    storage.delete_dir(dest)  # a half-written copy from a try that died
    fs, path = storage.resolve(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    storage.write_text(storage.join(dest, COMPLETE), json.dumps({"step": step}))
    done = complete_steps(root)
    for old in done[:-keep]:
        storage.delete_dir(storage.join(root, f"step-{old:08d}"))
    return dest


def complete_steps(root: str) -> list[int]:
    steps = []
    for name in _subdirs(root):
        if name.startswith("step-") and storage.exists(storage.join(root, name, COMPLETE)):
            steps.append(int(name[len("step-"):]))
    return sorted(steps)


@contextlib.contextmanager
def newest(ray_checkpoint, root: str) -> Iterator[Optional[str]]:
    """A local folder holding the newest checkpoint of Ray's and ours; None on a fresh start."""
    own = complete_steps(root)
    with contextlib.ExitStack() as stack:
        ray_dir = stack.enter_context(ray_checkpoint.as_directory()) if ray_checkpoint is not None else None
        ray_step = read_step(ray_dir) if ray_dir else -1
        if own and own[-1] > ray_step:
            src = storage.join(root, f"step-{own[-1]:08d}")
            if storage.is_uri(src):
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="dpo-ckpt-"))
                fs, path = storage.resolve(src)
                pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
                src = tmp
            yield src
        else:
            yield ray_dir


# --------------------------------------------------------------------------- metrics log


class MetricsLog:
    """metrics.jsonl, one object per logged step; written by rank 0 only."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps past `step`: a resumed run logs them again."""
        if not storage.exists(self.path):
            return
        lines = storage.read_text(self.path).splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        if len(kept) != len(lines):
            storage.write_text(self.path, "".join(ln + "\n" for ln in kept))

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


def read_metrics(path: str) -> list[dict]:
    if not storage.exists(path):
        return []
    return [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln.strip()]
