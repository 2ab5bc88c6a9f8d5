"""Tests of dpo.losses.

Every loss has a worked example whose expected value is derived by hand in the
test's docstring. Unless a docstring says otherwise they share ONE pair:

    policy_c = -2,  policy_r = -4,  ref_c = -3,  ref_r = -3.5,  β = 0.1
    |y_c| = 4 tokens,  |y_r| = 2 tokens
    r_c = policy_c - ref_c = 1,   r_r = policy_r - ref_r = -0.5
    h   = r_c - r_r = 1.5,        β·h = 0.15

and these values (-logσ(x) = log(1 + e^(-x)); -logσ(-x) = -logσ(x) + x):

    -logσ(0.15) = 0.620957   σ(0.15) = 0.537430   σ(-0.15) = 0.462570
    -logσ(0.10) = 0.644397   σ(0.10) = 0.524979   σ(-0.10) = 0.475021
    -logσ(0.05) = 0.668460   σ(0.05) = 0.512497   σ(-0.05) = 0.487503
    -logσ(0)    = 0.693147
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from dpo.losses import LossOutput, LossType, check_loss_config, preference_loss

BETA = 0.1
ALL = list(LossType)

# Options each loss needs to be valid (exo_pair requires ε > 0).
NEEDED = {LossType.EXO_PAIR: {"label_smoothing": 1e-3}}


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def example(loss_type, **kwargs) -> LossOutput:
    """The shared single-pair example of the module docstring."""
    args = dict(
        loss_type=loss_type,
        beta=BETA,
        chosen_lengths=t(4),
        rejected_lengths=t(2),
    )
    args.update(kwargs)
    return preference_loss(t(-2.0), t(-4.0), t(-3.0), t(-3.5), **args)


def close(actual: torch.Tensor, *expected: float) -> None:
    # expected values are hand-rounded to 6 decimals
    assert_close(actual, t(*expected), atol=2e-6, rtol=1e-6)


# --------------------------------------------------------------------------- worked examples


def test_worked_sigmoid():
    """L = -logσ(β·h) = -logσ(0.15) = log(1 + e^-0.15) = log(1.860708) = 0.620957."""
    close(example("sigmoid").losses, 0.620957)


def test_worked_sigmoid_label_smoothing():
    """Conservative DPO, ε = 0.1:
    L = -(1-ε)·logσ(0.15) - ε·logσ(-0.15) = 0.9·0.620957 + 0.1·0.770957
      = 0.558861 + 0.077096 = 0.635957.
    """
    close(example("sigmoid", label_smoothing=0.1).losses, 0.635957)


def test_worked_hinge():
    """L = max(0, 1 - β·h) = 1 - 0.15 = 0.85; with h = 20 instead (policy_r = -22.5):
    1 - 2 < 0, so L = 0.
    """
    close(example("hinge").losses, 0.85)
    out = preference_loss(t(-2.0), t(-22.5), t(-3.0), t(-3.5), loss_type="hinge", beta=BETA)
    close(out.losses, 0.0)


def test_worked_ipo():
    """Length-normalised: h̄ = r_c/|y_c| - r_r/|y_r| = 1/4 - (-0.5)/2 = 0.25 + 0.25 = 0.5.
    L = (h̄ - 1/(2β))² = (0.5 - 5)² = 20.25.
    (Swapping the lengths would give 1/2 + 0.5/4 = 0.625 and 19.140625.)
    """
    close(example("ipo").losses, 20.25)


def test_worked_exo_pair():
    """ε = 0.1, x = β·h = 0.15, σ(x) = 0.537430, σ(-x) = 0.462570,
    log(1-ε) = log 0.9 = -0.105361, log ε = log 0.1 = -2.302585:
    L = σ(x)·(logσ(x) - log(1-ε)) + σ(-x)·(logσ(-x) - log ε)
      = 0.537430·(-0.620957 + 0.105361) + 0.462570·(-0.770957 + 2.302585)
      = 0.537430·(-0.515596) + 0.462570·1.531628
      = -0.277097 + 0.708485 = 0.431388.
    """
    close(example("exo_pair", label_smoothing=0.1).losses, 0.431388)


def test_worked_nca_pair():
    """β·r_c = 0.1, β·r_r = -0.05:
    L = -logσ(0.1) - ½·logσ(-0.1) - ½·logσ(0.05)
      = 0.644397 + ½·0.744397 + ½·0.668460
      = 0.644397 + 0.372199 + 0.334230 = 1.350826.
    """
    close(example("nca_pair").losses, 1.350826)


def test_worked_robust():
    """ε = 0.1, x = 0.15:
    L = (-(1-ε)·logσ(x) + ε·logσ(-x)) / (1-2ε) = (0.9·0.620957 - 0.1·0.770957) / 0.8
      = (0.558861 - 0.077096) / 0.8 = 0.481765 / 0.8 = 0.602207.
    """
    close(example("robust", label_smoothing=0.1).losses, 0.602207)


def test_worked_bco_pair():
    """δ = 0 (default): L = -logσ(β·r_c) - logσ(-β·r_r) = -logσ(0.1) - logσ(0.05)
      = 0.644397 + 0.668460 = 1.312857.
    δ = 0.1: L = -logσ(0.1 - 0.1) - logσ(-(-0.05 - 0.1)) = -logσ(0) - logσ(0.15)
      = 0.693147 + 0.620957 = 1.314104.
    """
    close(example("bco_pair").losses, 1.312857)
    close(example("bco_pair", bco_delta=0.1).losses, 1.314104)


def test_worked_sppo_hard():
    """1/(2β) = 5: L = (r_c - 5)² + (r_r + 5)² = (1 - 5)² + (-0.5 + 5)²
      = 16 + 20.25 = 36.25.
    """
    close(example("sppo_hard").losses, 36.25)


# Two pairs for the batch-level losses: pair A is the shared example, pair B has
# policy_c = -3, policy_r = -1, ref_c = -2, ref_r = -3.
def _two_pairs(loss_type, **kwargs):
    return preference_loss(
        t(-2.0, -3.0), t(-4.0, -1.0), t(-3.0, -2.0), t(-3.5, -3.0),
        loss_type=loss_type, beta=BETA, **kwargs,
    )


def test_worked_aot():
    """Pairs A (shared) and B (policy_c=-3, policy_r=-1, ref_c=-2, ref_r=-3):
    policy log-ratios π_c - π_r: A = 2, B = -2  -> sorted [-2, 2]
    ref log-ratios    ρ_c - ρ_r: A = 0.5, B = 1 -> sorted [0.5, 1]
    Δ = [-2 - 0.5, 2 - 1] = [-2.5, 1];  β·Δ = [-0.25, 0.1]
    L = [-logσ(-0.25), -logσ(0.1)] = [log(1 + e^0.25), 0.644397] = [0.825939, 0.644397].
    (Pair by pair, h would be A: 1.5, B: -3; sorting is what makes it AOT.)
    """
    close(_two_pairs("aot").losses, 0.825939, 0.644397)


def test_worked_aot_unpaired():
    """Same two pairs: r_c = [1, -1] -> sorted [-1, 1]; r_r = [-0.5, 2] -> sorted [-0.5, 2].
    Δ = [-1 + 0.5, 1 - 2] = [-0.5, -1];  β·Δ = [-0.05, -0.1]
    L = [-logσ(-0.05), -logσ(-0.1)] = [0.668460 + 0.05, 0.644397 + 0.1] = [0.718460, 0.744397].
    """
    close(_two_pairs("aot_unpaired").losses, 0.718460, 0.744397)


def test_worked_apo_zero():
    """L = (1 - σ(β·r_c)) + σ(β·r_r) = (1 - σ(0.1)) + σ(-0.05) = σ(-0.1) + σ(-0.05)
      = 0.475021 + 0.487503 = 0.962524.
    """
    close(example("apo_zero").losses, 0.962524)


def test_worked_apo_down():
    """L = σ(β·r_c) + (1 - σ(β·h)) = σ(0.1) + σ(-0.15) = 0.524979 + 0.462570 = 0.987549."""
    close(example("apo_down").losses, 0.987549)


def test_worked_discopop():
    """τ = 0.05 (default), x = β·h = 0.15, m = σ(x/τ) = σ(3) = 0.952574:
    L = (1 - m)·(-logσ(x)) + m·e^-x = 0.047426·0.620957 + 0.952574·0.860708
      = 0.029449 + 0.819888 = 0.849338.
    """
    close(example("discopop").losses, 0.849338)


def test_worked_discopop_tau():
    """τ = 0.15 instead of 0.05: x/τ = 1, m = σ(1) = 0.731059:
    L = 0.268941·0.620957 + 0.731059·0.860708 = 0.167001 + 0.629228 = 0.796229.
    """
    close(example("discopop", discopop_tau=0.15).losses, 0.796229)


def test_worked_sft():
    """With lengths: L = -policy_c / |y_c| = 2 / 4 = 0.5; without: L = -policy_c = 2."""
    close(example("sft").losses, 0.5)
    close(example("sft", chosen_lengths=None, rejected_lengths=None).losses, 2.0)


def test_worked_sigmoid_norm():
    """h̄ = r_c/|y_c| - r_r/|y_r| = 0.25 + 0.25 = 0.5 (as for ipo); β·h̄ = 0.05:
    L = -logσ(0.05) = 0.668460.
    """
    close(example("sigmoid_norm").losses, 0.668460)


def test_worked_simpo():
    """Reference-free; γ = 0.5 (default). avg_c = -2/4 = -0.5, avg_r = -4/2 = -2:
    x = β·(avg_c - avg_r) - γ = 0.1·1.5 - 0.5 = -0.35
    L = -logσ(-0.35) = log(1 + e^0.35) = log(2.419068) = 0.883382.
    ε = 0.1: 0.9·0.883382 + 0.1·(-logσ(0.35) = 0.883382 - 0.35 = 0.533382)
           = 0.795044 + 0.053338 = 0.848382.
    The reference must not matter: the same with ref None.
    """
    close(example("simpo").losses, 0.883382)
    close(example("simpo", label_smoothing=0.1).losses, 0.848382)
    free = preference_loss(
        t(-2.0), t(-4.0), None, None, loss_type="simpo", beta=BETA,
        chosen_lengths=t(4), rejected_lengths=t(2),
    )
    close(free.losses, 0.883382)


def test_worked_reverse_kl():
    """f'(u) = log u + 1: d = r_c - r_r = h = 1.5, so L = -logσ(0.15) = 0.620957 (= sigmoid)."""
    close(example("reverse_kl").losses, 0.620957)


