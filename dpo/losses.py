"""Preference-optimisation losses as pure functions of sequence log-probabilities.

Everything here works on per-pair *sequence* log-probabilities, i.e. tensors of
shape ``[B]`` (one entry per preference pair): the policy's and the frozen
reference's log-probability of the chosen and of the rejected response.  Nothing
here touches a model, so the same code serves the trainer, the tests and any
offline analysis of cached reference scores.

Notation used in every docstring below::

    π_c, π_r   policy log-probs of the chosen / rejected response        [B]
    ρ_c, ρ_r   reference log-probs of the chosen / rejected response     [B]
    r_c = π_c - ρ_c,  r_r = π_r - ρ_r   (log-ratios, "implicit rewards" / β)
    h   = r_c - r_r = (π_c - π_r) - (ρ_c - ρ_r)                          [B]
    |y_c|, |y_r|  response lengths in tokens (``chosen_lengths``/``rejected_lengths``)
    σ = sigmoid, β = ``beta``, ε = ``label_smoothing``

The names of the losses are TRL's ``DPOConfig.loss_type`` names (plus ``simpo``
from TRL's CPO trainer and the four ``f_divergence_type`` values of TRL, which
are exposed here as loss names of their own).

The single entry point is :func:`preference_loss`; :class:`LossType` says what
each loss needs (a reference, response lengths, the whole batch);
:class:`LossOptions` (from dpo.loss_options) holds the knobs of single losses
and their defaults. :func:`check_loss_config` runs the same argument checks
without tensors, so a config can be validated before any worker starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from dpo.loss_options import BETA, LABEL_SMOOTHING, LOSS_OPTION_NAMES, LossArgumentError, LossOptions

__all__ = [
    "LossOptions",
    "LossOutput",
    "LossType",
    "PreferenceBatch",
    "check_loss_config",
    "preference_loss",
]

# exp() arguments are clamped here so that exp never overflows float32
# (exp(80) ~ 5.5e34 < 3.4e38); beyond the clamp the gradient of that term is 0.
_MAX_EXP = 80.0


class LossOutput(NamedTuple):
    """What :func:`preference_loss` returns; every field has shape ``[B]``.

    ``losses`` carries gradients; the rewards are detached, for logging.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class LossType(str, Enum):
    """The losses :func:`preference_loss` knows, valued by TRL's names.

    Members know what they need (see the properties), so callers ask the
    member rather than keeping their own lists of names.
    """

    SIGMOID = "sigmoid"
    HINGE = "hinge"
    IPO = "ipo"
    EXO_PAIR = "exo_pair"
    NCA_PAIR = "nca_pair"
    ROBUST = "robust"
    BCO_PAIR = "bco_pair"
    SPPO_HARD = "sppo_hard"
    AOT = "aot"
    AOT_UNPAIRED = "aot_unpaired"
    APO_ZERO = "apo_zero"
    APO_DOWN = "apo_down"
    DISCOPOP = "discopop"
    SFT = "sft"
    SIGMOID_NORM = "sigmoid_norm"
    SIMPO = "simpo"
    # TRL's f_divergence_type values, usable here as loss types of their own.
    REVERSE_KL = "reverse_kl"
    FORWARD_KL = "forward_kl"
    JS_DIVERGENCE = "js_divergence"
    ALPHA_DIVERGENCE = "alpha_divergence"

    def __str__(self) -> str:  # "sigmoid", not "LossType.SIGMOID", in messages
        return self.value

    @classmethod
    def names(cls) -> list[str]:
        return [m.value for m in cls]

    @classmethod
    def parse(cls, name: Union[str, "LossType"]) -> "LossType":
        """``"sigmoid"`` -> ``LossType.SIGMOID``; ValueError listing valid names otherwise."""
        if isinstance(name, cls):
            return name
        if isinstance(name, str):
            key = name.strip().lower()
            for member in cls:
                if member.value == key:
                    return member
        raise LossArgumentError(
            "loss_type", f"loss_type: unknown loss type {name!r}; valid loss types are: {', '.join(cls.names())}"
        )

    @property
    def needs_reference(self) -> bool:
        """False for the losses that never look at reference log-probs (simpo, sft)."""
        return self not in _REFERENCE_FREE

    @property
    def length_normalized(self) -> bool:
        """True for the losses that divide log-probs by the response lengths."""
        return self in _LENGTH_NORMALIZED

    @property
    def batch_level(self) -> bool:
        """True for the losses whose i-th entry depends on the whole batch (they sort it)."""
        return self in _BATCH_LEVEL

    @property
    def uses_label_smoothing(self) -> bool:
        """True for the losses that read ``label_smoothing``; the others ignore it."""
        return self in _LABEL_SMOOTHED

    @property
    def option_names(self) -> frozenset:
        """Names of the ``**options`` this loss reads (besides beta/label_smoothing)."""
        return _OPTIONS_READ.get(self, frozenset())


