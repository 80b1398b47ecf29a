r"""Seed aggregation: the mean over independent runs and its Student-t confidence interval; and the
two standard errors the result tables print (:func:`mean_se`, :func:`binomial_se`).

Experiments repeat a run over S seeds and report, at every step, the mean over seeds and a
``level`` (default 95%) confidence interval for that mean:

.. math:: \bar x \pm t_{(1 + \mathrm{level})/2,\; S - 1}\, \frac{s}{\sqrt{S}},

with s the sample standard deviation (Bessel's S - 1). The Student-t factor matters for the few
seeds of a fast run: with S = 4 it is 3.18, not the normal 1.96, and an interval built on 1.96
would cover the true mean only about 85% of the time (``tests/test_stats.py`` checks the coverage).

The t quantile is computed here (no scipy in the requirements): the t density is integrated by
composite Simpson's rule in float64 and the quantile found by bisection on that integral.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["student_t_quantile", "mean_interval", "mean_se", "binomial_se", "paired_difference"]

# Simpson's rule on 2**14 panels of [0, t]: the t density is smooth (analytic) and t <= 64 for every
# quantile asked of it here, so the integration error (~h^4) is below 1e-12 of the probability.
_SIMPSON_PANELS = 2**14
# Bisection on t in [0, _T_MAX]: t_{0.9995, 1} = 636.6 is the largest quantile anyone uses for a CI.
_T_MAX = 1000.0


def _student_t_cdf_from_zero(t: float, dof: float) -> float:
    """P(0 <= T <= t) for T ~ Student-t(dof), t >= 0, by Simpson's rule on the density."""
    x = torch.linspace(0.0, t, _SIMPSON_PANELS + 1, dtype=torch.float64)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    density = torch.exp(log_norm - (dof + 1) / 2 * torch.log1p(x * x / dof))
    weights = torch.ones_like(x)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return (t / _SIMPSON_PANELS / 3) * float((weights * density).sum())


@functools.cache
def student_t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t with ``dof`` degrees of freedom, for p in [0.5, 1).

    E.g. ``student_t_quantile(0.975, 29) = 2.04523`` (30 seeds, 95% interval). Accurate to 1e-12
    for dof <= 1000 (the tests compare with tabulated values); for huge dof, where lgamma's
    difference loses digits, to about 1e-8. A quantile above t = 1000 raises a ValueError.
    """
    if not 0.5 <= p < 1:
        raise ValueError(f"p must be in [0.5, 1) (an upper quantile), got {p!r}")
    if not dof > 0:
        raise ValueError(
            f"dof must be > 0, got {dof!r}; a confidence interval needs at least 2 seeds"
        )
    target = p - 0.5
    if _student_t_cdf_from_zero(_T_MAX, dof) < target:
        raise ValueError(f"the {p}-quantile of t({dof}) exceeds {_T_MAX}; use more seeds")
    lo, hi = 0.0, 1.0
    while _student_t_cdf_from_zero(hi, dof) < target:
        lo, hi = hi, min(2 * hi, _T_MAX)
    for _ in range(60):  # 60 halvings of a bracket <= 1000 wide: below 1e-15 relative
        mid = 0.5 * (lo + hi)
        if _student_t_cdf_from_zero(mid, dof) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_interval(x: Tensor, dim: int = 0, level: float = 0.95) -> tuple[Tensor, Tensor, Tensor]:
    """Mean of ``x`` over ``dim`` (the seeds) and the Student-t ``level`` confidence interval of it.

    Args:
        x: any shape, e.g. (T, S, K) policies recorded at T steps for S seeds and K actions.
        dim: the seed dimension; needs at least 2 entries.
        level: the confidence level of the interval for the mean.

    Returns:
        (mean, lower, upper), each the shape of ``x`` without ``dim``.
    """
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 seeds along dim {dim}, got {n}")
    mean = x.mean(dim)
    half = student_t_quantile((1 + level) / 2, n - 1) * x.std(dim, correction=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def mean_se(x: Tensor) -> tuple[float, float]:
    """Mean of x (n,) and its standard error s / sqrt(n), s with Bessel's n - 1 (0 for n = 1), in
    float64."""
    x = torch.as_tensor(x).double()
    se = x.std(unbiased=True).item() / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return x.mean().item(), se


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of a proportion p measured on n items (an accuracy over n
    pairs)."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need a proportion p in [0, 1] over n >= 1 items, got p={p}, n={n}")
    return math.sqrt(p * (1.0 - p) / n)


def paired_difference(a, b) -> tuple[float, float]:
    r"""Mean of a - b over items scored by both, and its paired standard error, in float64.

    ``a``, ``b`` (n,): per-item scores of two runs on the *same* items (e.g. 1/0 correctness of two
    policies on the same eval pairs). With d_i = a_i - b_i,

    .. math:: \bar d = \frac1n \sum_i d_i, \qquad
       \mathrm{SE}(\bar d) = \frac{s_d}{\sqrt n}, \qquad
       s_d^2 = \frac{1}{n-1}\sum_i (d_i - \bar d)^2.

    Items both runs get right (or both wrong) add nothing to s_d: two runs that share their eval
    set and their reference agree on most pairs, and the unpaired SE, sqrt(SE_a^2 + SE_b^2),
    would overstate the noise of their difference.
    """
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(
            f"need two 1-d score vectors of the same n >= 2 items, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return mean_se(a - b)