def test_worked_forward_kl():
    """f'(u) = 1 - 1/u: d = e^(-r_r) - e^(-r_c) = e^0.5 - e^-1 = 1.648721 - 0.367879 = 1.280842
    L = -logσ(β·d) = -logσ(0.1280842) = 0.631154.
    """
    close(example("forward_kl").losses, 0.631154)


def test_worked_js_divergence():
    """d = logσ(r_c) - logσ(r_r) = logσ(1) - logσ(-0.5) = -0.313262 + 0.974077 = 0.660815
    L = -logσ(0.0660815) = 0.660652.
    """
    close(example("js_divergence").losses, 0.660652)


def test_worked_alpha_divergence():
    """α = 0.5 (default): d = (e^(-α·r_r) - e^(-α·r_c))/α = (e^0.25 - e^-0.5)/0.5
      = (1.284025 - 0.606531)/0.5 = 1.354989;  L = -logσ(0.1354989) = 0.627691.
    α = 0.25: d = (e^0.125 - e^-0.25)/0.25 = (1.133148 - 0.778801)/0.25 = 1.417391;
      L = -logσ(0.1417391) = 0.624787.
    Limits: α = 1 is forward_kl (0.631154), α = 0 is reverse KL / sigmoid (0.620957).
    """
    close(example("alpha_divergence").losses, 0.627691)
    close(example("alpha_divergence", divergence_alpha=0.25).losses, 0.624787)
    close(example("alpha_divergence", divergence_alpha=1.0).losses, 0.631154)
    close(example("alpha_divergence", divergence_alpha=0.0).losses, 0.620957)


