"""The losses: hand-computed values, f-DPO -> DPO, Prop. 4.1 (IUPO -> IPO), gradient signs,
errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from strategies import (
    ADMISSIBLE_NAMES,
    admissible_divergences,
    betas,
    divergence_of,
    dyadic_logp_batches,
    logp_batches,
)

from upo_ref.divergences import get_divergence
from upo_ref.losses import (
    PreferenceLoss,
    dpo_loss,
    fdpo_loss,
    h_pi,
    ipo_loss,
    iupo_loss,
    uh_pi,
)
from upo_ref.metrics import preference_metrics

EPS64 = torch.finfo(torch.float64).eps
RKL, JS = get_divergence("reverse_kl"), get_divergence("jensen_shannon")


def t64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def rounding_bound(logps, h_minus_target):
    """|loss_a - loss_b| when two groupings of the same four-term sum h differ by rounding.

    Each grouping of (pc - pr) - (rc - rr) is within 3 ulps of the exact sum's largest partial
    magnitude, so |dh| <= d = 8 eps (|pc| + |pr| + |rc| + |rr| + 1) (the +1 covers f' = log + 1);
    then |(h + dh - c)^2 - (h - c)^2| <= 2 |h - c| d + d^2.
    """
    d = 8 * EPS64 * (sum(x.abs() for x in logps) + 1)
    return 2 * h_minus_target.abs() * d + d * d


# --- hand-computed values -------------------------------------------------------------------------
# (pc, pr, rc, rr) = (-1, -2, -1.5, -1.5): h = (-1 + 2) - (-1.5 + 1.5) = 1.
# kkt log-ratios: u_w = pc - rc = 0.5, u_l = pr - rr = -0.5.
CASE = t64(-1.0), t64(-2.0), t64(-1.5), t64(-1.5)
LN2 = math.log(2)
js_f = lambda x: math.log(2 * math.exp(x) / (1 + math.exp(x)))  # noqa: E731, f'_JS(e^x) by the book
HAND = [
    ("DPO beta=0.5", lambda: dpo_loss(*CASE, 0.5), math.log(1 + math.exp(-0.5))),
    ("DPO beta=2", lambda: dpo_loss(*CASE, 2.0), math.log(1 + math.exp(-2.0))),
    ("IPO beta=0.5: (1 - 1)^2", lambda: ipo_loss(*CASE, 0.5), 0.0),
    ("IPO beta=0.1: (1 - 5)^2", lambda: ipo_loss(*CASE, 0.1), 16.0),
    ("f-DPO RKL = DPO", lambda: fdpo_loss(*CASE, 0.5, "reverse_kl"), math.log(1 + math.exp(-0.5))),
    (
        "f-DPO FKL: f' = -1/u",
        lambda: fdpo_loss(*CASE, 0.5, "forward_kl"),
        math.log(1 + math.exp(-0.5 * (-math.exp(-0.5) + math.exp(0.5)))),
    ),
    (
        "f-DPO JS",
        lambda: fdpo_loss(*CASE, 0.5, "jensen_shannon"),
        math.log(1 + math.exp(-0.5 * (js_f(0.5) - js_f(-0.5)))),
    ),
    (
        "f-DPO alpha=0.5: f' = 2(1 - u^-1/2)",
        lambda: fdpo_loss(*CASE, 0.5, get_divergence("alpha", alpha=0.5)),
        math.log(1 + math.exp(-0.5 * (2 * (1 - math.exp(-0.25)) - 2 * (1 - math.exp(0.25))))),
    ),
    (
        "JS-IUPO paper: f'(e^1) - f'(e^0), target 1",
        lambda: iupo_loss(*CASE, 0.5, "jensen_shannon"),
        (math.log(2 * math.e / (1 + math.e)) - 0.0 - 1.0) ** 2,
    ),
    (
        "JS-IUPO kkt: f'(e^.5) - f'(e^-.5), target 5",
        lambda: iupo_loss(*CASE, 0.1, "jensen_shannon", form="kkt"),
        (js_f(0.5) - js_f(-0.5) - 5.0) ** 2,
    ),
    (
        "FKL-IUPO paper: -e^-1 + e^0, target 1",
        lambda: iupo_loss(*CASE, 0.5, "forward_kl"),
        (-math.exp(-1.0) + 1.0 - 1.0) ** 2,
    ),
    (
        "h = 0 gives DPO = log 2",
        lambda: dpo_loss(t64(-3.0), t64(-3.0), t64(-7.0), t64(-7.0), 0.3),
        LN2,
    ),
    # h = -201, beta = 0.1: softplus(20.1), beyond torch's default softplus threshold of 20
    (
        "DPO far on the wrong side",
        lambda: dpo_loss(t64(0.0), t64(0.0), t64(201.0), t64(0.0), 0.1),
        20.1 + math.log1p(math.exp(-20.1)),
    ),
]


@pytest.mark.parametrize("what, compute, expected", HAND, ids=[h[0] for h in HAND])
def test_hand_computed_values(what, compute, expected):
    got = compute()
    assert got.shape == (1,) and got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_uh_pi_paper_and_kkt_forms_on_the_worked_case():
    # paper: f'(pi_w / pi_l) - f'(ref_w / ref_l) with log-ratios 1 and 0; kkt: 0.5 and -0.5
    assert uh_pi(*CASE, JS, form="paper").item() == pytest.approx(js_f(1.0) - js_f(0.0), rel=1e-15)
    assert uh_pi(*CASE, JS, form="kkt").item() == pytest.approx(js_f(0.5) - js_f(-0.5), rel=1e-15)
    assert h_pi(*CASE).item() == 1.0


# --- f-DPO generalises DPO; Prop. 4.1: IUPO generalises IPO ---------------------------------------
@given(logps=dyadic_logp_batches(), beta=betas)
def test_fdpo_under_reverse_kl_is_dpo_bit_for_bit_on_exact_inputs(logps, beta):
    assert torch.equal(fdpo_loss(*logps, beta, RKL), dpo_loss(*logps, beta))


@given(logps=logp_batches(low=-1e4), beta=betas)
def test_fdpo_under_reverse_kl_is_dpo(logps, beta):
    # softplus is 1-Lipschitz, so |d loss| <= beta |d h| <= beta * 8 eps * scale.
    d = beta * 8 * EPS64 * (sum(x.abs() for x in logps) + 1)
    assert ((fdpo_loss(*logps, beta, RKL) - dpo_loss(*logps, beta)).abs() <= d).all()


@pytest.mark.parametrize("form", ["paper", "kkt"])
@given(logps=dyadic_logp_batches(), beta=betas)
def test_prop_4_1_iupo_under_reverse_kl_is_ipo_bit_for_bit_on_exact_inputs(form, logps, beta):
    assert torch.equal(iupo_loss(*logps, beta, RKL, form=form), ipo_loss(*logps, beta))
    assert torch.equal(uh_pi(*logps, RKL, form=form), h_pi(*logps))


@pytest.mark.parametrize("form", ["paper", "kkt"])
@given(logps=logp_batches(low=-1e4), beta=betas)
def test_prop_4_1_iupo_under_reverse_kl_is_ipo_on_extreme_logps(form, logps, beta):
    ipo = ipo_loss(*logps, beta)
    bound = rounding_bound(logps, h_pi(*logps) - 1 / (2 * beta))
    assert ((iupo_loss(*logps, beta, RKL, form=form) - ipo).abs() <= bound).all()


def test_prop_4_1_on_float32_extremes():
    pc, pr, rc, rr = (
        torch.tensor(v, dtype=torch.float32) for v in ([-9000.0], [-1.0], [-10.0], [-9500.0])
    )
    for form in ("paper", "kkt"):
        assert torch.isfinite(iupo_loss(pc, pr, rc, rr, 0.1, RKL, form=form)).all()
        torch.testing.assert_close(
            iupo_loss(pc, pr, rc, rr, 0.1, RKL, form=form), ipo_loss(pc, pr, rc, rr, 0.1)
        )


@given(logps=logp_batches(size=1, low=-50.0), beta=betas)
def test_the_two_iupo_forms_are_one_function_of_h_only_under_reverse_kl(logps, beta):
    # Shifting pi(y_w) and pi_ref(y_w) by the same amount leaves h (and every reverse-KL quantity)
    # unchanged; it moves the paper form's two arguments but not the kkt form's.
    pc, pr, rc, rr = logps
    shifted = (pc + 3.0, pr, rc + 3.0, rr)
    assert uh_pi(*shifted, JS, form="kkt").item() == pytest.approx(
        uh_pi(*logps, JS, form="kkt").item(), abs=1e-12
    )
    assert uh_pi(*shifted, RKL, form="paper").item() == pytest.approx(
        uh_pi(*logps, RKL, form="paper").item(), abs=1e-12
    )


def test_the_two_iupo_forms_differ_under_jensen_shannon():
    # pi = ref on the loser, the winner's ratio raised: paper compares pi_w/pi_l with ref_w/ref_l.
    pc, pr, rc, rr = t64(-1.0), t64(-2.0), t64(-3.0), t64(-1.0)
    paper, kkt = iupo_loss(pc, pr, rc, rr, 0.5, JS), iupo_loss(pc, pr, rc, rr, 0.5, JS, form="kkt")
    assert paper.item() == pytest.approx((js_f(1.0) - js_f(-2.0) - 1) ** 2, rel=1e-14)
    assert kkt.item() == pytest.approx((js_f(2.0) - js_f(-1.0) - 1) ** 2, rel=1e-14)
    assert abs(paper.item() - kkt.item()) > 0.1


def test_the_two_iupo_forms_differ_under_jensen_shannon_on_random_pairs():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-30 * torch.rand(4, 1000, generator=g, dtype=torch.float64)).unbind(0)
    diff = (uh_pi(pc, pr, rc, rr, JS, form="paper") - uh_pi(pc, pr, rc, rr, JS, form="kkt")).abs()
    # They agree only on a measure-zero set (e.g. when pi = pi_ref on both responses).
    assert (diff > 1e-6).double().mean().item() > 0.99


# --- gradient signs ------------------------------------------------------------------------------
def _grads(loss_fn, logps):
    leaves = [x.clone().requires_grad_(True) for x in logps]
    loss_fn(*leaves).sum().backward()
    return leaves[0].grad, leaves[1].grad


@given(logps=logp_batches(low=-60.0), beta=betas)
def test_dpo_always_pushes_chosen_up_and_rejected_down(logps, beta):
    g_c, g_r = _grads(lambda *a: dpo_loss(*a, beta), logps)
    # -dL/dpc = beta sigma(-beta h) > 0; it can underflow to 0 only when the pair is won by far.
    assert (g_c <= 0).all() and (g_r >= 0).all() and torch.equal(g_c, -g_r)


@given(logps=logp_batches(low=-60.0), beta=betas, div=admissible_divergences())
def test_fdpo_pushes_chosen_up_and_rejected_down(logps, beta, div):
    g_c, g_r = _grads(lambda *a: fdpo_loss(*a, beta, div), logps)
    assert (g_c <= 0).all() and (g_r >= 0).all()


@pytest.mark.parametrize("form", ["paper", "kkt"])
@given(logps=logp_batches(low=-60.0), beta=betas, div=admissible_divergences())
def test_iupo_pushes_chosen_up_while_below_target_and_down_above(form, logps, beta, div):
    uh = uh_pi(*logps, div, form=form)
    g_c, g_r = _grads(lambda *a: iupo_loss(*a, beta, div, form=form), logps)
    below, above = uh < 1 / (2 * beta), uh > 1 / (2 * beta)
    assert (g_c[below] <= 0).all() and (g_r[below] >= 0).all()
    assert (g_c[above] >= 0).all() and (g_r[above] <= 0).all()
    # and the push is strictly nonzero where f' has not saturated (|log-ratio| moderate)
    moderate = below & (logps[0] - logps[1]).abs().lt(20) & (logps[0] - logps[2]).abs().lt(20)
    assert (g_c[moderate] < 0).all()


def test_ipo_gradient_is_the_regression_residual():
    # dL/dpc = 2 (h - 1/(2 beta)); at pc=-1, pr=-2, rc=rr: h = 1, beta=0.1 -> 2 (1 - 5) = -8.
    g_c, g_r = _grads(lambda *a: ipo_loss(*a, 0.1), CASE)
    assert g_c.item() == -8.0 and g_r.item() == 8.0


# --- JS-IUPO (paper form) at the sequence log-ratios of real pairs -------------------------------
# With a = log pi(y_w)/pi(y_l) and a_ref its reference value: Uh_JS = log sig(a) - log sig(a_ref).
# Summed log-probs of two different responses differ by tens of nats, where log sigma is either the
# identity or 0: JS-IUPO is then IPO on pairs the reference ranks the wrong way and inert on the
# others (experiments/by_reference.py measures what this does to a trained policy).
FAR = 40.0  # nats from 0: softplus(-FAR) = e^-FAR = 4.2e-18


def _pairs_with_log_ratios(base, a, a_ref):
    """(pc, pr, rc, rr) <= 0 with pc - pr = a and rc - rr = a_ref: the larger of each two is
    ``base``."""
    pc, pr = torch.minimum(base, base + a), torch.minimum(base - a, base)
    rc, rr = torch.minimum(base, base + a_ref), torch.minimum(base - a_ref, base)
    return pc, pr, rc, rr


def _far(sign):
    return arrays(np.float64, (8,), elements=st.floats(FAR, 400.0)).map(
        lambda x: sign * torch.from_numpy(x)
    )


_bases = arrays(np.float64, (8,), elements=st.floats(-100.0, 0.0)).map(torch.from_numpy)


@given(base=_bases, a=_far(-1), a_ref=_far(-1), beta=betas)
def test_js_iupo_is_ipo_where_both_log_ratios_are_far_below_zero(base, a, a_ref, beta):
    logps = _pairs_with_log_ratios(base, a, a_ref)
    h, c = h_pi(*logps), 1 / (2 * beta)
    # |Uh_JS - h| = |softplus(a) - softplus(a_ref)| <= e^-FAR, plus the four-term sum's rounding
    d = 8 * EPS64 * (sum(x.abs() for x in logps) + 2) + math.exp(-FAR)
    js, ipo = iupo_loss(*logps, beta, JS), ipo_loss(*logps, beta)
    assert ((js - ipo).abs() <= 2 * (h - c).abs() * d + d * d).all()
    # dL/dpc = 2 (Uh - c) sigma(-a) against IPO's 2 (h - c); sigma(a) <= e^-FAR
    g_js, g_ipo = (
        _grads(lambda *x: iupo_loss(*x, beta, JS), logps),
        _grads(lambda *x: ipo_loss(*x, beta), logps),
    )
    bound = 2 * d + 2 * (h - c).abs() * (math.exp(-FAR) + 4 * EPS64)
    for gj, gi in zip(g_js, g_ipo, strict=True):
        assert ((gj - gi).abs() <= bound).all()


@given(base=_bases, a=_far(1), a_ref=_far(1), beta=betas)
def test_js_iupo_is_inert_where_both_log_ratios_are_far_above_zero(base, a, a_ref, beta):
    logps = _pairs_with_log_ratios(base, a, a_ref)
    c = 1 / (2 * beta)
    # |Uh_JS| <= softplus(-a) + softplus(-a_ref) <= 2 e^-FAR: the loss sits at its starting value
    # c^2, and its gradient 2 (Uh - c) sigma(-a) is at most 2 (c + 2 e^-FAR) e^-FAR.
    e = math.exp(-FAR)
    js = iupo_loss(*logps, beta, JS)
    assert ((js - c * c).abs() <= 4 * c * e + 4 * e * e + 4 * EPS64 * c * c).all()
    # (a itself is rounded, by up to 4 eps (|pc| + |pr|) nats: a relative error of e^-a)
    slack = 1 + 16 * EPS64 * (logps[0].abs() + logps[1].abs() + 1)
    for g in _grads(lambda *x: iupo_loss(*x, beta, JS), logps):
        assert (g.abs() <= 2 * (c + 2 * e) * e * slack).all()
    # IPO on the same pairs pushes with its full residual: 2 |h - c|, not near 0.
    g_ipo = _grads(lambda *x: ipo_loss(*x, beta), logps)[0]
    assert torch.equal(g_ipo.abs(), 2 * (h_pi(*logps) - c).abs())


# --- metrics -------------------------------------------------------------------------------------
def test_preference_metrics_by_hand():
    pc, pr, rc, rr = t64(-1.0, -4.0), t64(-2.0, -1.0), t64(-1.5, -3.0), t64(-1.5, -3.0)
    m = preference_metrics(pc, pr, rc, rr, 0.5, JS)
    assert m["rewards/chosen"].tolist() == [0.25, -0.5]
    assert m["rewards/rejected"].tolist() == [-0.25, 1.0]
    assert m["rewards/margins"].tolist() == [0.5, -1.5]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["scores/chosen"].tolist() == pytest.approx(
        [0.5 * js_f(0.5), 0.5 * js_f(-1.0)], rel=1e-15
    )
    assert m["scores/margins"].tolist() == pytest.approx(
        [0.5 * (js_f(0.5) - js_f(-0.5)), 0.5 * (js_f(-1.0) - js_f(2.0))], rel=1e-14
    )


@given(logps=logp_batches(), beta=betas)
def test_reverse_kl_scores_are_rewards_plus_beta_and_accuracy_is_margin_sign(logps, beta):
    m = preference_metrics(*logps, beta)
    torch.testing.assert_close(
        m["scores/chosen"], m["rewards/chosen"] + beta, rtol=1e-12, atol=1e-12 * beta
    )
    margins = m["rewards/margins"]
    assert torch.equal(
        m["rewards/accuracies"], (margins > 0).double() + 0.5 * (margins == 0).double()
    )
    assert not m["rewards/chosen"].requires_grad


# --- PreferenceLoss ------------------------------------------------------------------------------
@given(logps=logp_batches(), beta=betas)
def test_preference_loss_dispatches_to_the_functions(logps, beta):
    assert torch.equal(PreferenceLoss("dpo")(*logps, beta), dpo_loss(*logps, beta))
    assert torch.equal(PreferenceLoss("ipo")(*logps, beta), ipo_loss(*logps, beta))
    assert torch.equal(
        PreferenceLoss("fdpo", "forward_kl")(*logps, beta), fdpo_loss(*logps, beta, "forward_kl")
    )
    assert torch.equal(
        PreferenceLoss("iupo", "jensen_shannon", "kkt")(*logps, beta),
        iupo_loss(*logps, beta, "jensen_shannon", form="kkt"),
    )


def test_preference_loss_labels_and_bad_combinations():
    assert PreferenceLoss("ipo").label == "IPO"
    assert PreferenceLoss("iupo", "jensen_shannon").label == "JS-IUPO"
    assert PreferenceLoss("iupo", "jensen_shannon", "kkt").label == "JS-IUPO (kkt)"
    assert PreferenceLoss("fdpo", get_divergence("alpha", alpha=0.5)).label == "f-DPO (alpha=0.5)"
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        PreferenceLoss("ppo")
    with pytest.raises(ValueError, match="takes no divergence"):
        PreferenceLoss("ipo", "jensen_shannon")
    with pytest.raises(ValueError, match="needs a divergence"):
        PreferenceLoss("iupo")
    with pytest.raises(ValueError, match="applies to iupo only"):
        PreferenceLoss("fdpo", "jensen_shannon", form="kkt")


# --- bad input -----------------------------------------------------------------------------------
ALL_LOSSES = [
    ("dpo", lambda *a, beta: dpo_loss(*a, beta)),
    ("ipo", lambda *a, beta: ipo_loss(*a, beta)),
    ("fdpo", lambda *a, beta: fdpo_loss(*a, beta, "jensen_shannon")),
    ("iupo", lambda *a, beta: iupo_loss(*a, beta, "jensen_shannon")),
    ("metrics", lambda *a, beta: preference_metrics(*a, beta)),
]
GOOD = t64(-1.0, -2.0), t64(-2.0, -3.0), t64(-1.5, -2.5), t64(-1.5, -2.5)


@pytest.mark.parametrize("name, fn", ALL_LOSSES, ids=[n for n, _ in ALL_LOSSES])
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_beta_raises(name, fn, beta):
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        fn(*GOOD, beta=beta)


@pytest.mark.parametrize("name, fn", ALL_LOSSES, ids=[n for n, _ in ALL_LOSSES])
@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logps_raise_naming_the_argument(name, fn, position, bad):
    arg = [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "reference_chosen_logps",
        "reference_rejected_logps",
    ][position]
    args = list(GOOD)
    args[position] = t64(-1.0, bad)
    with pytest.raises(ValueError, match=f"{arg} has 1 non-finite value.*at index 1"):
        fn(*args, beta=0.1)


@pytest.mark.parametrize("name, fn", ALL_LOSSES, ids=[n for n, _ in ALL_LOSSES])
def test_shape_and_type_errors(name, fn):
    pc, pr, rc, rr = GOOD
    with pytest.raises(
        ValueError,
        match="reference_rejected_logps has shape \\(3,\\) "
        "but policy_chosen_logps has shape \\(2,\\)",
    ):
        fn(pc, pr, rc, t64(-1.0, -1.0, -1.0), beta=0.1)
    with pytest.raises(ValueError, match="policy_rejected_logps must be 1-D of shape \\(B,\\)"):
        fn(pc, pr[:, None], rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="policy_chosen_logps must be a torch.Tensor"):
        fn([-1.0, -2.0], pr, rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="must be a floating-point tensor"):
        fn(pc, pr, torch.tensor([-1, -2]), rr, beta=0.1)
    with pytest.raises(
        ValueError, match="dtype torch.float32 but policy_chosen_logps has torch.float64"
    ):
        fn(pc, pr.float(), rc, rr, beta=0.1)


def test_unknown_divergence_and_form_raise():
    with pytest.raises(ValueError, match="unknown divergence name 'js'"):
        fdpo_loss(*GOOD, 0.1, "js")
    with pytest.raises(ValueError, match="form must be one of"):
        iupo_loss(*GOOD, 0.1, "jensen_shannon", form="eq17")
    with pytest.raises(ValueError, match="divergence must be a Divergence"):
        iupo_loss(*GOOD, 0.1, 3)


@pytest.mark.parametrize("name", ADMISSIBLE_NAMES)
def test_losses_and_gradients_are_finite_for_long_sequences_in_float32(name):
    # Summed log-probs of long responses: thousands of nats, policy/reference log-ratios up to +-40
    # (forward KL's IUPO loss grows like e^{2|x|} and exceeds float32 beyond |x| ~ 44).
    torch.manual_seed(0)
    div = divergence_of(name)
    ref = -torch.rand(4, 256) * 5000
    pol = (ref + (torch.rand(4, 256) * 80 - 40)).requires_grad_(True)
    losses = [
        fdpo_loss(pol[0], pol[1], ref[0], ref[1], 0.1, div),
        iupo_loss(pol[0], pol[1], ref[0], ref[1], 0.1, div, form="kkt"),
    ]
    if name in ("reverse_kl", "jensen_shannon"):  # f' linear in the log-ratio: never overflows
        losses.append(iupo_loss(pol[0], pol[1], ref[0], ref[1], 0.1, div))
    for loss in losses:
        (g,) = torch.autograd.grad(loss.sum(), pol)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("name", ["forward_kl", "alpha"])
def test_paper_form_overflow_is_an_error_not_a_nan(name):
    # chosen and rejected differ by 5000 nats within the policy: f'_FKL(e^-5000) = -e^5000.
    pc, pr, rc, rr = (
        torch.tensor([v], dtype=torch.float32) for v in (-6000.0, -1000.0, -6000.0, -1000.0)
    )
    with pytest.raises(
        ValueError, match="iupo_loss: the loss is not representable in torch.float32 for 1 pair"
    ):
        iupo_loss(pc, pr, rc, rr, 0.1, divergence_of(name))
    assert torch.isfinite(iupo_loss(pc, pr, rc, rr, 0.1, divergence_of(name), form="kkt")).all()


def test_preference_metrics_count_a_tie_as_half():
    # Pair 0: chosen ahead; pair 1: a tie (equal implicit rewards, unequal log-probs);
    # pair 2: behind.
    pc, pr = t64(-1.0, -3.0, -4.0), t64(-2.0, -5.0, -1.0)
    rc, rr = t64(-1.5, -2.0, -3.0), t64(-1.5, -4.0, -3.0)
    m = preference_metrics(pc, pr, rc, rr, 0.5)
    assert m["rewards/margins"].tolist() == [0.5, 0.0, -1.5]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.5, 0.0]
    assert m["rewards/ties"].tolist() == [0.0, 1.0, 0.0]
    # pi = pi_ref: every pair is a tie, and the accuracy is chance exactly.
    at_reference = preference_metrics(rc, rr, rc, rr, 0.1)
    assert at_reference["rewards/accuracies"].mean().item() == 0.5


# --- shift invariance ---------------------------------------------------------------------------
# (a) a constant added to one response's policy and reference log-prob; (b) to both responses of
# one model. On dyadic inputs and shifts every difference is exact, so a loss that has the
# invariance gives the same bits.
SHIFTS = {
    "a: chosen, both models": (1, 0, 1, 0),
    "a: rejected, both models": (0, 1, 0, 1),
    "b: policy, both responses": (1, 1, 0, 0),
    "b: reference, both responses": (0, 0, 1, 1),
}
INVARIANCES = {  # the loss -> which shifts it is invariant to (module docstring of upo_ref.losses)
    "dpo": "ab",
    "ipo": "ab",
    "fdpo": "a",
    "iupo_kkt": "a",
    "iupo_paper": "b",
}
SHIFT_LOSSES = {
    "dpo": lambda logps, beta: dpo_loss(*logps, beta),
    "ipo": lambda logps, beta: ipo_loss(*logps, beta),
    "fdpo": lambda logps, beta: fdpo_loss(*logps, beta, JS),
    "iupo_kkt": lambda logps, beta: iupo_loss(*logps, beta, JS, form="kkt"),
    "iupo_paper": lambda logps, beta: iupo_loss(*logps, beta, JS),
}


HAS = [(kind, s) for kind in SHIFT_LOSSES for s in SHIFTS if s[0] in INVARIANCES[kind]]
LACKS = [(kind, s) for kind in SHIFT_LOSSES for s in SHIFTS if s[0] not in INVARIANCES[kind]]


@pytest.mark.parametrize("kind, shift", HAS)
@given(logps=dyadic_logp_batches(), beta=betas, k=st.integers(-(2**30), 2**30))
def test_shift_invariance_holds_bit_for_bit_where_the_loss_has_it(kind, shift, logps, beta, k):
    c = k * 2.0**-20
    shifted = tuple(x + c * m for x, m in zip(logps, SHIFTS[shift], strict=True))
    assert torch.equal(SHIFT_LOSSES[kind](shifted, beta), SHIFT_LOSSES[kind](logps, beta))


@pytest.mark.parametrize("kind, shift", LACKS)
def test_shift_invariance_fails_where_the_loss_lacks_it(kind, shift):
    # Under Jensen-Shannon the invariances a form lacks really are absent (a shift of 3 nats).
    logps = t64(-1.0), t64(-2.0), t64(-3.0), t64(-1.0)
    shifted = tuple(x + 3.0 * m for x, m in zip(logps, SHIFTS[shift], strict=True))
    moved = SHIFT_LOSSES[kind](shifted, 0.5) - SHIFT_LOSSES[kind](logps, 0.5)
    assert moved.abs().item() > 1e-3
