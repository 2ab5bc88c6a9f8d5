"""The knobs of the losses, each with its default, and the error that names the one at fault: their one home.

A module of its own, importing nothing, because both sides read it: dpo.losses,
which stays torch-only, takes them as ``**options``; dpo.config, which must load
without torch, offers each field as a ``train.<name>`` key of the same type and
default.
"""

from dataclasses import dataclass, fields
from typing import Optional

# The two knobs every loss takes: preference_loss's beta and label_smoothing, train.beta and train.label_smoothing.
BETA = 0.1
LABEL_SMOOTHING = 0.0


class LossArgumentError(ValueError):
    """A loss argument that cannot be used; the message starts with the argument's name, `key`, which is also
    its train.<key> config key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class LossOptions:
    # One weight per train.loss_type entry; None weighs every loss 1.0.
    loss_weights: Optional[list[float]] = None
    # SimPO's target margin γ (TRL CPOConfig's default).
    simpo_gamma: float = 0.5
    # α of alpha_divergence (TRL's default, where its α and ours agree); named apart from model.lora.alpha.
    divergence_alpha: float = 0.5
    # DiscoPOP's temperature τ (TRL's default, the paper's value).
    discopop_tau: float = 0.05
    # BCO's reward shift δ: TRL keeps it as a running mean in trainer state, which a pure loss cannot.
    bco_delta: float = 0.0


LOSS_OPTION_NAMES = tuple(f.name for f in fields(LossOptions))
