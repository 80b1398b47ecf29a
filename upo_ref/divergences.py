r"""f-divergences as values: f, f', a stable log-space f', (f')^{-1} and the range of f'.

An f-divergence between a policy pi and a reference pi_ref is (paper, section 2.4)

.. math::  D_f(\pi, \pi_{ref}) = \mathbb{E}_{\pi_{ref}}\big[f(\pi / \pi_{ref})\big],

with f convex on (0, inf) and f(1) = 0. Everything UPO needs from a divergence is f' of the
density ratio u = pi / pi_ref: f-DPO (eq. 5) and IUPO (eq. 23) replace DPO's log u by f'(u).

Language models give log-probabilities, so the losses never see u itself, only log_u. Forming
u = exp(log_u) overflows for |log_u| > 88 in float32 (summed log-probs of two long responses
differ by hundreds of nats), so each divergence also carries ``f_prime_of_log(log_u)``, which
computes f'(exp(log_u)) without ever forming exp(log_u). Its docstring says why its form is stable.

Theorem 3.1 needs ``0 not in dom f'``: f'(u) -> -inf as u -> 0+, which forces pi* > 0 on every
action so that the multiplier eta of the constraint pi >= 0 vanishes (eq. 15 -> eq. 16). The
attribute ``f_prime_at_zero`` is lim_{u->0+} f'(u); ``admissible`` is ``f_prime_at_zero == -inf``.
Chi-squared and total variation fail this test and are here as counterexamples.

Usage::

    js = get_divergence("jensen_shannon")
    js.f_prime_of_log(torch.tensor([-1e4, 0.0, 1e4]))   # tensor([-9999.3069, 0.0000, 0.6931])
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "Divergence",
    "ReverseKL",
    "ForwardKL",
    "JensenShannon",
    "AlphaDivergence",
    "ChiSquared",
    "TotalVariation",
    "DIVERGENCE_NAMES",
    "get_divergence",
    "as_divergence",
]

LOG_2 = math.log(2.0)

# Jensen-Shannon's stable f' switches formula at log_u = _JS_SWITCH (see
# JensenShannon.f_prime_of_log).
# Any value in about [-3, -0.5] works: the expm1 form is exact near 0 and the logsigmoid form has no
# cancellation below it; -1 keeps both branches well inside their accurate regions.
_JS_SWITCH = -1.0


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
        f_prime_range: (inf f', sup f') over u in (0, inf); (f')^{-1} is defined on this open
        interval.
        f_prime_at_zero: lim_{u->0+} f'(u); ``-inf`` exactly when 0 is not in dom f'.
    """

    name: str = ""
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
        """grad * d/dx f'(e^x), accurate to a few ulps wherever the true product is a normal
        number."""
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
    """f'(exp(x)) of a divergence with its hand-written derivative; see
    Divergence.f_prime_of_log."""

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


class ReverseKL(Divergence):
    r"""Reverse KL, D_KL(pi || pi_ref): f(u) = u log u, f'(u) = log u + 1, (f')^{-1}(t) = e^{t-1}.

    The divergence of RLHF (eq. 3), DPO (eq. 4) and IPO (eq. 10). f'(exp(log_u)) = log_u + 1 is
    exact in floating point for every finite log_u, and autograd's derivative, 1, is exact too.
    """

    name = "reverse_kl"
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


class ForwardKL(Divergence):
    r"""Forward KL, D_KL(pi_ref || pi): f(u) = -log u, f'(u) = -1/u, (f')^{-1}(t) = -1/t for t < 0.

    f'(exp(log_u)) = -exp(-log_u): a single exp, accurate to an ulp; it overflows to -inf only where
    the true value, below -3.4e38 (float32) or -1.8e308 (float64), is not representable either.
    Its derivative exp(-log_u) is supplied by hand only so that a saturated loss's zero gradient
    stays 0 where exp(-log_u) overflows (``_times_unbounded``); autograd's grad * exp would be NaN.
    """

    name = "forward_kl"
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
    f_prime_at_zero = -math.inf

    def __init__(self, alpha: float):
        if isinstance(alpha, Tensor) and alpha.numel() == 1:  # a 0-d tensor, like beta
            alpha = alpha.item()
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
            raise ValueError(
                f"alpha must be a number strictly between 0 and 1 for the alpha-divergence, got "
                f"{alpha!r}; alpha -> 0 approaches reverse KL (use 'reverse_kl'), alpha -> 1 "
                f"forward "
                f"KL (use 'forward_kl')"
            )
        self.alpha = float(alpha)
        self.f_prime_range = (-math.inf, 1.0 / self.alpha)

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


class TotalVariation(Divergence):
    r"""Total variation: f(u) = |u - 1| / 2, f'(u) = sign(u - 1) / 2. NOT admissible, not
    invertible.

    f is not differentiable at u = 1 (f' here is the subgradient 0 there) and f' is a step
    function taking the values -1/2, 0, +1/2, so (f')^{-1} does not exist and Theorem 3.1's
    reparameterisation cannot even be written. Kept as the second counterexample.
    f'(exp(log_u)) = sign(log_u) / 2; autograd's derivative of sign is 0, the true derivative at
    every log_u != 0 (at 0 there is none).
    """

    name = "total_variation"
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
            "cannot be "
            "used; pick an admissible divergence (reverse_kl, forward_kl, jensen_shannon, alpha)"
        )


_REGISTRY = {
    cls.name: cls
    for cls in (ReverseKL, ForwardKL, JensenShannon, AlphaDivergence, ChiSquared, TotalVariation)
}
DIVERGENCE_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_divergence(name: str, alpha: float | None = None) -> Divergence:
    """The divergence called ``name``; ``alpha`` is required for, and only for, ``"alpha"``."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown divergence name {name!r}; choose one of {', '.join(DIVERGENCE_NAMES)}"
        )
    if name == "alpha":
        if alpha is None:
            raise ValueError("the 'alpha' divergence needs alpha in (0, 1), e.g. alpha=0.5")
        return AlphaDivergence(alpha)
    if alpha is not None:
        raise ValueError(
            f"alpha={alpha!r} was given but only the 'alpha' divergence takes it, not {name!r}"
        )
    return _REGISTRY[name]()


def as_divergence(divergence: Divergence | str) -> Divergence:
    """Accept a Divergence or a registry name (not 'alpha', which needs its parameter)."""
    if isinstance(divergence, Divergence):
        return divergence
    if isinstance(divergence, str):
        return get_divergence(divergence)
    raise ValueError(
        f"divergence must be a Divergence (see upo_ref.divergences.get_divergence) or one of "
        f"{', '.join(DIVERGENCE_NAMES)}, got {type(divergence).__name__}"
    )
