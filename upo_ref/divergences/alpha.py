"""The alpha-divergence in f-DPO's convention, alpha in (0, 1)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .base import Divergence, _times_unbounded

__all__ = ["AlphaDivergence"]


class AlphaDivergence(Divergence):
    r"""alpha-divergence in f-DPO's convention (Wang et al. 2023), alpha in (0, 1):

    .. math::  f(u) = \frac{u^{1-\alpha} - (1-\alpha) u - \alpha}{\alpha(\alpha - 1)}, \qquad
               f'(u) = \frac{1 - u^{-\alpha}}{\alpha}, \qquad
               (f')^{-1}(t) = (1 - \alpha t)^{-1/\alpha} \ (t < 1/\alpha).

    Limits (pinned by tests): as alpha -> 0, f'(u) -> log u, reverse KL's f' minus 1 (and
    f(u) -> u log u - u + 1, reverse KL's f plus a term linear in u, which D_f averages to 0); as
    alpha -> 1, f'(u) -> 1 - 1/u, forward KL's f' plus 1 (f(u) -> -log u + u - 1). Constant shifts
    of f' cancel in every loss here, since the losses use only differences of f'.

    f' is bounded above by 1/alpha, like Jensen-Shannon's by log 2.

    Stable form: f'(exp(x)) = -expm1(-alpha x) / alpha. ``expm1`` keeps full relative precision near
    x = 0, where 1 - exp(-alpha x) would cancel; the exp overflows only where the true value,
    about -exp(-alpha x) / alpha, is not representable.

    Its derivative, e^{-alpha x}, is computed directly. Autograd through the stable form would not
    do: expm1's backward forms grad * (expm1(z) + 1) = (-1 + e^{-alpha x}) + 1, which cancels, with
    relative error ~ eps e^{alpha x}, and is exactly 0 beyond alpha x ~ 37 (float64) or ~ 17
    (float32), where e^{-alpha x} is a perfectly normal number (and where IUPO's kkt form multiplies
    it by 2 (Uh - 1/(2 beta)), of order e^{alpha x}).
    """

    name = "alpha"
    f_prime_grows_exponentially = True
    f_prime_at_zero = -math.inf

    def __init__(self, alpha: float):
        if isinstance(alpha, Tensor) and alpha.numel() == 1:  # a 0-d tensor, like beta
            alpha = alpha.item()
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
            raise ValueError(
                f"alpha must be a number strictly between 0 and 1 for the alpha-divergence, got "
                f"{alpha!r}; alpha -> 0 approaches reverse KL (use 'reverse_kl'), alpha -> 1 "
                "forward KL (use 'forward_kl')"
            )
        self.alpha = float(alpha)
        self.f_prime_range = (-math.inf, 1.0 / self.alpha)
        self.short_label = f"alpha={self.alpha:g}"

    def _f(self, u):
        a = self.alpha
        # The numerator u^{1-a} - (1-a) u - a, grouped so that it is exactly 0 at u = 1.
        return ((u ** (1 - a) - u) + a * (u - 1)) / (a * (a - 1))

    def _f_prime(self, u):
        a = self.alpha
        return (1 - u ** (-a)) / a

    def _f_prime_of_log(self, x):
        a = self.alpha
        return -torch.expm1(-a * x) / a

    def _f_prime_of_log_vjp(self, x, grad):
        return _times_unbounded(grad, torch.exp(-self.alpha * x))

    def _f_prime_inverse(self, t):
        a = self.alpha
        return (1 - a * t) ** (-1 / a)

    def __repr__(self) -> str:
        return f"AlphaDivergence(alpha={self.alpha})"
