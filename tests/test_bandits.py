"""The bandit experiment: datasets, empirical preferences, population targets, and the training
loop."""

from __future__ import annotations

import math

import pytest
import torch
from strategies import ADMISSIBLE_NAMES, divergence_of

from upo_ref.experiments.analysis import paper_reachability_threshold
from upo_ref.experiments.bandit_data import D1, D3, PreferenceData, preference_population
from upo_ref.experiments.bandit_targets import (
    bandit_target,
    closed_form_target,
    empirical_preferences,
    empirical_rewards,
    population_loss,
    population_minimiser,
)
from upo_ref.experiments.bandits import (
    BANDIT_FAST,
    BANDIT_FULL,
    BanditConfig,
    bandit_config,
    bandit_losses,
    train_bandit,
)
from upo_ref.losses import PreferenceLoss
from upo_ref.optimal import expected_psi, optimal_policy, preference_matrix, psi_logit

UNIFORM = torch.full((3,), 1 / 3, dtype=torch.float64)
LBFGS_ATOL = (
    1e-8  # population_minimiser (L-BFGS, gradient < 1e-8) against a closed form, in probability
)
BANDIT_ATOL = (
    5e-3  # mean over 40 seeds of a noisy Adam run against its population optimum, in probability
)
JS = divergence_of("jensen_shannon")
IPO, DPO = PreferenceLoss("ipo"), PreferenceLoss("dpo")
RKL_LIKE = [DPO, IPO, PreferenceLoss("iupo", JS, form="paper")]  # depend on theta_w - theta_l only
F_LIKE = [
    PreferenceLoss("fdpo", JS),
    PreferenceLoss("fdpo", "forward_kl"),
    PreferenceLoss("fdpo", divergence_of("alpha", 0.5)),
    PreferenceLoss("iupo", JS, form="kkt"),
]


def t64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# --- datasets and empirical preferences -------------------------------------------------------
def test_datasets_are_azar_et_als():
    assert D1.pairs == ((0, 1), (1, 2), (0, 2))  # a > b, b > c, a > c
    assert D3.pairs == ((0, 1), (1, 0))  # a > b, b > a; c never observed
    assert [loss.label for loss in bandit_losses()] == [
        "DPO",
        "IPO",
        "f-DPO (JS)",
        "f-DPO (FKL)",
        "f-DPO (alpha=0.5)",
        "JS-IUPO",
        "JS-IUPO (kkt)",
    ]


def test_empirical_preferences_by_hand():
    nan = math.nan
    P, mu = empirical_preferences(D1)
    assert P.tolist() == [[0.5, 1.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.0, 0.5]]
    torch.testing.assert_close(mu, UNIFORM, rtol=1e-15, atol=0)
    torch.testing.assert_close(empirical_rewards(D1), t64(5 / 6, 1 / 2, 1 / 6), rtol=1e-15, atol=0)
    P, mu = empirical_preferences(D3)
    torch.testing.assert_close(
        P, t64([0.5, 0.5, nan], [0.5, 0.5, nan], [nan, nan, 0.5]), equal_nan=True
    )
    assert mu.tolist() == [0.5, 0.5, 0.0]
    r = empirical_rewards(D3)
    assert r[:2].tolist() == [0.5, 0.5] and math.isnan(r[2].item())


def test_preference_population_has_the_preferences_it_was_built_from():
    P = preference_matrix(t64(1.0, 0.5, 0.0, -1.0))
    P_hat, mu = empirical_preferences(preference_population(P))
    torch.testing.assert_close(P_hat, P, rtol=0, atol=1e-15)
    torch.testing.assert_close(mu, torch.full((4,), 0.25, dtype=torch.float64), rtol=1e-15, atol=0)


def test_bad_datasets_and_configs_raise():
    with pytest.raises(ValueError, match="two different actions"):
        PreferenceData("bad", ((0, 0),))
    with pytest.raises(ValueError, match="two different actions"):
        PreferenceData("bad", ((0, 3),))
    with pytest.raises(ValueError, match="non-negative numbers"):
        PreferenceData("bad", ((0, 1),), weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="optimizer"):
        BanditConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        BanditConfig(steps=0)


def test_bandit_config_follows_fast_mode(monkeypatch):
    monkeypatch.setenv("UPO_REF_FAST", "1")
    assert bandit_config() is BANDIT_FAST
    monkeypatch.setenv("UPO_REF_FAST", "0")
    assert bandit_config() is BANDIT_FULL