_REFERENCE_FREE = frozenset({LossType.SIMPO, LossType.SFT})


def needs_reference(loss_types: Sequence[Union[str, LossType]]) -> bool:
    """Whether any of these losses reads the reference's log-probs: the one rule for scoring, the datasets
    training reads, and the loss's inputs."""
    return any(LossType.parse(name).needs_reference for name in loss_types)
_LENGTH_NORMALIZED = frozenset({LossType.IPO, LossType.SIGMOID_NORM, LossType.SIMPO})
_BATCH_LEVEL = frozenset({LossType.AOT, LossType.AOT_UNPAIRED})
_LABEL_SMOOTHED = frozenset(
    {
        LossType.SIGMOID,
        LossType.ROBUST,
        LossType.EXO_PAIR,
        LossType.AOT,
        LossType.AOT_UNPAIRED,
        LossType.SIGMOID_NORM,
        LossType.SIMPO,
        LossType.REVERSE_KL,
        LossType.FORWARD_KL,
        LossType.JS_DIVERGENCE,
        LossType.ALPHA_DIVERGENCE,
    }
)
_OPTIONS_READ = {
    LossType.BCO_PAIR: frozenset({"bco_delta"}),
    LossType.DISCOPOP: frozenset({"discopop_tau"}),
    LossType.SIMPO: frozenset({"simpo_gamma"}),
    LossType.ALPHA_DIVERGENCE: frozenset({"divergence_alpha"}),
}
assert set().union(*_OPTIONS_READ.values()) <= set(LOSS_OPTION_NAMES), "every option read needs a LossOptions field"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PreferenceBatch:
    """The validated float32 inputs every loss function receives.

    All tensors have shape ``[B]``. ``ref_*`` are None for a reference-free
    call; lengths are None when not given and otherwise clamped to >= 1 (as
    TRL does) so an empty response never divides by zero.
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor]
    ref_rejected_logps: Optional[torch.Tensor]
    chosen_lengths: Optional[torch.Tensor]
    rejected_lengths: Optional[torch.Tensor]
    beta: float
    label_smoothing: float
    options: LossOptions = field(default_factory=LossOptions)

    def logratios(self, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_c, r_r)``: the reference counts as 0 when absent; ``normalized``
        divides them by the lengths."""
        r_c, r_r = self.policy_chosen_logps, self.policy_rejected_logps
        if self.ref_chosen_logps is not None:
            r_c = r_c - self.ref_chosen_logps
            r_r = r_r - self.ref_rejected_logps
        if normalized:
            r_c = r_c / self.chosen_lengths
            r_r = r_r / self.rejected_lengths
        return r_c, r_r