def test_every_loss_has_a_worked_example():
    missing = [lt.value for lt in LossType if f"test_worked_{lt.value}" not in globals()]
    assert not missing, f"no worked example for {missing}"


# ----------------------------------------------------------------- properties of every loss

# Direction: pair 0 is worse, pair 1 better (chosen up by 1, rejected down by 10):
#   ref_c = -5, ref_r = -10 for both;  worse: policy_c = -5, policy_r = -5 (r_c = 0, r_r = 5)
#                                      better: policy_c = -4, policy_r = -15 (r_c = 1, r_r = -5)
# Margins are wide on purpose: discopop is not monotone within |β·h| < ~0.2.
WORSE = (-5.0, -5.0)
BETTER = (-4.0, -15.0)


@pytest.mark.parametrize("loss_type", ALL, ids=str)
def test_better_pair_has_lower_loss(loss_type):
    opts = dict(NEEDED.get(loss_type, {}))
    kw = dict(loss_type=loss_type, beta=BETA, **opts)
    if not loss_type.batch_level:
        out = preference_loss(
            t(WORSE[0], BETTER[0]), t(WORSE[1], BETTER[1]), t(-5.0, -5.0), t(-10.0, -10.0),
            chosen_lengths=t(1, 1), rejected_lengths=t(1, 1), **kw,
        )
        assert out.losses[1] < out.losses[0]
    else:
        # Batch-level: the same batch with one pair improved has a lower mean loss.
        others_c, others_r = (-7.0, -3.0), (-8.0, -2.0)
        ref_c, ref_r = t(-5.0, -6.0, -4.0), t(-10.0, -7.0, -3.0)
        worse = preference_loss(
            t(WORSE[0], *others_c), t(WORSE[1], *others_r), ref_c, ref_r, **kw
        )
        better = preference_loss(
            t(BETTER[0], *others_c), t(BETTER[1], *others_r), ref_c, ref_r, **kw
        )
        assert better.losses.mean() < worse.losses.mean()