# --- closed forms and the numerical population minimiser -----------------------------------------
def test_closed_form_target_refuses_d3_and_logit_on_d1():
    with pytest.raises(ValueError, match="action c is never compared"):
        closed_form_target(D3, UNIFORM, 0.5, "reverse_kl")
    with pytest.raises(ValueError, match="Psi = logit of a 0/1 preference"):
        closed_form_target(D1, UNIFORM, 0.5, "reverse_kl", psi=psi_logit)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 3.0])
def test_ipo_population_minimiser_is_azars_closed_form(beta):
    # pi* proportional to pi_ref exp(P_hat(y > mu) / beta); on D1, P_hat(y > mu) = (5/6, 1/2, 1/6)
    azar = torch.softmax(t64(5 / 6, 1 / 2, 1 / 6) / beta, 0)
    torch.testing.assert_close(
        closed_form_target(D1, UNIFORM, beta, "reverse_kl"), azar, rtol=1e-13, atol=0
    )
    assert (population_minimiser(D1, IPO, beta, UNIFORM) - azar).abs().max().item() <= LBFGS_ATOL
    target = bandit_target(D1, IPO, beta)
    assert target.how == "closed form" and torch.equal(
        target.pi, closed_form_target(D1, UNIFORM, beta, "reverse_kl")
    )


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("name", ["jensen_shannon", "forward_kl", "alpha"])
def test_iupo_kkt_population_minimiser_is_the_upo_optimum(name, beta):
    div = divergence_of(name, 0.5)
    numeric = population_minimiser(D1, PreferenceLoss("iupo", div, form="kkt"), beta, UNIFORM)
    closed = optimal_policy(empirical_rewards(D1), UNIFORM, beta, div)
    assert (numeric - closed).abs().max().item() <= LBFGS_ATOL


@pytest.mark.parametrize("name", ADMISSIBLE_NAMES)
def test_prop_3_2_fdpo_population_minimiser_is_the_upo_optimum_with_logit(name):
    div = divergence_of(name, 0.5)
    P = preference_matrix(t64(1.0, 0.5, 0.0, -1.0))
    pi_ref = t64(0.1, 0.2, 0.3, 0.4)
    mu = torch.full((4,), 0.25, dtype=torch.float64)
    closed = optimal_policy(expected_psi(P, mu, psi_logit), pi_ref, 0.5, div)
    numeric = population_minimiser(
        preference_population(P), PreferenceLoss("fdpo", div), 0.5, pi_ref
    )
    assert (numeric - closed).abs().max().item() <= LBFGS_ATOL


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.7, 0.75, 1.0, 3.0])
def test_paper_form_js_iupo_has_a_finite_target_iff_c_zero_is_reachable(beta):
    # uniform pi_ref: every pair has reference log-ratio c = 0, reachable iff c*(beta) > 0 iff beta
    # > 1/(2 log 2)
    loss = PreferenceLoss("iupo", JS, form="paper")
    target = bandit_target(D1, loss, beta)
    assert (
        (target.pi is not None)
        == (paper_reachability_threshold(beta, JS) > 0)
        == (beta > 1 / (2 * math.log(2)))
    )
    if target.pi is not None:
        theta = torch.log(target.pi).requires_grad_(True)
        (grad,) = torch.autograd.grad(population_loss(theta, D1, loss, beta, UNIFORM), theta)
        assert grad.abs().max().item() <= 1e-8 and target.how == "numerical"


@pytest.mark.parametrize("loss", [DPO] + F_LIKE[:3], ids=lambda loss: loss.label)
def test_dpo_and_fdpo_have_no_finite_target_on_deterministic_preferences(loss):
    assert bandit_target(D1, loss, 0.5).pi is None
    assert (
        population_minimiser(D1, loss, 0.5, UNIFORM) is None
    )  # the numerical check agrees with the theory


@pytest.mark.parametrize("loss", bandit_losses(), ids=lambda loss: loss.label)
def test_d3_target_is_the_uniform_stationary_point(loss):
    target = bandit_target(D3, loss, 0.1)
    assert target.how == "numerical"
    torch.testing.assert_close(target.pi, UNIFORM, rtol=1e-15, atol=0)


