"""Auxiliary-objective UPO (upo_ref.auxiliary.losses): closed forms, the issue's properties, bad
inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from strategies import F64_RTOL, betas, dyadic_logp_batches, logp_batches

from upo_ref.auxiliary.baselines import kto_loss, kto_reference_point, modpo_loss
from upo_ref.auxiliary.losses import (
    WEIGHT_CAP,
    advantage_weights,
    advantages,
    auxiliary_loss,
    combine_rewards,
    upo_dpo_loss,
    upo_kto_loss,
    upo_loss,
)
from upo_ref.auxiliary.value_network import (
    ValueNetwork,
    expectile_loss,
    fit_value_network,
    last_token_pool,
)
from upo_ref.losses import dpo_loss

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731

alphas = st.floats(min_value=1e-3, max_value=100.0)
gammas = st.floats(min_value=0.0, max_value=10.0)
taus = st.floats(min_value=0.01, max_value=0.99)
FIT_ATOL = 1e-8  # 500 Adam steps on a convex 3-parameter fit, against the exact group expectile


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread each, so two xdist workers do not fight over the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vectors(n: int, low: float = -50.0, high: float = 50.0):
    return arrays(np.float64, (n,), elements=st.floats(min_value=low, max_value=high)).map(
        torch.from_numpy
    )


@st.composite
def upo_batches(draw):
    """Four log-prob tensors (B,), chosen/rejected rewards (B,) and values (B,)."""
    pc, pr, rc, rr = draw(logp_batches())
    n = pc.shape[0]
    return pc, pr, rc, rr, draw(vectors(n)), draw(vectors(n)), draw(vectors(n))


# --- advantage weights ----------------------------------------------------------------------------
def test_weights_closed_form():
    alpha = 0.5
    a = T(0.0, alpha * math.log(2.0), -alpha * math.log(4.0), 10.0)
    w = advantage_weights(a, alpha)
    torch.testing.assert_close(w, T(1.0, 2.0, 0.25, WEIGHT_CAP), rtol=F64_RTOL, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(
    a=st.lists(st.floats(allow_nan=False, allow_infinity=True, width=32), min_size=1, max_size=16),
    alpha=alphas,
    cap=st.floats(min_value=1.0, max_value=1e6),
)
def test_weights_finite_for_any_advantage(dtype, a, alpha, cap):
    a = torch.tensor(a + [1e30, -1e30, math.inf, -math.inf], dtype=dtype)
    w = advantage_weights(a, alpha, cap)
    assert w.dtype == dtype and bool(torch.isfinite(w).all())
    assert bool((w >= 0).all()) and bool((w <= cap * (1 + 1e-6)).all())


@given(a=vectors(16, -1e3, 1e3), alpha=alphas)
def test_weights_increase_with_advantage_and_are_detached(a, alpha):
    a = a.clone().requires_grad_(True)
    w = advantage_weights(a, alpha)
    assert not w.requires_grad
    order = torch.argsort(a.detach())
    assert bool((w[order].diff() >= 0).all())


# --- the advantage-weighted MLE term --------------------------------------------------------------
@given(batch=logp_batches(), alpha=alphas)
def test_auxiliary_gradient_is_minus_the_weight(batch, alpha):
    """d L_pi / d log pi(y|x) = -w(A): every log pi is raised, in proportion to its weight."""
    logps = batch[0].clone().requires_grad_(True)
    a = (batch[1] - batch[2]) / 10  # advantages of either sign
    auxiliary_loss(logps, a, alpha).sum().backward()
    w = advantage_weights(a, alpha)
    assert torch.equal(logps.grad, -w)
    assert bool((logps.grad <= 0).all())  # gradient descent raises every log pi ...
    order = torch.argsort(a)  # ... and raises higher-advantage responses at least as much
    assert bool((logps.grad[order].diff() <= 0).all())


def test_auxiliary_term_alone_is_minimised_by_the_weighted_data():
    """Over a categorical policy, L_pi is minimised at pi(y) proportional to sum of w over samples
    of y."""
    y = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    a = T(0.3, -1.0, 2.0, 0.0, 0.5, -0.2, 1.1)
    alpha = 0.7
    w = torch.exp(a / alpha)  # no cap binds here
    target = torch.zeros(4, dtype=torch.float64).index_add_(0, y, w)
    theta = torch.log(target / target.sum()).requires_grad_(True)
    auxiliary_loss(torch.log_softmax(theta, -1)[y], a, alpha).mean().backward()
    torch.testing.assert_close(theta.grad, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-15)


def test_advantages_detach_the_value():
    values = T(1.0, 2.0).requires_grad_(True)
    a = advantages(T(3.0, 1.0), values)
    assert torch.equal(a, T(2.0, -1.0)) and not a.requires_grad


# --- gamma = 0 is the base method, bit for bit ----------------------------------------------------
@given(batch=upo_batches(), beta=betas, alpha=alphas)
def test_upo_dpo_gamma_zero_is_dpo_exactly(batch, beta, alpha):
    logps = [t.clone().requires_grad_(True) for t in batch[:4]]
    base = [t.clone().requires_grad_(True) for t in batch[:4]]
    upo = upo_dpo_loss(*logps, *batch[4:], beta=beta, gamma=0.0, alpha=alpha)
    dpo = dpo_loss(*base, beta)
    assert torch.equal(upo, dpo)
    upo.sum().backward()
    dpo.sum().backward()
    for a, b in zip(logps, base, strict=True):
        assert torch.equal(a.grad, b.grad)


@given(batch=upo_batches(), beta=betas, alpha=alphas, z0=st.floats(0.0, 10.0))
def test_upo_kto_gamma_zero_is_kto_exactly(batch, beta, alpha, z0):
    pc, _, rc, _, rewards, _, values = batch
    desirable = torch.arange(pc.shape[0]) % 2 == 0
    p1, p2 = pc.clone().requires_grad_(True), pc.clone().requires_grad_(True)
    upo = upo_kto_loss(p1, rc, desirable, z0, rewards, values, beta, gamma=0.0, alpha=alpha)
    kto = kto_loss(p2, rc, desirable, z0, beta)
    assert torch.equal(upo, kto)
    upo.sum().backward()
    kto.sum().backward()
    assert torch.equal(p1.grad, p2.grad)


@given(batch=upo_batches(), beta=betas, gamma=gammas, alpha=alphas)
def test_upo_dpo_is_dpo_plus_gamma_mean_auxiliary(batch, beta, gamma, alpha):
    pc, pr, rc, rr, r_w, r_l, v = batch
    w_w = torch.exp(torch.clamp((r_w - v) / alpha, max=math.log(WEIGHT_CAP)))
    w_l = torch.exp(torch.clamp((r_l - v) / alpha, max=math.log(WEIGHT_CAP)))
    expected = dpo_loss(pc, pr, rc, rr, beta) + gamma * (-w_w * pc - w_l * pr) / 2
    got = upo_dpo_loss(pc, pr, rc, rr, r_w, r_l, v, beta, gamma, alpha)
    torch.testing.assert_close(got, expected, rtol=F64_RTOL, atol=1e-12)


def test_upo_trains_no_value():
    values = T(0.1, -0.3).requires_grad_(True)
    pc = T(-1.0, -2.0).requires_grad_(True)
    upo_dpo_loss(
        pc,
        T(-2.0, -1.0),
        T(-1.5, -1.5),
        T(-1.5, -1.5),
        T(1.0, 0.0),
        T(0.0, 1.0),
        values,
        0.1,
        1.0,
        1.0,
    ).sum().backward()
    assert values.grad is None and pc.grad is not None


def test_upo_loss_sums():
    assert torch.equal(upo_loss(T(1.0, 2.0), T(0.5, -4.0), 2.0), T(2.0, -6.0))


# --- expectile regression -------------------------------------------------------------------------
@given(v=vectors(8), r=vectors(8))
def test_expectile_at_half_is_half_squared_error(v, r):
    torch.testing.assert_close(expectile_loss(v, r, 0.5), 0.5 * (r - v) ** 2, rtol=F64_RTOL, atol=0)


def test_expectile_closed_form_asymmetry():
    # tau = 0.8: u = R - V = 2 costs 0.8 * 4; u = -2 costs 0.2 * 4.
    torch.testing.assert_close(
        expectile_loss(T(0.0, 0.0), T(2.0, -2.0), 0.8), T(3.2, 0.8), rtol=F64_RTOL, atol=0
    )


def _expectile(targets: torch.Tensor, tau: float) -> float:
    """Reference tau-expectile: the root m of tau sum (t - m)_+ = (1 - tau) sum (m - t)_+, by
    bisection.

    The left side minus the right falls strictly in m, so the root is unique and in [min t, max t].
    """
    t = targets.tolist()
    lo, hi = min(t), max(t)
    for _ in range(100):
        m = (lo + hi) / 2
        if tau * sum(max(x - m, 0.0) for x in t) > (1 - tau) * sum(max(m - x, 0.0) for x in t):
            lo = m
        else:
            hi = m
    return (lo + hi) / 2


@given(r=vectors(12, -10.0, 10.0), t1=taus, t2=taus)
def test_expectile_minimiser_orders_with_tau(r, t1, t2):
    """The loss's minimiser is the tau-expectile: no step from it lowers the mean loss, and it rises
    with tau."""
    t1, t2 = min(t1, t2), max(t1, t2)
    m1, m2 = _expectile(r, t1), _expectile(r, t2)
    assert r.min().item() <= m1 <= m2 <= r.max().item()
    assert _expectile(r, 0.5) == pytest.approx(r.mean().item(), abs=1e-12)
    for tau, m in ((t1, m1), (t2, m2)):
        v = torch.tensor([m - 1e-3, m, m + 1e-3], dtype=torch.float64)
        mean_loss = torch.stack([expectile_loss(torch.full_like(r, x), r, tau).mean() for x in v])
        assert mean_loss[1] <= mean_loss[0] and mean_loss[1] <= mean_loss[2]


# --- the value network ----------------------------------------------------------------------------
def test_value_network_shapes_and_zero_start():
    net = ValueNetwork(3, hidden_sizes=(5, 4), dtype=torch.float64)
    assert torch.equal(
        net(torch.randn(7, 3, dtype=torch.float64)), torch.zeros(7, dtype=torch.float64)
    )
    head = ValueNetwork(3, hidden_sizes=())
    assert len(list(head.parameters())) == 2  # a linear head: one weight, one bias


@pytest.mark.parametrize("tau", [0.5, 0.9])
def test_value_head_fits_the_group_expectile(tau):
    """One-hot prompt features and a linear head: the fit is each prompt's tau-expectile of R."""
    prompt = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    rewards = T(1.0, 2.0, 4.0, -1.0, 0.5, 0.0, 0.0, 3.0, -2.0)
    features = torch.eye(3, dtype=torch.float64)[prompt]
    torch.manual_seed(0)
    net = ValueNetwork(3, hidden_sizes=(), dtype=torch.float64)
    fit_value_network(net, features, rewards, tau=tau, steps=500, lr=0.05)
    with torch.no_grad():
        got = net(torch.eye(3, dtype=torch.float64))
    expected = [_expectile(rewards[prompt == k], tau) for k in range(3)]
    torch.testing.assert_close(got, T(*expected), rtol=0, atol=FIT_ATOL)


