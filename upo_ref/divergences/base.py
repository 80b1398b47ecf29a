"""The base class of every f-divergence, and the autograd rule of its stable log-space f'.

A subclass supplies f, f', (f')^{-1} and the stable f'(exp(x)) with its derivative; the base class
checks inputs, extends (f')^{-1} to the maximiser u*(t) of the convex conjugate, and wires the
hand-written derivative into autograd (:class:`_FPrimeOfLog`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Divergence"]


def _check_nonnegative(u: Tensor, name: str) -> None:
    if torch.any(u < 0) or torch.any(torch.isnan(u)):
        raise ValueError(
            f"{name}: the density ratio u = pi / pi_ref must be >= 0 and not NaN, got min "
            f"{u.min().item()!r}; pass u = pi / pi_ref, or use f_prime_of_log(log_u) for log-ratios"
        )


class Divergence:
    """Base class: one f-divergence. Subclasses define f, f', the stable f'(exp(.)) and (f')^{-1}.

    Attributes:
        name: registry name, e.g. ``"jensen_shannon"``.
        f_prime_range: (inf f', sup f') over u in (0, inf), the open interval on which (f')^{-1}
        is defined.
        f_prime_at_zero: lim_{u->0+} f'(u); ``-inf`` exactly when 0 is not in dom f'.
        short_label: the short name in loss labels, e.g. ``"JS"`` in ``"JS-IUPO"``.
        f_prime_grows_exponentially: whether |f'(e^x)| grows like e^{c|x|} on one side (forward
        KL, alpha, chi-squared), so that f' of a long response's log-ratio leaves the dtype;
        otherwise it grows at most linearly in x (reverse KL, JS, total variation).
    """

    name: str = ""
    short_label: str = ""
    f_prime_grows_exponentially: bool = False
    f_prime_range: tuple[float, float] = (-math.inf, math.inf)
    f_prime_at_zero: float = -math.inf

    @property
    def admissible(self) -> bool:
        """Theorem 3.1's condition ``0 not in dom f'``: f'(u) -> -inf as u -> 0+."""
        return self.f_prime_at_zero == -math.inf

    # --- the four maps; subclasses implement the underscored ones ------------------------------
    def f(self, u: Tensor) -> Tensor:
        """f(u) for u >= 0, elementwise."""
        _check_nonnegative(u, f"{self.name}.f")
        return self._f(u)

    def f_prime(self, u: Tensor) -> Tensor:
        """f'(u) for u >= 0, the direct formula (at u = 0 it is the limit ``f_prime_at_zero``)."""
        _check_nonnegative(u, f"{self.name}.f_prime")
        return self._f_prime(u)

    def f_prime_of_log(self, log_u: Tensor) -> Tensor:
        """f'(exp(log_u)) for any real log_u, without forming exp(log_u). No input check (hot path).

        Its derivative in log_u, e^x f''(e^x), is supplied by hand (``_f_prime_of_log_vjp``, through
        :class:`_FPrimeOfLog`): autograd through the stable form would differentiate the rounded
        expression, and expm1's backward, grad * (expm1(z) + 1), cancels to 0 where e^z is tiny.
        """
        return _FPrimeOfLog.apply(log_u, self)

    def _f_prime_of_log(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _f_prime_of_log_vjp(self, x: Tensor, grad: Tensor) -> Tensor:
        """grad * d/dx f'(e^x), to a few ulps wherever the true product is a normal number."""
        raise NotImplementedError

    def f_prime_inverse(self, t: Tensor) -> Tensor:
        """(f')^{-1}(t): the u >= 0 with f'(u) = t. Raises ValueError where no such u exists."""
        lo, hi = self.f_prime_range
        # t = f'(0) is a value of f' too when 0 is in dom f' (chi-squared: f'(0) = -2 -> u = 0).
        at_zero = t == self.f_prime_at_zero
        bad = ~(((t > lo) & (t < hi)) | at_zero)
        if torch.any(bad):
            first = t[bad].flatten()[0].item()
            raise ValueError(
                f"{self.name}.f_prime_inverse: t = {first!r} is outside the range of f', "
                f"({lo}, {hi}); no density ratio u >= 0 has f'(u) = t. In the optimal policy this "
                f"means the action is either impossible to reach (t >= sup f') or gets pi* = 0 "
                f"(t <= f'(0), complementary slackness)"
            )
        return self._f_prime_inverse(t)

    def optimal_ratio(self, t: Tensor) -> Tensor:
        r"""u*(t) = argmax_{u >= 0} [t u - f(u)]: (f')^{-1} extended to every real t.

        This is the map of the closed-form optimum, pi*(y) = pi_ref(y) u*((r(y) - lambda) / beta)
        (``upo_ref.optimal``): inside the range of f' it is (f')^{-1}(t); for t <= f'(0) the
        maximiser is u = 0 (possible only when 0 is in dom f', as for chi-squared: the action gets
        pi* = 0 and a positive multiplier eta); for t >= sup f' the objective is unbounded in u and
        u* = +inf (lambda is always chosen so that this never happens at the optimum).
        """
        lo, hi = self.f_prime_range
        inside = (t > lo) & (t < hi)
        # Masked-out lanes get t = f'(1), which is inside the range of every f', so that no lane
        # computes a NaN (e.g. forward KL's -1/t at t = 0).
        safe_t = torch.where(inside, t, self.f_prime_of_log(torch.zeros_like(t)))
        u = torch.where(t >= hi, torch.full_like(t, math.inf), self._f_prime_inverse(safe_t))
        return torch.where(t <= self.f_prime_at_zero, torch.zeros_like(t), u)

    def _f(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _f_prime(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _f_prime_inverse(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.__dict__.items()))))


class _FPrimeOfLog(torch.autograd.Function):
    """f'(exp(x)) of a divergence with its hand-written derivative (Divergence.f_prime_of_log)."""

    generate_vmap_rule = True  # forward and backward are plain torch ops, so torch.func.vmap works

    @staticmethod
    def forward(x, divergence):
        return divergence._f_prime_of_log(x)

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward, so torch.func transforms work
        ctx.save_for_backward(inputs[0])
        ctx.divergence = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.divergence._f_prime_of_log_vjp(x, grad), None


def _times_unbounded(grad: Tensor, derivative: Tensor) -> Tensor:
    """grad * derivative, where the derivative may overflow to inf but the true one is finite.

    A zero cotangent gives a zero product whatever the (finite, if unrepresentable) derivative:
    this is what makes a saturated loss (f-DPO at f' = -inf, loss 0) have gradient 0, not 0 * inf =
    NaN. A nonzero cotangent times an overflowed derivative stays +-inf: that product is beyond the
    dtype too. A NaN cotangent stays NaN.
    """
    return torch.where(grad == 0, grad, grad * derivative)