@pytest.mark.parametrize("loss_type", ALL, ids=str)
def test_rewards_detached_and_beta_times_logratio(loss_type):
    opts = NEEDED.get(loss_type, {})
    pc = torch.randn(4, requires_grad=True)
    pr = torch.randn(4, requires_grad=True)
    rc, rr = torch.randn(4), torch.randn(4)
    out = preference_loss(
        pc, pr, rc, rr, loss_type=loss_type, beta=0.3,
        chosen_lengths=t(1, 2, 3, 4), rejected_lengths=t(4, 3, 2, 1), **opts,
    )
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad
    assert_close(out.chosen_rewards, 0.3 * (pc.detach() - rc))
    assert_close(out.rejected_rewards, 0.3 * (pr.detach() - rr))
    if not loss_type.needs_reference:
        free = preference_loss(
            pc, pr, None, None, loss_type=loss_type, beta=0.3,
            chosen_lengths=t(1, 2, 3, 4), rejected_lengths=t(4, 3, 2, 1),
        )
        assert_close(free.chosen_rewards, 0.3 * pc.detach())
        assert_close(free.rejected_rewards, 0.3 * pr.detach())
        assert not free.chosen_rewards.requires_grad


@pytest.mark.parametrize("loss_type", ALL, ids=str)
def test_finite_at_extreme_margins(loss_type):
    """Log-ratios of ±1e4 in every combination: losses and gradients stay finite."""
    opts = NEEDED.get(loss_type, {})
    big = 1e4
    pc = t(big, -big, big, -big).requires_grad_()
    pr = t(-big, big, big, -big).requires_grad_()
    zeros = torch.zeros(4)
    out = preference_loss(
        pc, pr, zeros, zeros, loss_type=loss_type, beta=BETA,
        chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(4), **opts,
    )
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    for grad in (pc.grad, pr.grad):
        # sft never reads the rejected response, so it leaves no gradient there
        assert grad is None or torch.isfinite(grad).all(), (pc.grad, pr.grad)
    assert pc.grad is not None