def test_last_token_pool():
    h = torch.arange(2 * 3 * 2, dtype=torch.float64).reshape(2, 3, 2)  # (B=2, T=3, H=2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(last_token_pool(h, mask), torch.stack([h[0, 1], h[1, 2]]))


# --- KTO ------------------------------------------------------------------------------------------
def test_kto_worked_case():
    # r = log pi - log pi_ref = (0.5, -1.0); z0 = 0.25; beta = 2; lambda_D = 1, lambda_U = 1.5.
    desirable_mask = torch.tensor([True, False])
    got = kto_loss(
        T(-1.0, -2.0), T(-1.5, -1.0), desirable_mask, 0.25, beta=2.0, lambda_d=1.0, lambda_u=1.5
    )
    desirable = 1 - 1 / (1 + math.exp(-2.0 * (0.5 - 0.25)))  # 1 - sigma(beta (r - z0))
    undesirable = 1.5 * (
        1 - 1 / (1 + math.exp(-2.0 * (0.25 + 1.0)))
    )  # lambda_U (1 - sigma(beta (z0 - r)))
    torch.testing.assert_close(got, T(desirable, undesirable), rtol=F64_RTOL, atol=0)


def test_kto_reference_point_is_clamped_detached_mean():
    p = T(-1.0, -4.0).requires_grad_(True)
    z0 = kto_reference_point(p, T(-2.0, -1.0))  # log-ratios 1, -3: mean -1, clamped to 0
    assert z0.item() == 0.0 and not z0.requires_grad and z0.dim() == 0
    assert kto_reference_point(T(0.0, -1.0), T(-2.0, -1.0)).item() == 1.0


