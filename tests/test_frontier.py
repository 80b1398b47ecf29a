"""The toy frontier experiment (upo_ref.auxiliary.frontier): exact metrics, data, and the paper's
sanity checks."""

from __future__ import annotations

import math

import pytest
import torch
from strategies import F64_RTOL

from upo_ref.auxiliary.frontier import (
    Bandit,
    FrontierPoint,
    ToyConfig,
    auxiliary_value,
    fit_values,
    make_bandit,
    oracle_logps,
    sample_pairs,
    summarise,
    train_policy,
    win_rate,
)

SAMPLING_Z = 4.0  # a frequency must sit within 4 standard errors of its probability


@pytest.fixture(scope="module")
def toy():
    bandit = make_bandit(n_prompts=3, n_actions=5, seed=1)
    pairs = sample_pairs(bandit, 120, seed=2)
    return bandit, pairs, fit_values(bandit, pairs, steps=100)


def two_action_bandit(r0: float, r1: float, p0: float) -> Bandit:
    ref = torch.log(torch.tensor([[p0, 1 - p0]], dtype=torch.float64))
    return Bandit(
        ref,
        torch.tensor([[r0, r1]], dtype=torch.float64),
        torch.tensor([[1.0, -1.0]], dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
    )


def test_win_rate_and_auxiliary_closed_form():
    b = two_action_bandit(1.0, 0.0, 0.25)
    pi = torch.log(torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    s = 1 / (1 + math.exp(-1.0))  # sigma(r0 - r1)
    expected = 0.6 * (0.25 * 0.5 + 0.75 * s) + 0.4 * (0.25 * (1 - s) + 0.75 * 0.5)
    assert win_rate(b, pi).item() == pytest.approx(expected, rel=F64_RTOL)
    assert auxiliary_value(b, pi).item() == pytest.approx(0.6 - 0.4, rel=F64_RTOL)
    assert win_rate(b, b.reference_logps).item() == pytest.approx(0.5, rel=F64_RTOL)


def test_oracle_is_the_kl_regularised_optimum():
    """beta log(pi*/pi_ref) - (r + lam R) is the same for every response of a prompt (-beta log
    Z)."""
    b = make_bandit(seed=3)
    beta, lam = 0.7, 1.3
    gap = beta * (oracle_logps(b, beta, lam) - b.reference_logps) - (
        b.preference_reward + lam * b.auxiliary_reward
    )
    torch.testing.assert_close(gap - gap[:, :1], torch.zeros_like(gap), rtol=0, atol=1e-12)


def test_sampled_labels_follow_bradley_terry():
    b = two_action_bandit(0.8, 0.0, 0.5)
    pairs = sample_pairs(b, 4000, seed=0)
    assert bool((pairs.y_w != pairs.y_l).all())
    p = 1 / (1 + math.exp(-0.8))
    freq = (pairs.y_w == 0).double().mean().item()
    assert abs(freq - p) < SAMPLING_Z * math.sqrt(p * (1 - p) / 4000)


def test_make_bandit_conflict():
    b = make_bandit(n_prompts=20, n_actions=20, conflict=0.8, seed=0)
    corr = torch.corrcoef(
        torch.stack([b.preference_reward.flatten(), b.auxiliary_reward.flatten()])
    )[0, 1]
    assert corr < -0.6  # 400 draws: the sample correlation is within 0.2 of -0.8
    torch.testing.assert_close(
        b.reference_logps.exp().sum(-1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("base", ["dpo", "kto"])
def test_gamma_zero_trains_the_base_method_bit_for_bit(toy, base):
    bandit, pairs, values = toy
    plain = train_policy(bandit, pairs, ToyConfig(base, steps=25), values)
    upo = train_policy(bandit, pairs, ToyConfig(f"upo-{base}", gamma=0.0, steps=25), values)
    assert torch.equal(plain, upo)


def test_increasing_gamma_trades_preference_for_auxiliary_reward(toy):
    bandit, pairs, values = toy
    results = []
    for gamma in (0.0, 0.1, 1.0):
        logps = train_policy(bandit, pairs, ToyConfig("upo-dpo", gamma=gamma, steps=100), values)
        results.append((win_rate(bandit, logps).item(), auxiliary_value(bandit, logps).item()))
    wins, aux = zip(*results, strict=True)
    assert wins[0] > wins[1] > wins[2] and aux[0] < aux[1] < aux[2]


def test_fit_values_is_near_the_per_prompt_mean(toy):
    bandit, pairs, values = toy
    x = torch.cat([pairs.x, pairs.x])
    r = bandit.auxiliary_reward[x, torch.cat([pairs.y_w, pairs.y_l])]
    means = torch.stack([r[x == k].mean() for k in range(bandit.n_prompts)])
    assert (
        fit_values(bandit, pairs, steps=400) - means
    ).abs().max() < 0.05  # tau = 0.5: least squares


def test_summarise_means_and_intervals():
    c = ToyConfig("dpo")
    rows = summarise([FrontierPoint(c, 0, 0.6, 1.0), FrontierPoint(c, 1, 0.8, 3.0)])
    assert rows[0]["n"] == 2
    assert rows[0]["win_rate"] == pytest.approx(0.7) and rows[0]["auxiliary"] == pytest.approx(2.0)
    # sample sd of (0.6, 0.8) is 0.1 sqrt 2; the half-width is 1.96 sd / sqrt 2 = 0.196.
    assert rows[0]["win_rate_ci"] == pytest.approx(0.196) and rows[0][
        "auxiliary_ci"
    ] == pytest.approx(1.96)


def test_config_and_training_errors(toy):
    bandit, pairs, _ = toy
    with pytest.raises(ValueError, match="method"):
        ToyConfig("ppo")
    with pytest.raises(ValueError, match="w_aux"):
        ToyConfig("modpo", w_aux=1.0)
    with pytest.raises(ValueError, match="values"):
        train_policy(bandit, pairs, ToyConfig("upo-dpo", gamma=1.0, steps=1))
    with pytest.raises(ValueError, match="conflict"):
        make_bandit(conflict=1.5)