def _smoothed_logistic(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-ε)·logσ(x) - ε·logσ(-x): the logistic loss against a soft label 1-ε."""
    loss = -F.logsigmoid(x)
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-x)
    return loss


def _capped_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.clamp(x, max=_MAX_EXP))


# --------------------------------------------------------------------------- losses
# Each takes a PreferenceBatch and returns the per-pair loss, shape [B].


def sigmoid_loss(b: PreferenceBatch) -> torch.Tensor:
    """DPO's logistic loss, with conservative-DPO label smoothing.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        L = -(1-ε)·logσ(β·h) - ε·logσ(-β·h),   h = (π_c - π_r) - (ρ_c - ρ_r)

    ε = 0 is the DPO loss. ε > 0 treats each label as flipped with probability
    ε (conservative DPO); the loss then has a finite optimum h* = log((1-ε)/ε)/β.
    As β -> 0 the reference is ignored.

    Papers: Rafael Rafailov, Archit Sharma, Eric Mitchell, Stefano Ermon,
    Christopher D. Manning, Chelsea Finn. "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model." arXiv:2305.18290.
    Conservative DPO: Eric Mitchell, "A note on DPO with noisy preferences &
    relationship to IPO" (2023, technical note, no arXiv id).
    """
    r_c, r_r = b.logratios()
    return _smoothed_logistic(b.beta * (r_c - r_r), b.label_smoothing)


def hinge_loss(b: PreferenceBatch) -> torch.Tensor:
    """SLiC's hinge loss on the reference-normalised margin.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        L = max(0, 1 - β·h)

    (1/β plays the role of SLiC's margin δ.)

    Paper: Yao Zhao, Rishabh Joshi, Tianqi Liu, Misha Khalman, Mohammad Saleh,
    Peter J. Liu. "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback." arXiv:2305.10425.
    """
    r_c, r_r = b.logratios()
    return torch.relu(1.0 - b.beta * (r_c - r_r))


def ipo_loss(b: PreferenceBatch) -> torch.Tensor:
    """IPO: squared regression of the length-normalised margin onto 1/(2β).

    Shapes: π_c, π_r, ρ_c, ρ_r, |y_c|, |y_r|: [B] -> losses [B].

        h̄ = r_c/|y_c| - r_r/|y_r|
        L = (h̄ - 1/(2β))²

    β is the paper's regulariser τ (Eq. 17). As in TRL, the log-ratios are
    averaged per token, which keeps the target 1/(2β) meaningful for responses
    of any length (TRL confirmed this with the IPO authors).

    Paper: Mohammad Gheshlaghi Azar, Mark Rowland, Bilal Piot, Daniel Guo,
    Daniele Calandriello, Michal Valko, Rémi Munos. "A General Theoretical
    Paradigm to Understand Learning from Human Preferences." arXiv:2310.12036.
    """
    r_c, r_r = b.logratios(normalized=True)
    return (r_c - r_r - 1.0 / (2.0 * b.beta)) ** 2


def robust_loss(b: PreferenceBatch) -> torch.Tensor:
    """Robust DPO: an unbiased estimate of the DPO loss under label noise ε.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        L = ( -(1-ε)·logσ(β·h) + ε·logσ(-β·h) ) / (1 - 2ε),   0 <= ε < 1/2

    ε is the probability that a label was flipped. Unlike conservative DPO the
    optimum stays at h -> ∞; the ε term de-biases the gradient. Equivalently
    L = -logσ(β·h) - ε·β·h/(1-2ε).

    Paper: Sayak Ray Chowdhury, Anush Kini, Nagarajan Natarajan. "Provably
    Robust DPO: Aligning Language Models with Noisy Feedback."
    arXiv:2403.00409.
    """
    r_c, r_r = b.logratios()
    x = b.beta * (r_c - r_r)
    eps = b.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)


def exo_pair_loss(b: PreferenceBatch) -> torch.Tensor:
    """EXO (pairwise): reverse KL from the policy's pair distribution to a smoothed label.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        q = σ(β·h)                (the policy's probability that chosen wins)
        L = KL([q, 1-q] || [1-ε, ε])
          = q·(logσ(β·h) - log(1-ε)) + (1-q)·(logσ(-β·h) - log ε),   0 < ε < 1

    Minimal (zero) at β·h = log((1-ε)/ε); the paper recommends ε = 1e-3.

    Paper: Haozhe Ji, Cheng Lu, Yilin Niu, Pei Ke, Hongning Wang, Jun Zhu,
    Jie Tang, Minlie Huang. "Towards Efficient Exact Optimization of Language
    Model Alignment." arXiv:2402.00856 (Eq. 16).
    """
    r_c, r_r = b.logratios()
    x = b.beta * (r_c - r_r)
    eps = b.label_smoothing
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )


def nca_pair_loss(b: PreferenceBatch) -> torch.Tensor:
    """NCA (pairwise): noise-contrastive alignment on the absolute implicit rewards.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        L = -logσ(β·r_c) - ½·logσ(-β·r_c) - ½·logσ(-β·r_r)

    Unlike DPO it pushes the chosen likelihood up in absolute terms, not only
    relative to the rejected one.

    Paper: Huayu Chen, Guande He, Lifan Yuan, Ganqu Cui, Hang Su, Jun Zhu.
    "Noise Contrastive Alignment of Language Models with Explicit Rewards."
    arXiv:2402.05369.
    """
    r_c, r_r = b.logratios()
    return (
        -F.logsigmoid(b.beta * r_c)
        - 0.5 * F.logsigmoid(-b.beta * r_c)
        - 0.5 * F.logsigmoid(-b.beta * r_r)
    )


def bco_pair_loss(b: PreferenceBatch) -> torch.Tensor:
    """BCO (pairwise): a binary classifier, chosen = 1 and rejected = 0, on shifted rewards.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].  Option ``bco_delta`` (float, δ).

        L = -logσ(β·r_c - δ) - logσ(-(β·r_r - δ))

    The paper's δ is a running mean of the rewards β·r over training; TRL keeps
    it as trainer state. A pure function cannot, so the caller passes it as
    ``bco_delta`` (default 0, which is what TRL's current DPOTrainer uses).

    Paper: Seungjae Jung, Gunsoo Han, Daniel Wontae Nam, Kyoung-Woon On.
    "Binary Classifier Optimization for Large Language Model Alignment."
    arXiv:2404.04656.
    """
    r_c, r_r = b.logratios()
    delta = float(b.options.bco_delta)
    return -F.logsigmoid(b.beta * r_c - delta) - F.logsigmoid(-(b.beta * r_r - delta))


def sppo_hard_loss(b: PreferenceBatch) -> torch.Tensor:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected).

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        L = (r_c - 1/(2β))² + (r_r + 1/(2β))²

    The paper's Eq. (4.7) regresses each log-ratio onto (P(win) - ½)/β with P
    estimated by a preference model; the hard version sets P to 1 and 0.

    Paper: Yue Wu, Zhiqing Sun, Huizhuo Yuan, Kaixuan Ji, Yiming Yang,
    Quanquan Gu. "Self-Play Preference Optimization for Language Model
    Alignment." arXiv:2405.00675.
    """
    r_c, r_r = b.logratios()
    half_over_beta = 0.5 / b.beta
    return (r_c - half_over_beta) ** 2 + (r_r + half_over_beta) ** 2


def aot_loss(b: PreferenceBatch) -> torch.Tensor:
    """AOT (paired): stochastic dominance of the policy's log-ratio distribution.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B], BATCH-LEVEL.

        u = sort_B(π_c - π_r),  v = sort_B(ρ_c - ρ_r)     (ascending, over the batch)
        L_i = -(1-ε)·logσ(β·(u_i - v_i)) - ε·logσ(-β·(u_i - v_i))

    Sorting matches quantiles of the two distributions (1-D optimal transport),
    so entry i belongs to the i-th quantile, not to pair i: only the batch mean
    is meaningful, and the loss changes with the batch composition.

    Paper: Igor Melnyk, Youssef Mroueh, Brian Belgodere, Mattia Rigotti,
    Apoorva Nitsure, Mikhail Yurochkin, Kristjan Greenewald, Jiri Navratil,
    Jerret Ross. "Distributional Preference Alignment of LLMs via Optimal
    Transport." arXiv:2406.05882.
    """
    u, _ = torch.sort(b.policy_chosen_logps - b.policy_rejected_logps, dim=0)
    v, _ = torch.sort(b.ref_chosen_logps - b.ref_rejected_logps, dim=0)
    return _smoothed_logistic(b.beta * (u - v), b.label_smoothing)


def aot_unpaired_loss(b: PreferenceBatch) -> torch.Tensor:
    """AOT (unpaired): chosen log-ratios should dominate rejected ones in distribution.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B], BATCH-LEVEL.

        u = sort_B(r_c),  v = sort_B(r_r)     (ascending, over the batch)
        L_i = -(1-ε)·logσ(β·(u_i - v_i)) - ε·logσ(-β·(u_i - v_i))

    Entry i belongs to the i-th quantile, not to pair i (see :func:`aot_loss`).

    Paper: Melnyk et al. "Distributional Preference Alignment of LLMs via
    Optimal Transport." arXiv:2406.05882.
    """
    r_c, r_r = b.logratios()
    u, _ = torch.sort(r_c, dim=0)
    v, _ = torch.sort(r_r, dim=0)
    return _smoothed_logistic(b.beta * (u - v), b.label_smoothing)


def apo_zero_loss(b: PreferenceBatch) -> torch.Tensor:
    """APO-zero: raise the chosen likelihood, lower the rejected one (anchored at 0).

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        L = (1 - σ(β·r_c)) + σ(β·r_r)

    For data whose chosen answers are better than the model's own outputs.

    Paper: Karel D'Oosterlinck, Winnie Xu, Chris Develder, Thomas Demeester,
    Amanpreet Singh, Christopher Potts, Douwe Kiela, Shikib Mehri. "Anchored
    Preference Optimization and Contrastive Revisions: Addressing
    Underspecification in Alignment." arXiv:2408.06266 (Eq. 7).
    """
    r_c, r_r = b.logratios()
    return (1.0 - torch.sigmoid(b.beta * r_c)) + torch.sigmoid(b.beta * r_r)


def apo_down_loss(b: PreferenceBatch) -> torch.Tensor:
    """APO-down: lower both likelihoods, the rejected one more.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        L = σ(β·r_c) + (1 - σ(β·(r_c - r_r)))

    For data whose chosen answers are worse than the model's own outputs.

    Paper: D'Oosterlinck et al. "Anchored Preference Optimization and
    Contrastive Revisions: Addressing Underspecification in Alignment."
    arXiv:2408.06266 (Eq. 8).
    """
    r_c, r_r = b.logratios()
    return torch.sigmoid(b.beta * r_c) + (1.0 - torch.sigmoid(b.beta * (r_c - r_r)))


def discopop_loss(b: PreferenceBatch) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss: a logistic-exponential blend.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].  Option ``discopop_tau`` (τ > 0).

        x = β·h,   m = σ(x/τ)
        L = (1 - m)·(-logσ(x)) + m·exp(-x)

    Computed as σ(-x/τ)·(-logσ(x)) + exp(-x + logσ(x/τ)), the same value,
    which stays finite for very negative x (where exp(-x) alone overflows and
    TRL's form gives inf·0 = NaN). The loss is not monotone near x = 0.

    Paper: Chris Lu, Samuel Holt, Claudio Fanconi, Alex J. Chan, Jakob
    Foerster, Mihaela van der Schaar, Robert Tjarko Lange. "Discovering
    Preference Optimization Algorithms with and for Large Language Models."
    arXiv:2406.08414 (Eq. 5).
    """
    r_c, r_r = b.logratios()
    x = b.beta * (r_c - r_r)
    tau = float(b.options.discopop_tau)
    logistic = -F.logsigmoid(x) * torch.sigmoid(-x / tau)
    exponential = _capped_exp(-x + F.logsigmoid(x / tau))
    return logistic + exponential


def sft_loss(b: PreferenceBatch) -> torch.Tensor:
    """Negative log-likelihood of the chosen response (reference-free).

    Shapes: π_c: [B], optional |y_c|: [B] -> losses [B].

        L = -π_c / |y_c|     (per-token mean, when chosen_lengths is given)
        L = -π_c             (when it is not)

    With lengths this is the per-token NLL, the scale of TRL's sft/RPO term;
    TRL averages over all chosen tokens of the batch (a token-weighted mean),
    while here each pair's mean counts once, which is what a per-pair [B]
    output can express. If the caller already averages log-probs, it passes
    lengths of ones or none.

    Used as the generation term of MPO: Weiyun Wang, Zhe Chen, Wenhai Wang, et
    al. "Enhancing the Reasoning Ability of Multimodal Large Language Models
    via Mixed Preference Optimization." arXiv:2411.10442; and of RPO: Richard
    Yuanzhe Pang, Weizhe Yuan, Kyunghyun Cho, He He, Sainbayar Sukhbaatar,
    Jason Weston. "Iterative Reasoning Preference Optimization."
    arXiv:2404.19733.
    """
    nll = -b.policy_chosen_logps
    if b.chosen_lengths is not None:
        nll = nll / b.chosen_lengths
    return nll


def sigmoid_norm_loss(b: PreferenceBatch) -> torch.Tensor:
    """Length-normalised DPO: the logistic loss on per-token log-ratios.

    Shapes: π_c, π_r, ρ_c, ρ_r, |y_c|, |y_r|: [B] -> losses [B].

        h̄ = r_c/|y_c| - r_r/|y_r|
        L = -(1-ε)·logσ(β·h̄) - ε·logσ(-β·h̄)

    Removes DPO's bias towards long responses. (TRL applies no label smoothing
    here; with the default ε = 0 the two agree.)

    Papers: the "DPO w/ LN" ablation of SimPO (Meng, Xia, Chen,
    arXiv:2405.14734, App. I), used with a reference model in Nathan Lambert,
    Jacob Morrison, Valentina Pyatkin, et al. "Tülu 3: Pushing Frontiers in
    Open Language Model Post-Training." arXiv:2411.15124 (Sec. 4.3).
    """
    r_c, r_r = b.logratios(normalized=True)
    return _smoothed_logistic(b.beta * (r_c - r_r), b.label_smoothing)


def simpo_loss(b: PreferenceBatch) -> torch.Tensor:
    """SimPO: reference-free logistic loss on average log-probs with a target margin.

    Shapes: π_c, π_r, |y_c|, |y_r|: [B] -> losses [B].  Option ``simpo_gamma`` (γ).

        x = β·(π_c/|y_c| - π_r/|y_r|) - γ
        L = -(1-ε)·logσ(x) - ε·logσ(-x)

    The reference is never read (pass None, or it is ignored). As in TRL's CPO
    trainer, ε smooths the label; the paper itself uses ε = 0 and β ≈ 2-2.5.

    Paper: Yu Meng, Mengzhou Xia, Danqi Chen. "SimPO: Simple Preference
    Optimization with a Reference-Free Reward." arXiv:2405.14734.
    """
    avg_c = b.policy_chosen_logps / b.chosen_lengths
    avg_r = b.policy_rejected_logps / b.rejected_lengths
    gamma = float(b.options.simpo_gamma)
    return _smoothed_logistic(b.beta * (avg_c - avg_r) - gamma, b.label_smoothing)


# f-DPO: DPO with the reverse KL regulariser replaced by another f-divergence.
# The implicit reward becomes β·f'(u), u = π/π_ref = exp(r), and the loss is the
# logistic loss on β·(f'(u_c) - f'(u_r)), constants of f' cancelling.


def reverse_kl_loss(b: PreferenceBatch) -> torch.Tensor:
    """f-DPO with the reverse KL, f'(u) = log u + 1: exactly the sigmoid (DPO) loss.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        d = log u_c - log u_r = r_c - r_r
        L = -(1-ε)·logσ(β·d) - ε·logσ(-β·d)

    Paper: Chaoqi Wang, Yibo Jiang, Chenghao Yang, Han Liu, Yuxin Chen.
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints." arXiv:2309.16240.
    """
    return sigmoid_loss(b)


def forward_kl_loss(b: PreferenceBatch) -> torch.Tensor:
    """f-DPO with the forward KL, f'(u) = 1 - 1/u.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        d = exp(-r_r) - exp(-r_c)
        L = -(1-ε)·logσ(β·d) - ε·logσ(-β·d)

    exp arguments are capped at 80 so float32 never overflows (TRL caps only
    the α-divergence).

    Paper: Chaoqi Wang, Yibo Jiang, Chenghao Yang, Han Liu, Yuxin Chen.
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints." arXiv:2309.16240.
    """
    r_c, r_r = b.logratios()
    d = _capped_exp(-r_r) - _capped_exp(-r_c)
    return _smoothed_logistic(b.beta * d, b.label_smoothing)


def js_divergence_loss(b: PreferenceBatch) -> torch.Tensor:
    """f-DPO with the Jensen-Shannon divergence, f'(u) = log(2u/(1+u)).

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].

        d = logσ(r_c) - logσ(r_r)          (log(u/(1+u)) = logσ(r))
        L = -(1-ε)·logσ(β·d) - ε·logσ(-β·d)

    Paper: Chaoqi Wang, Yibo Jiang, Chenghao Yang, Han Liu, Yuxin Chen.
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints." arXiv:2309.16240.
    """
    r_c, r_r = b.logratios()
    d = F.logsigmoid(r_c) - F.logsigmoid(r_r)
    return _smoothed_logistic(b.beta * d, b.label_smoothing)


def alpha_divergence_loss(b: PreferenceBatch) -> torch.Tensor:
    """f-DPO with the α-divergence, f'(u) = (1 - u^(-α))/α, 0 <= α <= 1.

    Shapes: π_c, π_r, ρ_c, ρ_r: [B] -> losses [B].  Option ``divergence_alpha`` (α).

        d = (exp(-α·r_r) - exp(-α·r_c)) / α
        L = -(1-ε)·logσ(β·d) - ε·logσ(-β·d)

    The paper's parameterisation (and TRL's documented "u^-α regulariser"):
    α -> 0 is the reverse KL (d -> r_c - r_r, used exactly at α = 0), α = 1 the
    forward KL. TRL's current code writes f'(t) = (t^(α-1) - 1)/(α-1), i.e. its
    α is 1 - ours; both agree at the default α = 0.5. exp arguments are capped
    at 80.

    Paper: Chaoqi Wang, Yibo Jiang, Chenghao Yang, Han Liu, Yuxin Chen.
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints." arXiv:2309.16240.
    """
    r_c, r_r = b.logratios()
    alpha = float(b.options.divergence_alpha)
    if alpha == 0.0:
        d = r_c - r_r
    else:
        d = (_capped_exp(-alpha * r_r) - _capped_exp(-alpha * r_c)) / alpha
    return _smoothed_logistic(b.beta * d, b.label_smoothing)


_LOSS_FNS: dict[LossType, Callable[[PreferenceBatch], torch.Tensor]] = {
    LossType.SIGMOID: sigmoid_loss,
    LossType.HINGE: hinge_loss,
    LossType.IPO: ipo_loss,
    LossType.EXO_PAIR: exo_pair_loss,
    LossType.NCA_PAIR: nca_pair_loss,
    LossType.ROBUST: robust_loss,
    LossType.BCO_PAIR: bco_pair_loss,
    LossType.SPPO_HARD: sppo_hard_loss,
    LossType.AOT: aot_loss,
    LossType.AOT_UNPAIRED: aot_unpaired_loss,
    LossType.APO_ZERO: apo_zero_loss,
    LossType.APO_DOWN: apo_down_loss,
    LossType.DISCOPOP: discopop_loss,
    LossType.SFT: sft_loss,
    LossType.SIGMOID_NORM: sigmoid_norm_loss,
    LossType.SIMPO: simpo_loss,
    LossType.REVERSE_KL: reverse_kl_loss,
    LossType.FORWARD_KL: forward_kl_loss,
    LossType.JS_DIVERGENCE: js_divergence_loss,
    LossType.ALPHA_DIVERGENCE: alpha_divergence_loss,
}
assert set(_LOSS_FNS) == set(LossType), "every LossType needs a loss function"


# --------------------------------------------------------------------------- entry point

LossTypeArg = Union[str, LossType, Sequence[Union[str, LossType]]]


def _parse_loss_types(loss_type: LossTypeArg) -> list[LossType]:
    if isinstance(loss_type, (str, LossType)):
        return [LossType.parse(loss_type)]
    types = [LossType.parse(t) for t in loss_type]
    if not types:
        raise LossArgumentError(
            "loss_type", f"loss_type is an empty list; give at least one of: {', '.join(LossType.names())}"
        )
    return types


def check_loss_config(
    loss_type: LossTypeArg = "sigmoid",
    *,
    beta: float = BETA,
    label_smoothing: float = LABEL_SMOOTHING,
    **options: Any,
) -> tuple[list[LossType], list[float]]:
    """Validate loss arguments without tensors; return ``(loss types, weights)``.

    Raises LossArgumentError, naming the argument and the fix (an unknown option: ValueError), on: an unknown loss
    name or option, beta <= 0, label_smoothing outside [0, 0.5), exo_pair with
    label_smoothing = 0, loss_weights of the wrong length, divergence_alpha outside
    [0, 1], discopop_tau <= 0, or label_smoothing > 0 when no loss uses it.
    """
    types, weights, _ = _resolve(loss_type, beta, label_smoothing, options)
    return types, weights


def _resolve(
    loss_type: LossTypeArg, beta: float, label_smoothing: float, options: Mapping[str, Any]
) -> tuple[list[LossType], list[float], LossOptions]:
    """The checks of :func:`check_loss_config`; also returns the options with their defaults filled in."""
    types = _parse_loss_types(loss_type)

    unknown = sorted(set(options) - set(LOSS_OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"unknown loss option(s) {', '.join(unknown)}; "
            f"valid options are: {', '.join(LOSS_OPTION_NAMES)}"
        )
    opts = LossOptions(**options)

    weights = opts.loss_weights
    if weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in weights]
        if len(weights) != len(types):
            raise LossArgumentError(
                "loss_weights", f"loss_weights has {len(weights)} entries but loss_type names {len(types)} "
                f"loss(es) ({', '.join(map(str, types))}); give one weight per loss"
            )
        if not all(math.isfinite(w) for w in weights):
            raise LossArgumentError("loss_weights", f"loss_weights must be finite numbers, got {weights}")

    if not (math.isfinite(beta) and beta > 0):
        raise LossArgumentError("beta", f"beta must be a positive number, got {beta}")
    if not (0.0 <= label_smoothing < 0.5):
        raise LossArgumentError("label_smoothing", f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and not any(t.uses_label_smoothing for t in types):
        users = ", ".join(str(t) for t in LossType if t.uses_label_smoothing)
        raise LossArgumentError(
            "label_smoothing", f"label_smoothing={label_smoothing} has no effect on loss_type "
            f"{', '.join(map(str, types))}; set it to 0 or use one of: {users}"
        )
    if LossType.EXO_PAIR in types and label_smoothing == 0.0:
        raise LossArgumentError(
            "loss_type", "loss_type exo_pair needs label_smoothing > 0 (it is the ε of the EXO target "
            "[1-ε, ε]); the EXO paper recommends label_smoothing=1e-3"
        )
    if LossType.ALPHA_DIVERGENCE in types:
        alpha = float(opts.divergence_alpha)
        if not 0.0 <= alpha <= 1.0:
            raise LossArgumentError("divergence_alpha",
                                    f"divergence_alpha (of alpha_divergence) must lie in [0, 1], got {alpha}")
    if LossType.DISCOPOP in types:
        tau = float(opts.discopop_tau)
        if not (math.isfinite(tau) and tau > 0):
            raise LossArgumentError("discopop_tau", f"discopop_tau must be a positive number, got {tau}")
    return types, weights, opts


def _as_logps(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(x.shape)}")
    return x.float()


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor],
    ref_rejected_logps: Optional[torch.Tensor],
    *,
    loss_type: LossTypeArg = "sigmoid",
    beta: float = BETA,
    label_smoothing: float = LABEL_SMOOTHING,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    **options: Any,
) -> LossOutput:
    """Compute a preference loss for a batch of policy and reference log probabilities.

    Args:
        policy_chosen_logps: Log probabilities of the policy model for the chosen
            responses. Shape: (batch_size,)
        policy_rejected_logps: Log probabilities of the policy model for the rejected
            responses. Shape: (batch_size,)
        ref_chosen_logps: Log probabilities of the reference model for the chosen
            responses. Shape: (batch_size,). None for reference-free losses (simpo, sft).
        ref_rejected_logps: Log probabilities of the reference model for the rejected
            responses. Shape: (batch_size,). None for reference-free losses.
        loss_type: A :class:`LossType` name, or a list of names whose losses are summed
            with ``loss_weights``: losses = Σ_i w_i · loss_i.
        beta: Temperature parameter for the DPO loss, typically something in the range
            of 0.1 to 0.5. We ignore the reference model as beta -> 0. (For ipo, the
            regulariser τ.)
        label_smoothing: conservativeness/noise rate ε in [0, 0.5), read by the losses
            whose ``uses_label_smoothing`` is True. 0 gives the original losses.
        chosen_lengths, rejected_lengths: response lengths in tokens. Shape: (batch_size,)
            Required by the ``length_normalized`` losses (ipo, sigmoid_norm, simpo),
            which divide summed log-probs by them; sft divides by chosen_lengths when
            given. A caller whose log-probs are already per-token means passes ones.
        **options: loss-specific knobs, see :class:`LossOptions`: ``loss_weights``,
            ``simpo_gamma``, ``divergence_alpha``, ``discopop_tau``, ``bco_delta``.

    Returns:
        A :class:`LossOutput` ``(losses, chosen_rewards, rejected_rewards)``, each of shape
        (batch_size,), float32. ``losses`` is per pair (per quantile for the ``batch_level``
        losses aot/aot_unpaired; only their mean is meaningful); reduce it with ``.mean()``.
        The rewards are beta * (policy - reference), detached; beta * policy when no
        reference is given.
    """
    types, weights, opts = _resolve(loss_type, beta, label_smoothing, options)

    pc = _as_logps("policy_chosen_logps", policy_chosen_logps)
    pr = _as_logps("policy_rejected_logps", policy_rejected_logps)
    if pc.shape != pr.shape:
        raise ValueError(
            f"policy_chosen_logps {tuple(pc.shape)} and policy_rejected_logps "
            f"{tuple(pr.shape)} must have the same shape [B]"
        )

    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is None:
        needy = [str(lt) for lt in types if lt.needs_reference]
        if needy:
            raise ValueError(
                f"loss_type {', '.join(needy)} needs ref_chosen_logps and ref_rejected_logps "
                f"(reference log-probs); pass them, or use a reference-free loss: "
                f"{', '.join(str(t) for t in LossType if not t.needs_reference)}"
            )
        rc = rr = None
    else:
        rc = _as_logps("ref_chosen_logps", ref_chosen_logps).to(pc.device)
        rr = _as_logps("ref_rejected_logps", ref_rejected_logps).to(pc.device)
        for name, ref in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
            if ref.shape != pc.shape:
                raise ValueError(
                    f"{name} has shape {tuple(ref.shape)} but the policy log-probs have "
                    f"{tuple(pc.shape)}"
                )

    lengths = {}
    for name, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if value is None:
            lengths[name] = None
            continue
        length = torch.as_tensor(value, device=pc.device).float()
        if length.shape != pc.shape:
            raise ValueError(
                f"{name} has shape {tuple(length.shape)} but the log-probs have {tuple(pc.shape)}"
            )
        lengths[name] = length.clamp(min=1.0)
    for lt in types:
        if lt.length_normalized:
            missing = [n for n, v in lengths.items() if v is None]
            if missing:
                raise ValueError(
                    f"loss_type {lt} is length-normalised and needs {' and '.join(missing)} "
                    f"(response lengths in tokens, shape [B]); pass ones if the log-probs "
                    f"are already per-token means"
                )

    batch = PreferenceBatch(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        chosen_lengths=lengths["chosen_lengths"],
        rejected_lengths=lengths["rejected_lengths"],
        beta=float(beta),
        label_smoothing=float(label_smoothing),
        options=opts,
    )

    losses = None
    for lt, w in zip(types, weights):
        term = _LOSS_FNS[lt](batch)
        if w != 1.0:
            term = w * term
        losses = term if losses is None else losses + term

    with torch.no_grad():
        r_c, r_r = batch.logratios()
        chosen_rewards = (beta * r_c).detach()
        rejected_rewards = (beta * r_r).detach()
    return LossOutput(losses, chosen_rewards, rejected_rewards)