@given(batch=logp_batches(low=-20.0), beta=betas, z0=st.floats(0.0, 5.0))
def test_kto_bounds_and_gradient_signs(batch, beta, z0):
    pc, _, rc, _ = batch
    desirable = torch.arange(pc.shape[0]) % 3 != 0
    p = pc.clone().requires_grad_(True)
    z = torch.tensor(z0, dtype=torch.float64, requires_grad=True)
    loss = kto_loss(p, rc, desirable, z, beta, lambda_d=2.0, lambda_u=0.5)
    lam = torch.where(desirable, 2.0, 0.5).to(torch.float64)
    assert bool(((loss >= 0) & (loss <= lam)).all())
    loss.sum().backward()
    assert z.grad is None  # z0 is a constant
    assert bool((p.grad[desirable] <= 0).all()) and bool((p.grad[~desirable] >= 0).all())


# --- MODPO ----------------------------------------------------------------------------------------
@given(batch=dyadic_logp_batches(), beta=betas, margin=st.floats(-1e3, 1e3))
def test_modpo_without_margin_weight_is_dpo_exactly(batch, beta, margin):
    n = batch[0].shape[0]
    m = torch.full((n,), margin, dtype=torch.float64)
    assert torch.equal(modpo_loss(*batch, m, -m, beta, (1.0, 0.0)), dpo_loss(*batch, beta))


