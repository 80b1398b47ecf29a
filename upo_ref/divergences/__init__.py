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

One module per divergence: ``reverse_kl``, ``forward_kl``, ``jensen_shannon``, ``alpha``,
``chi_squared``, ``total_variation``, each a :class:`~upo_ref.divergences.base.Divergence` subclass
(``base``: the four maps, the admissibility test and the hand-written derivative of the stable f').

Usage::

    js = get_divergence("jensen_shannon")
    js.f_prime_of_log(torch.tensor([-1e4, 0.0, 1e4]))   # tensor([-9999.3069, 0.0000, 0.6931])
"""

from __future__ import annotations

from .alpha import AlphaDivergence
from .base import Divergence
from .chi_squared import ChiSquared
from .forward_kl import ForwardKL
from .jensen_shannon import JensenShannon
from .reverse_kl import ReverseKL
from .total_variation import TotalVariation

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