@pytest.mark.parametrize("loss_type", ALL, ids=str)
def test_output_shape_and_dtype(loss_type):
    opts = NEEDED.get(loss_type, {})
    B = 5
    g = torch.Generator().manual_seed(0)
    logps = [-torch.rand(B, generator=g) * 50 for _ in range(4)]
    # bf16 policy inputs are computed in float32 and still get gradients
    pc = logps[0].bfloat16().requires_grad_()
    out = preference_loss(
        pc, logps[1], logps[2].double(), logps[3].double(), loss_type=loss_type, beta=BETA,
        chosen_lengths=torch.randint(1, 20, (B,), generator=g),
        rejected_lengths=torch.randint(1, 20, (B,), generator=g), **opts,
    )
    for x in out:
        assert x.shape == (B,)
        assert x.dtype == torch.float32
    out.losses.mean().backward()
    assert pc.grad is not None and pc.grad.shape == (B,)


# --------------------------------------------------------------------------- specific behaviour


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25, 0.4])
def test_sigmoid_label_smoothing_is_conservative_dpo(eps):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(8, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    beta = 0.2
    h = (pc - pr) - (rc - rr)
    logsigmoid = torch.nn.functional.logsigmoid
    expected = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    out = preference_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert_close(out.losses, expected.float())


def test_reverse_kl_equals_sigmoid():
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(6, generator=g) for _ in range(4)]
    assert_close(
        preference_loss(*x, loss_type="reverse_kl", label_smoothing=0.2).losses,
        preference_loss(*x, loss_type="sigmoid", label_smoothing=0.2).losses,
    )


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        preference_loss(t(-1), t(-2), t(-1), t(-2), loss_type="sigmiod")
    message = str(info.value)
    assert "sigmiod" in message
    for name in LossType.names():
        assert name in message
    with pytest.raises(ValueError, match="valid loss types"):
        LossType.parse("dpo")


def test_parse():
    assert LossType.parse("sigmoid") is LossType.SIGMOID
    assert LossType.parse(" SimPO ") is LossType.SIMPO
    assert LossType.parse(LossType.AOT) is LossType.AOT
    assert LossType("ipo") is LossType.IPO and LossType.IPO == "ipo"


def test_member_properties():
    trl_names = {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }
    fdiv = {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}
    assert set(LossType.names()) == trl_names | fdiv | {"simpo"}
    assert {m.value for m in LossType if not m.needs_reference} == {"simpo", "sft"}
    assert {m.value for m in LossType if m.length_normalized} == {"ipo", "sigmoid_norm", "simpo"}
    assert {m.value for m in LossType if m.batch_level} == {"aot", "aot_unpaired"}
    assert LossType.SIMPO.option_names == {"simpo_gamma"}
    assert LossType.HINGE.option_names == frozenset()