def test_modpo_worked_case():
    # h = (-1 - -3) - (-2 - -2) = 2; beta h = 1; w = (0.5, 0.5); margin 0.5 (3 - 1) = 1:
    # logits = (1 - 1) / 0.5 = 0 -> log 2.  Second pair: h = 0, margin 0.5 (1 - 3) = -1: logits 2.
    pc, pr, rc, rr = T(-1.0, -2.0), T(-3.0, -2.0), T(-2.0, -2.0), T(-2.0, -2.0)
    got = modpo_loss(pc, pr, rc, rr, T(3.0, 1.0), T(1.0, 3.0), 0.5, (0.5, 0.5))
    torch.testing.assert_close(
        got, T(math.log(2.0), math.log1p(math.exp(-2.0))), rtol=F64_RTOL, atol=0
    )


def test_modpo_several_margins_is_their_weighted_sum():
    pc, pr, rc, rr = T(-1.0), T(-3.0), T(-2.0), T(-2.0)
    two = modpo_loss(pc, pr, rc, rr, T(1.0, 4.0)[None], T(0.0, 1.0)[None], 0.5, (0.4, 0.2, 0.1))
    one = modpo_loss(pc, pr, rc, rr, T(0.2 * 1.0 + 0.1 * 4.0), T(0.1 * 1.0), 0.5, (0.4, 1.0))
    torch.testing.assert_close(two, one, rtol=F64_RTOL, atol=0)


def test_combine_rewards():
    assert torch.equal(
        combine_rewards(T(1.0, 2.0, 3.0, 4.0).reshape(2, 2), (0.5, 2.0)), T(4.5, 9.5)
    )


# --- bad inputs: each raises a ValueError that names the argument ---------------------------------
x2 = T(-1.0, -2.0)
BAD = [
    ("gamma", lambda: upo_loss(x2, x2, -0.1)),
    ("gamma", lambda: upo_loss(x2, x2, math.nan)),
    ("alpha", lambda: advantage_weights(x2, 0.0)),
    ("alpha", lambda: advantage_weights(x2, -1.0)),
    ("cap", lambda: advantage_weights(x2, 1.0, cap=math.inf)),
    ("cap", lambda: advantage_weights(x2, 1.0, cap=0.0)),
    ("advantages", lambda: advantage_weights(T(math.nan), 1.0)),
    ("advantages", lambda: auxiliary_loss(x2, T(1.0), 1.0)),
    ("policy_logps", lambda: auxiliary_loss(T(-math.inf, 0.0), x2, 1.0)),
    ("tau", lambda: expectile_loss(x2, x2, 0.0)),
    ("tau", lambda: expectile_loss(x2, x2, 1.0)),
    ("tau", lambda: expectile_loss(x2, x2, 1.5)),
    ("targets", lambda: expectile_loss(x2, T(1.0, 2.0, 3.0), 0.5)),
    ("rewards", lambda: advantages(T(math.nan, 1.0), x2)),
    ("values", lambda: advantages(x2, x2.float())),
    ("desirable", lambda: kto_loss(x2, x2, torch.tensor([1, 0]), 0.0, 0.1)),
    ("desirable", lambda: kto_loss(x2, x2, torch.tensor([True]), 0.0, 0.1)),
    ("z0", lambda: kto_loss(x2, x2, torch.tensor([True, False]), math.inf, 0.1)),
    ("lambda_u", lambda: kto_loss(x2, x2, torch.tensor([True, False]), 0.0, 0.1, lambda_u=-1.0)),
    ("beta", lambda: kto_loss(x2, x2, torch.tensor([True, False]), 0.0, 0.0)),
    ("w", lambda: modpo_loss(x2, x2, x2, x2, x2, x2, 0.1, (0.0, 1.0))),
    ("chosen_margin_rewards", lambda: modpo_loss(x2, x2, x2, x2, x2, x2, 0.1, (0.5, 0.2, 0.3))),
    (
        "rejected_margin_rewards",
        lambda: modpo_loss(x2, x2, x2, x2, x2, T(math.nan, 0.0), 0.1, (0.5, 0.5)),
    ),
    ("weights", lambda: combine_rewards(T(1.0, 2.0).reshape(1, 2), (1.0,))),
    ("in_features", lambda: ValueNetwork(0)),
    ("features", lambda: ValueNetwork(3)(torch.zeros(2, 4))),
    ("attention_mask", lambda: last_token_pool(torch.zeros(1, 2, 3), torch.zeros(1, 2))),
]


@pytest.mark.parametrize("name,call", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_inputs_raise_naming_the_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call()
