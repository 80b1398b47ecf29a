"""Reverse KL, the divergence of RLHF, DPO and IPO."""

from __future__ import annotations

import math

import torch

from .base import Divergence

__all__ = ["ReverseKL"]


class ReverseKL(Divergence):
    r"""Reverse KL, D_KL(pi || pi_ref): f(u) = u log u, f'(u) = log u + 1, (f')^{-1}(t) = e^{t-1}.

    The divergence of RLHF (eq. 3), DPO (eq. 4) and IPO (eq. 10). f'(exp(log_u)) = log_u + 1 is
    exact in floating point for every finite log_u, and autograd's derivative, 1, is exact too.
    """

    name = "reverse_kl"
    short_label = "RKL"
    f_prime_range = (-math.inf, math.inf)
    f_prime_at_zero = -math.inf

    def _f(self, u):
        return torch.xlogy(u, u)  # u log u, with 0 log 0 = 0

    def _f_prime(self, u):
        return torch.log(u) + 1

    def f_prime_of_log(self, log_u):
        return log_u + 1

    def _f_prime_inverse(self, t):
        return torch.exp(t - 1)