def test_weighted_combination_is_weighted_sum():
    g = torch.Generator().manual_seed(3)
    x = [-torch.rand(4, generator=g) * 20 for _ in range(4)]
    lengths = dict(chosen_lengths=t(3, 5, 7, 9), rejected_lengths=t(2, 4, 6, 8))
    parts = {
        name: preference_loss(*x, loss_type=name, **lengths).losses
        for name in ("sigmoid", "sft", "ipo")
    }
    combo = preference_loss(
        *x, loss_type=["sigmoid", "sft", "ipo"], loss_weights=[0.8, 0.2, 1.5], **lengths
    )
    assert_close(combo.losses, 0.8 * parts["sigmoid"] + 0.2 * parts["sft"] + 1.5 * parts["ipo"])
    unweighted = preference_loss(*x, loss_type=["sigmoid", "sft"], **lengths)
    assert_close(unweighted.losses, parts["sigmoid"] + parts["sft"])
    assert_close(combo.chosen_rewards, 0.1 * (x[0] - x[2]))
    with pytest.raises(ValueError, match="loss_weights has 1 entries"):
        preference_loss(*x, loss_type=["sigmoid", "sft"], loss_weights=[1.0])


@pytest.mark.parametrize("loss_type", [m for m in LossType if m.length_normalized], ids=str)
@pytest.mark.parametrize("missing", ["chosen_lengths", "rejected_lengths"])
def test_length_normalized_needs_lengths(loss_type, missing):
    lengths = {"chosen_lengths": t(3), "rejected_lengths": t(4)}
    del lengths[missing]
    with pytest.raises(ValueError, match=missing):
        preference_loss(t(-1), t(-2), t(-1), t(-2), loss_type=loss_type, **lengths)
    # also when it is only one member of a combination
    with pytest.raises(ValueError, match=missing):
        preference_loss(t(-1), t(-2), t(-1), t(-2), loss_type=["sigmoid", loss_type], **lengths)


@pytest.mark.parametrize("loss_type", [m for m in LossType if m.needs_reference], ids=str)
def test_reference_losses_refuse_missing_reference(loss_type):
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(
            t(-1), t(-2), None, None, loss_type=loss_type,
            chosen_lengths=t(1), rejected_lengths=t(1), **NEEDED.get(loss_type, {}),
        )


def test_invalid_arguments_are_named():
    x = (t(-1), t(-2), t(-1), t(-2))
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
        preference_loss(*x, loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
        preference_loss(*x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="no effect on loss_type hinge"):
        preference_loss(*x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown loss option.*simpo_gama"):
        preference_loss(
            *x, loss_type="simpo", simpo_gama=1.0, chosen_lengths=t(1), rejected_lengths=t(1)
        )
    with pytest.raises(ValueError, match="beta must be a positive"):
        preference_loss(*x, beta=0.0)
    with pytest.raises(ValueError, match="divergence_alpha"):
        preference_loss(*x, loss_type="alpha_divergence", divergence_alpha=1.5)
    with pytest.raises(ValueError, match="discopop_tau"):
        preference_loss(*x, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(t(-1, -2), t(-2), t(-1), t(-2))
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
        preference_loss(t(-1), t(-2), t(-1), None, loss_type="simpo")
    # the same checks without tensors, for config validation
    types, weights = check_loss_config(["sigmoid", "sft"], loss_weights=[0.5, 2])
    assert types == [LossType.SIGMOID, LossType.SFT] and weights == [0.5, 2.0]


def test_lengths_clamped_to_one():
    """A zero length counts as 1 (as in TRL): ipo with |y_c| = 0, |y_r| = 1, r_c = 1, r_r = -0.5:
    h̄ = 1/1 + 0.5/1 = 1.5, L = (1.5 - 5)² = 12.25.
    """
    out = preference_loss(
        t(-2.0), t(-4.0), t(-3.0), t(-3.5), loss_type="ipo",
        chosen_lengths=torch.tensor([0]), rejected_lengths=torch.tensor([1]),
    )
    close(out.losses, 12.25)
    assert math.isfinite(out.losses.item())
