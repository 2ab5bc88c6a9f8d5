"""The learning-rate schedule: the run's horizon in steps, the curve over it, and a resume over another horizon."""

from __future__ import annotations

import math
from typing import Optional

import torch

from dpo.config import TrainConfig


def training_steps(t: TrainConfig, steps_per_epoch: int) -> tuple[int, Optional[str]]:
    """The run's steps, which are the LR schedule's horizon: train.max_steps, but at most train.epochs epochs;
    and the line that says so when the epochs cap train.max_steps (else None)."""
    by_epochs = t.epochs * steps_per_epoch
    if t.max_steps is None or t.max_steps <= by_epochs:
        return t.max_steps or by_epochs, None
    return by_epochs, (f"train.max_steps={t.max_steps} is capped at {by_epochs} steps by train.epochs={t.epochs} "
                       f"({steps_per_epoch} steps an epoch); raise train.epochs to train longer")


def resumed_schedule(t: TrainConfig, optimizer, scheduler, saved_total: int, total: int, step: int):
    """(scheduler, line) for a run resumed after `step` whose checkpoint's schedule ran over `saved_total` steps.

    The same horizon: the restored scheduler, and None. Another (train.max_steps or train.epochs changed):
    a scheduler on the new curve from step + 1 on, which also sets the optimizer's LR (restored from the old
    curve), and the line that says so: both horizons, and step + 1's LR on each.
    """
    if saved_total == total:
        return scheduler, None
    before, after = (t.learning_rate * lr_schedule(t, n)(step) for n in (saved_total, total))
    # LambdaLR's first step, at construction, moves last_epoch from step - 1 to step: step + 1's LR.
    resumed = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, total), last_epoch=step - 1)
    return resumed, (f"resuming after step {step} with an LR schedule over {total} steps instead of {saved_total} "
                     f"(train.max_steps or train.epochs changed): step {step + 1}'s learning rate is {after:.6g}, "
                     f"not {before:.6g}")


def lr_schedule(t: TrainConfig, total: int):
    """LambdaLR factor of step s (0-based): linear warmup, then linear/cosine/constant decay to 0."""
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if t.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return 1.0 - progress if t.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
