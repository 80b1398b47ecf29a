"""Theorem 3.1 (KKT), Prop. 3.2 (f-DPO from UPO), eq. (7) and Bradley-Terry, on finite action
sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from strategies import ADMISSIBLE_NAMES, admissible_divergences, divergence_of

from upo_ref.divergences import get_divergence
from upo_ref.losses import fdpo_loss
from upo_ref.optimal import (
    bradley_terry,
    expected_psi,
    implied_lambda,
    kkt_residual,
    optimal_policy,
    preference_matrix,
    psi_identity,
    psi_logit,
    solve_numerically,
    upo_objective,
)

KKT_TOL = (
    1e-11  # residuals of the closed form, relative to the problem's scale (|r| <= 3, beta >= 0.05)
)
SOLVER_ATOL = 1e-5  # L-BFGS on softmax logits vs the closed form, in probability
OBJECTIVE_RTOL = 1e-12  # J(closed form) >= J(anything else) - this * scale


@st.composite
def problems(draw, k_min=2, k_max=8):
    k = draw(st.integers(k_min, k_max))
    rewards = torch.from_numpy(draw(arrays(np.float64, (k,), elements=st.floats(-3, 3))))
    logits = torch.from_numpy(draw(arrays(np.float64, (k,), elements=st.floats(-3, 3))))
    beta = draw(st.floats(0.05, 5.0))
    return rewards, torch.softmax(logits, 0), beta


def random_policies(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample((n,)), g


# --- Theorem 3.1 ----------------------------------------------------------------------------------
@given(problem=problems(), div=admissible_divergences())
def test_theorem_3_1_closed_form_satisfies_kkt_with_eta_zero(problem, div):
    rewards, pi_ref, beta = problem
    pi, lam = optimal_policy(rewards, pi_ref, beta, div, return_lam=True)
    assert (pi > 0).all()  # 0 not in dom f' forces full support
    res = kkt_residual(pi, rewards, pi_ref, beta, div, lam=lam)
    assert res.max() <= KKT_TOL * (1 + rewards.abs().max().item() + beta)
    # eq. (12)/(16): E Psi(p*) = beta f'(pi*/pi_ref) + lambda with ONE constant lambda
    implied = implied_lambda(pi, rewards, pi_ref, beta, div)
    assert (implied - lam).abs().max().item() <= KKT_TOL * (1 + rewards.abs().max().item() + beta)


@settings(max_examples=30)
@given(problem=problems(), div=admissible_divergences())
def test_theorem_3_1_closed_form_matches_an_independent_numerical_solver(problem, div):
    rewards, pi_ref, beta = problem
    pi = optimal_policy(rewards, pi_ref, beta, div)
    numeric = solve_numerically(rewards, pi_ref, beta, div)
    j_closed = upo_objective(pi, rewards, pi_ref, beta, div).item()
    j_numeric = upo_objective(numeric, rewards, pi_ref, beta, div).item()
    assert j_closed >= j_numeric - OBJECTIVE_RTOL * (1 + abs(j_closed))
    assert (pi - numeric).abs().max().item() <= SOLVER_ATOL


@given(problem=problems(), div=admissible_divergences(), seed=st.integers(0, 2**31))
def test_theorem_3_1_closed_form_beats_random_feasible_policies(problem, div, seed):
    rewards, pi_ref, beta = problem
    j_star = upo_objective(
        optimal_policy(rewards, pi_ref, beta, div), rewards, pi_ref, beta, div
    ).item()
    others, _ = random_policies(len(rewards), 50, seed)
    for other in others:
        assert j_star >= upo_objective(
            other, rewards, pi_ref, beta, div
        ).item() - OBJECTIVE_RTOL * (1 + abs(j_star))


@given(problem=problems())
def test_theorem_3_1_under_reverse_kl_is_the_softmax_policy(problem):
    rewards, pi_ref, beta = problem
    expected = torch.softmax(torch.log(pi_ref) + rewards / beta, dim=0)
    torch.testing.assert_close(
        optimal_policy(rewards, pi_ref, beta, "reverse_kl"), expected, rtol=1e-12, atol=0
    )


@given(problem=problems(), div=admissible_divergences(), seed=st.integers(0, 2**31))
def test_kkt_residual_flags_non_optimal_policies(problem, div, seed):
    rewards, pi_ref, beta = problem
    pi = optimal_policy(rewards, pi_ref, beta, div)
    other, _ = random_policies(len(rewards), 1, seed)
    other = 0.5 * pi + 0.5 * other[0]  # feasible, with full support, not optimal
    j_gap = (
        upo_objective(pi, rewards, pi_ref, beta, div)
        - upo_objective(other, rewards, pi_ref, beta, div)
    ).item()
    if j_gap > 1e-8:  # a truly worse policy violates eq. (16) somewhere
        assert kkt_residual(other, rewards, pi_ref, beta, div).stationarity > 1e-6


@given(problem=problems(k_min=3))
def test_theorem_3_1_from_a_preference_matrix(problem):
    # r(y) = E_{y'~mu} Psi(p*(y > y')) for an arbitrary (not Bradley-Terry) preference matrix.
    _, pi_ref, beta = problem
    k = len(pi_ref)
    g = torch.Generator().manual_seed(k)
    upper = torch.rand(k, k, generator=g, dtype=torch.float64).triu(1)
    P = upper + (1 - upper.T).tril(-1) + 0.5 * torch.eye(k, dtype=torch.float64)  # P + P^T = 1
    mu = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    rewards = expected_psi(P, mu, psi_identity)
    for name in ADMISSIBLE_NAMES:
        div = divergence_of(name)
        pi, lam = optimal_policy(rewards, pi_ref, beta, div, return_lam=True)
        assert kkt_residual(pi, rewards, pi_ref, beta, div, lam=lam).max() <= KKT_TOL * (1 + beta)


# --- the case Theorem 3.1 excludes: chi-squared ---------------------------------------------------
CHI = get_divergence("chi_squared")
CHI_REWARDS = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
CHI_REF = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
CHI_BETA = 0.5


def test_chi_squared_optimum_puts_zero_mass_where_the_theorem_says_it_cannot():
    pi, lam = optimal_policy(CHI_REWARDS, CHI_REF, CHI_BETA, CHI, return_lam=True)
    # By hand: pi* = pi_ref max(0, 1 + (r - lam)/(2 beta)) = pi_ref max(0, 1 + r - lam). With y3 at
    # zero, 0.2 (3 - lam) + 0.3 (2 - lam) = 1 gives lam = 0.2 / 0.5 = 0.4, pi* = (0.52, 0.48, 0),
    # and y3 indeed has 1 + r3 - lam = -0.4 < 0.
    assert lam == pytest.approx(0.4, rel=1e-14)
    torch.testing.assert_close(
        pi, torch.tensor([0.52, 0.48, 0.0], dtype=torch.float64), rtol=1e-14, atol=0
    )
    # It is still a KKT point: eta >= 0 with complementary slackness ...
    res = kkt_residual(pi, CHI_REWARDS, CHI_REF, CHI_BETA, CHI, lam=lam)
    assert res.max() <= KKT_TOL
    # ... but eta(y3) = lam + beta f'(0) - r(y3) = 0.4 - 1 + 1 = 0.4 > 0, so the reparameterisation
    # r = beta f'(pi*/pi_ref) + lambda ("constant lambda", eq. 16) fails on y3:
    assert res.eta[2].item() == pytest.approx(0.4, rel=1e-14)
    implied = implied_lambda(pi, CHI_REWARDS, CHI_REF, CHI_BETA, CHI)
    assert implied[:2].tolist() == pytest.approx([lam, lam], rel=1e-14)
    assert implied[2].item() == pytest.approx(lam - 0.4, abs=1e-14)
    # and solving eq. (16) as if eta were 0 gives a negative "probability" for y3:
    unclipped = CHI_REF * (1 + (CHI_REWARDS - lam) / (2 * CHI_BETA))
    assert unclipped[2].item() < 0


def test_chi_squared_closed_form_agrees_with_the_numerical_solver():
    pi = optimal_policy(CHI_REWARDS, CHI_REF, CHI_BETA, CHI)
    numeric = solve_numerically(CHI_REWARDS, CHI_REF, CHI_BETA, CHI)
    assert numeric[2].item() < 1e-6  # the solver drives y3 to zero from above
    assert (pi - numeric).abs().max().item() <= SOLVER_ATOL
    j = upo_objective(pi, CHI_REWARDS, CHI_REF, CHI_BETA, CHI).item()
    assert j >= upo_objective(numeric, CHI_REWARDS, CHI_REF, CHI_BETA, CHI).item() - OBJECTIVE_RTOL


def test_admissible_divergences_refuse_a_zero_probability():
    # With 0 not in dom f', pi(y) = 0 would need eta(y) = -inf: dual feasibility fails infinitely.
    pi = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)
    for name in ADMISSIBLE_NAMES:
        assert (
            kkt_residual(pi, CHI_REWARDS, CHI_REF, CHI_BETA, divergence_of(name)).dual_feasibility
            == math.inf
        )


def test_total_variation_has_no_closed_form():
    with pytest.raises(ValueError, match="step function"):
        optimal_policy(CHI_REWARDS, CHI_REF, CHI_BETA, "total_variation")


# --- Prop. 3.2 and eq. (7) ------------------------------------------------------------------------
@given(problem=problems(k_min=3), div=admissible_divergences())
def test_prop_3_2_optimal_policy_reproduces_bradley_terry_preferences(problem, div):
    r, pi_ref, beta = problem
    mu = torch.full_like(pi_ref, 1 / len(pi_ref))
    R = expected_psi(preference_matrix(r), mu, psi_logit)  # = r - E_mu r (eq. 7)
    pi = optimal_policy(R, pi_ref, beta, div)
    score = beta * div.f_prime(pi / pi_ref)  # beta f'(pi*/pi_ref): (K,)
    model = torch.sigmoid(score[:, None] - score[None, :])  # eq. (20)
    torch.testing.assert_close(model, preference_matrix(r), rtol=0, atol=1e-11)


def population_fdpo_loss(logits, r, pi_ref, beta, div):
    """E over ordered pairs (i, j) ~ uniform, labelled i > j with probability p*(i > j), of eq.
    (21)."""
    k = len(r)
    i, j = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    i, j = i[i != j], j[i != j]
    logp, logref = torch.log_softmax(logits, 0), torch.log(pi_ref)
    weight = preference_matrix(r)[i, j]
    return (weight * fdpo_loss(logp[i], logp[j], logref[i], logref[j], beta, div)).sum() / len(i)


@settings(max_examples=30)
@given(problem=problems(k_min=3, k_max=6), div=admissible_divergences(), seed=st.integers(0, 2**31))
def test_prop_3_2_fdpo_population_loss_is_minimised_at_the_upo_optimum(problem, div, seed):
    r, pi_ref, beta = problem
    mu = torch.full_like(pi_ref, 1 / len(pi_ref))
    pi = optimal_policy(expected_psi(preference_matrix(r), mu, psi_logit), pi_ref, beta, div)
    logits = torch.log(pi).requires_grad_(True)
    best = population_fdpo_loss(logits, r, pi_ref, beta, div)
    (grad,) = torch.autograd.grad(best, logits)
    assert grad.abs().max().item() <= 1e-10  # stationary ...
    g = torch.Generator().manual_seed(seed)
    for _ in range(10):  # ... and a minimum
        other = logits.detach() + 0.3 * torch.randn(len(r), generator=g, dtype=torch.float64)
        assert population_fdpo_loss(other, r, pi_ref, beta, div).item() >= best.item() - 1e-12


@given(
    r=arrays(np.float64, st.integers(2, 8), elements=st.floats(-10, 10)), seed=st.integers(0, 2**31)
)
def test_eq_7_logit_of_bradley_terry_is_reward_plus_constant(r, seed):
    r = torch.from_numpy(r)
    g = torch.Generator().manual_seed(seed)
    mu = torch.softmax(torch.randn(len(r), generator=g, dtype=torch.float64), 0)
    # logit(sigma(d)) recovers d only to ~eps e^{|d|}: 1 - sigma(d) ~ e^{-d} is stored next to 1.
    roundtrip = 4 * torch.finfo(torch.float64).eps * (1 + math.exp(r.max().item() - r.min().item()))
    torch.testing.assert_close(
        expected_psi(preference_matrix(r), mu, psi_logit),
        r - (mu * r).sum(),
        rtol=0,
        atol=roundtrip,
    )


@given(rw=st.floats(-30, 30), rl=st.floats(-30, 30))
def test_bradley_terry_eq_1_equals_eq_2(rw, rl):
    eq1 = math.exp(rw) / (math.exp(rw) + math.exp(rl))
    assert bradley_terry(
        torch.tensor(rw, dtype=torch.float64), torch.tensor(rl, dtype=torch.float64)
    ).item() == pytest.approx(eq1, rel=1e-13, abs=1e-300)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_problems_raise():
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="pi_ref must be a strictly positive distribution"):
        optimal_policy(r, torch.tensor([0.7, 0.7], dtype=torch.float64), 0.1, "jensen_shannon")
    with pytest.raises(ValueError, match="pi_ref must be a strictly positive distribution"):
        optimal_policy(r, torch.tensor([1.0, 0.0], dtype=torch.float64), 0.1, "jensen_shannon")
    with pytest.raises(ValueError, match="rewards has shape \\(2,\\) but pi_ref has \\(3,\\)"):
        optimal_policy(r, torch.full((3,), 1 / 3, dtype=torch.float64), 0.1, "jensen_shannon")
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        optimal_policy(r, torch.tensor([0.5, 0.5], dtype=torch.float64), -1.0, "jensen_shannon")
    with pytest.raises(ValueError, match="rewards has 1 non-finite value"):
        optimal_policy(
            torch.tensor([1.0, math.nan], dtype=torch.float64),
            torch.tensor([0.5, 0.5], dtype=torch.float64),
            0.1,
            "reverse_kl",
        )
