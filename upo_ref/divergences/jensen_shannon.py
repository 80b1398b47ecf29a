"""Jensen-Shannon, the divergence of JS-IUPO (eq. 26)."""

from __future__ import annotations

import math

import torch

from .base import Divergence

__all__ = ["JensenShannon"]


LOG_2 = math.log(2.0)

# The stable f' switches formula at log_u = _JS_SWITCH (JensenShannon's docstring). Any value in
# about [-3, -0.5] works: the expm1 form is exact near 0 and the logsigmoid form has no cancellation
# below it; -1 keeps both branches well inside their accurate regions.
_JS_SWITCH = -1.0


class JensenShannon(Divergence):
    r"""Jensen-Shannon: f(u) = u log u - (u + 1) log((u + 1) / 2), f'(u) = log(2u / (1 + u)).

    The divergence of JS-IUPO (eq. 26). f' is bounded above: f'(u) < log 2 for every u, and
    (f')^{-1}(t) = e^t / (2 - e^t) exists only for t < log 2. (The bound is what makes the paper's
    JS-IUPO target 1/(2 beta) unreachable for most pairs; see ``losses.iupo_loss``.)

    Stable form, with x = log u, so that 2u / (1 + u) = 2 / (1 + e^{-x}) = 1 / (1 + expm1(-x) / 2):

    * x >= -1: f' = -log1p(expm1(-x) / 2). Near x = 0, where f' ~ x / 2 crosses zero, expm1 and
      log1p keep full relative precision; the textbook ``log(2) + logsigmoid(x)`` subtracts two
      numbers near log 2 and loses it all (relative error ~1e-6 at x = 1e-10 in float64). Its
      autograd derivative, e^{-x} / (1 + e^{-x}), stays accurate however small it gets.
    * x < -1: f' = log(2) + logsigmoid(x). Here f' < -0.62, so the sum has no cancellation, while
      expm1(-x) would overflow for x < -88 (float32) and give -inf.

    Both branches are evaluated on inputs clamped to their own side of the switch, so neither
    produces an infinity. The derivative is supplied by hand: d f'(e^x)/dx = 1 / (1 + e^x) =
    sigmoid(-x), one accurate operation bounded by 1, instead of autograd through both branches
    (which is 3-4x slower on the CPU, mostly in torch.where's backward).
    """

    name = "jensen_shannon"
    short_label = "JS"
    f_prime_range = (-math.inf, LOG_2)
    f_prime_at_zero = -math.inf

    def _f(self, u):
        return torch.xlogy(u, u) - (u + 1) * torch.log((u + 1) / 2)

    def _f_prime(self, u):
        return torch.log(2 * u / (1 + u))

    def _f_prime_of_log(self, x):
        high = (x >= _JS_SWITCH).to(x.dtype)  # 1.0 selects the expm1 branch, 0.0 the logsigmoid one
        upper = torch.log1p(torch.expm1(-x.clamp(min=_JS_SWITCH)) / 2).neg_()
        lower = torch.nn.functional.logsigmoid(x.clamp(max=_JS_SWITCH)).add_(LOG_2)
        # Both branches are finite, so each product is exactly the branch or exactly 0.
        return upper.mul_(high).add_(lower.mul_(1 - high))

    def _f_prime_of_log_vjp(self, x, grad):
        return grad * torch.sigmoid(-x)  # sigmoid(-x) <= 1: no overflow, no 0 * inf

    def _f_prime_inverse(self, t):
        e_t = torch.exp(t)
        return e_t / (2 - e_t)
