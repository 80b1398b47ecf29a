"""Forward KL, D_KL(pi_ref || pi)."""

from __future__ import annotations

import math

import torch

from .base import Divergence, _times_unbounded

__all__ = ["ForwardKL"]


class ForwardKL(Divergence):
    r"""Forward KL, D_KL(pi_ref || pi): f(u) = -log u, f'(u) = -1/u, (f')^{-1}(t) = -1/t for t < 0.

    f'(exp(log_u)) = -exp(-log_u): a single exp, accurate to an ulp; it overflows to -inf only where
    the true value, below -3.4e38 (float32) or -1.8e308 (float64), is not representable either.
    Its derivative exp(-log_u) is supplied by hand only so that a saturated loss's zero gradient
    stays 0 where exp(-log_u) overflows (``_times_unbounded``); autograd's grad * exp would be NaN.
    """

    name = "forward_kl"
    short_label = "FKL"
    f_prime_grows_exponentially = True
    f_prime_range = (-math.inf, 0.0)
    f_prime_at_zero = -math.inf

    def _f(self, u):
        return -torch.log(u)

    def _f_prime(self, u):
        return -1.0 / u

    def _f_prime_of_log(self, x):
        return -torch.exp(-x)

    def _f_prime_of_log_vjp(self, x, grad):
        return _times_unbounded(grad, torch.exp(-x))

    def _f_prime_inverse(self, t):
        return -1.0 / t
