"""Seed aggregation: Student-t quantiles against closed forms and tables, and the interval's
coverage."""

from __future__ import annotations

import math

import pytest
import torch

from upo_ref.utils.stats import (
    binomial_se,
    mean_interval,
    mean_se,
    paired_difference,
    student_t_quantile,
)

QUANTILE_RTOL = 1e-10  # Simpson's rule + bisection against exact values

# Closed forms: t(1) is the Cauchy distribution, t_p = tan(pi (p - 1/2)); t(2) has t_p = (2p - 1) /
# sqrt(2 p (1 - p)).
CLOSED_FORM = [(p, 1, math.tan(math.pi * (p - 0.5))) for p in (0.6, 0.9, 0.975, 0.995)] + [
    (p, 2, (2 * p - 1) / math.sqrt(2 * p * (1 - p))) for p in (0.6, 0.9, 0.975, 0.995)
]
# Tabulated values (scipy.stats.t.ppf, which is not a dependency of upo_ref), to 15 digits.
TABLE = [
    (0.975, 3, 3.1824463052837078),
    (0.975, 4, 2.7764451051977934),
    (0.975, 9, 2.262157162798205),
    (0.975, 29, 2.045229642132703),
    (0.975, 49, 2.0095752371292392),
    (0.975, 1000, 1.9623390808264083),
    (0.6, 2.5, 0.2814595127485477),
]


@pytest.mark.parametrize("p, dof, expected", CLOSED_FORM + TABLE)
def test_student_t_quantile_matches_closed_forms_and_tables(p, dof, expected):
    assert student_t_quantile(p, dof) == pytest.approx(expected, rel=QUANTILE_RTOL)


def test_student_t_quantile_far_tail_and_median():
    assert student_t_quantile(0.9995, 1) == pytest.approx(math.tan(math.pi * 0.4995), rel=1e-9)
    assert abs(student_t_quantile(0.5, 3)) < 1e-12


def test_student_t_quantile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="upper quantile"):
        student_t_quantile(0.3, 5)
    with pytest.raises(ValueError, match="dof must be > 0"):
        student_t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="exceeds 1000"):
        student_t_quantile(0.99999, 1)


def test_mean_interval_has_95_percent_coverage_with_few_seeds():
    # 4 seeds: the t factor is 3.18; a normal 1.96 would cover only ~86% of the time.
    g = torch.Generator().manual_seed(0)
    trials, seeds = 20_000, 4
    x = torch.randn(trials, seeds, generator=g, dtype=torch.float64) + 3.0  # true mean 3
    mean, lo, hi = mean_interval(x, dim=1)
    coverage = ((lo <= 3.0) & (3.0 <= hi)).double().mean().item()
    sd = math.sqrt(0.95 * 0.05 / trials)
    assert abs(coverage - 0.95) <= 4 * sd
    half = (hi - mean) * math.sqrt(seeds) / x.std(1)
    torch.testing.assert_close(
        half, torch.full_like(half, student_t_quantile(0.975, 3)), rtol=1e-14, atol=0
    )


def test_mean_interval_shapes_and_dimension():
    x = torch.arange(2 * 5 * 3, dtype=torch.float64).reshape(2, 5, 3)  # (T, S, K)
    mean, lo, hi = mean_interval(x, dim=1)
    assert mean.shape == lo.shape == hi.shape == (2, 3)
    torch.testing.assert_close(mean, x.mean(1))
    assert (lo < mean).all() and (mean < hi).all()
    with pytest.raises(ValueError, match="at least 2 seeds"):
        mean_interval(x[:, :1], dim=1)


def test_mean_se_and_binomial_se_against_hand_values():
    # x = (1, 2, 3, 6): mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, se = sqrt(14/3) / 2.
    mean, se = mean_se(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2, rel=1e-15)
    assert mean_se(torch.tensor([0.25])) == (0.25, 0.0)  # one value: no spread to estimate
    assert binomial_se(0.5, 64) == 1 / 16  # sqrt(0.25 / 64), exact in binary
    assert binomial_se(1.0, 10) == 0.0
    with pytest.raises(ValueError, match="proportion p in"):
        binomial_se(1.5, 10)
    with pytest.raises(ValueError, match="n >= 1"):
        binomial_se(0.5, 0)


def test_paired_difference_by_hand():
    # d = a - b = [0, 1, 0, -1, 0]: mean 0, s_d^2 = (1 + 1) / 4 = 0.5, SE = sqrt(0.5 / 5).
    diff, se = paired_difference([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert diff == 0.0 and se == pytest.approx(math.sqrt(0.1), abs=1e-15)
    # d = [1, 0, 0, 0]: mean 0.25, s_d^2 = (0.75^2 + 3 * 0.25^2) / 3 = 0.25, SE = 0.5 / 2.
    diff, se = paired_difference([1, 1, 1, 0], [0, 1, 1, 0])
    assert diff == 0.25 and se == pytest.approx(0.25, abs=1e-15)
    # Two runs that agree on every item: the difference is known exactly, SE 0 (unpaired: 0.25).
    assert paired_difference([1, 0, 1, 0], [1, 0, 1, 0]) == (0.0, 0.0)


def test_paired_se_is_below_the_unpaired_one_when_runs_agree_on_most_items():
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(700, generator=g) < 0.6).double()
    b = a.clone()
    flip = torch.randperm(700, generator=g)[:40]
    b[flip] = 1 - b[flip]  # b disagrees with a on 40 of 700 items
    diff, se = paired_difference(a, b)
    unpaired = math.sqrt(
        binomial_se(a.mean().item(), 700) ** 2 + binomial_se(b.mean().item(), 700) ** 2
    )
    assert diff == pytest.approx((a - b).mean().item(), abs=1e-15)
    assert se < unpaired / 2


def test_paired_difference_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same n >= 2"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="same n >= 2"):
        paired_difference([1], [0])