# --- why D3's unobserved action moves or not ------------------------------------------------------
@pytest.mark.parametrize("delta", [-0.5, 0.5, 2.0])
def test_population_gradient_on_the_unobserved_action(delta):
    theta = t64(delta, -delta, 0.0).requires_grad_(True)
    for loss in RKL_LIKE + F_LIKE:
        (grad,) = torch.autograd.grad(population_loss(theta, D3, loss, 0.1, UNIFORM), theta)
        if loss in RKL_LIKE:
            assert grad[2].item() == 0.0  # the softmax normaliser cancels in theta_w - theta_l
        else:
            assert grad[2].item() > 0.0  # f'(e^x) is concave in x: descent takes mass from c


# --- the training loop --------------------------------------------------------------------------
def test_train_bandit_ipo_converges_to_the_closed_form():
    config = BanditConfig(steps=1500, seeds=40, record_every=500)
    for beta in (0.5, 1.0):
        run = train_bandit(D1, IPO, beta, config)
        assert run.pi.shape == (4, 40, 3) and run.steps.tolist() == [0, 500, 1000, 1500]
        torch.testing.assert_close(
            run.pi[0], UNIFORM.expand(40, 3), rtol=0, atol=0
        )  # starts at pi_ref
        target = closed_form_target(D1, UNIFORM, beta, "reverse_kl")
        assert (run.final.mean(0) - target).abs().max().item() <= BANDIT_ATOL


def test_train_bandit_iupo_kkt_converges_to_the_js_upo_optimum():
    run = train_bandit(
        D1,
        PreferenceLoss("iupo", JS, form="kkt"),
        0.5,
        BanditConfig(steps=1500, seeds=40, record_every=500),
    )
    target = optimal_policy(empirical_rewards(D1), UNIFORM, 0.5, JS)
    assert (run.final.mean(0) - target).abs().max().item() <= BANDIT_ATOL


def test_train_bandit_dpo_drifts_to_determinism():
    run = train_bandit(D1, DPO, 0.5, BanditConfig(steps=2000, seeds=10, record_every=1000))
    pi_a = run.pi[:, :, 0]  # (T, S)
    assert (pi_a[1] < pi_a[2]).all() and (pi_a[2] > 0.99).all()


def test_reverse_kl_losses_never_move_the_unobserved_action():
    config = BanditConfig(steps=300, seeds=8, record_every=300)
    for loss in RKL_LIKE:
        run = train_bandit(D3, loss, 0.1, config)
        assert (
            run.theta[:, 2] == 0
        ).all()  # exactly: Adam turns any nonzero gradient into a full step
        assert run.theta[:, :2].sum(1).abs().max().item() <= 1e-12  # theta_a + theta_b is conserved
        assert (run.theta[:, 0] != 0).any()  # while a and b do move


def test_f_divergence_losses_drain_the_unobserved_action():
    config = BanditConfig(steps=1500, seeds=20, record_every=1500)
    for loss in (F_LIKE[0], F_LIKE[3]):  # f-DPO (JS), JS-IUPO (kkt)
        run = train_bandit(D3, loss, 0.5, config)
        assert run.final[:, 2].mean().item() < 1 / 3 - 0.1


def test_train_bandit_is_reproducible_and_seeds_differ():
    config = BanditConfig(steps=50, seeds=3, record_every=10)
    a, b = train_bandit(D1, IPO, 0.1, config), train_bandit(D1, IPO, 0.1, config)
    assert torch.equal(a.pi, b.pi)
    assert not torch.equal(a.theta[0], a.theta[1])
    c = train_bandit(D1, IPO, 0.1, BanditConfig(steps=50, seeds=3, record_every=10, seed=1))
    assert not torch.equal(a.theta, c.theta)


def test_train_bandit_weighted_data_and_sgd_follow_the_population_gradient():
    # One pair, batch 1, plain gradient descent: theta moves by exactly -lr * grad of its loss.
    pair = PreferenceData("one pair", ((0, 1),), n_actions=2, weights=(1.0,))
    config = BanditConfig(steps=1, seeds=2, batch_size=1, lr=0.1, optimizer="sgd", record_every=1)
    pi_ref = t64(0.25, 0.75)
    run = train_bandit(pair, IPO, 0.5, config, pi_ref=pi_ref)
    theta0 = torch.log(pi_ref) - torch.log(pi_ref).mean()
    at = theta0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(population_loss(at, pair, IPO, 0.5, pi_ref), at)
    torch.testing.assert_close(
        run.theta, (theta0 - 0.1 * grad).expand(2, 2), rtol=1e-15, atol=1e-16
    )
