"""Total variation: the second counterexample (f' a step function)."""

from __future__ import annotations

import torch

from .base import Divergence

__all__ = ["TotalVariation"]


class TotalVariation(Divergence):
    r"""Total variation: f(u) = |u - 1| / 2, f'(u) = sign(u - 1) / 2. Neither admissible nor
    invertible.

    f is not differentiable at u = 1 (f' here is the subgradient 0 there) and f' is a step
    function taking the values -1/2, 0, +1/2, so (f')^{-1} does not exist and Theorem 3.1's
    reparameterisation cannot even be written. Kept as the second counterexample.
    f'(exp(log_u)) = sign(log_u) / 2; autograd's derivative of sign is 0, the true derivative at
    every log_u != 0 (at 0 there is none).
    """

    name = "total_variation"
    short_label = "TV"
    f_prime_range = (-0.5, 0.5)
    f_prime_at_zero = -0.5

    def _f(self, u):
        return torch.abs(u - 1) / 2

    def _f_prime(self, u):
        return torch.sign(u - 1) / 2

    def f_prime_of_log(self, log_u):
        return torch.sign(log_u) / 2

    def optimal_ratio(self, t):
        return self.f_prime_inverse(t)

    def f_prime_inverse(self, t):
        raise ValueError(
            "total_variation: f'(u) = sign(u - 1) / 2 is a step function, so (f')^{-1} does not "
            "exist and Theorem 3.1's closed form pi* = pi_ref (f')^{-1}((r - lambda) / beta) "
            "cannot be used; pick an admissible divergence (reverse_kl, forward_kl, "
            "jensen_shannon, alpha)"
        )
