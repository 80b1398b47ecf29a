"""Pearson chi-squared: a counterexample to Theorem 3.1 (0 is in dom f')."""

from __future__ import annotations

import math

import torch

from .base import Divergence, _times_unbounded

__all__ = ["ChiSquared"]


class ChiSquared(Divergence):
    r"""Pearson chi-squared: f(u) = (u - 1)^2, f'(u) = 2(u - 1). NOT admissible for Theorem 3.1.

    f'(0) = -2 is finite, so 0 is in dom f'. The optimum can then put pi*(y) = 0 on an action whose
    reward is low enough, with a positive multiplier eta(y) (complementary slackness), and
    ``E Psi = beta f'(pi*/pi_ref) + lambda`` (eq. 16) fails on that action: the "constant lambda"
    of the reparameterisation is not constant. ``upo_ref.optimal`` shows the case.
    (f')^{-1}(t) = 1 + t/2 exists for t >= -2 only.

    f'(exp(x)) = 2 expm1(x), exact near x = 0; its derivative 2 e^x is computed directly, since
    expm1's own backward, grad * (expm1(x) + 1), cancels to 0 for x below about -37 (float64).
    """

    name = "chi_squared"
    short_label = "chi2"
    f_prime_grows_exponentially = True
    f_prime_range = (-2.0, math.inf)
    f_prime_at_zero = -2.0

    def _f(self, u):
        return (u - 1) ** 2

    def _f_prime(self, u):
        return 2 * (u - 1)

    def _f_prime_of_log(self, x):
        return 2 * torch.expm1(x)

    def _f_prime_of_log_vjp(self, x, grad):
        return _times_unbounded(grad, 2 * torch.exp(x))

    def _f_prime_inverse(self, t):
        return 1 + t / 2
