r"""The UPO optimum on a finite action set: closed form, a numerical check, and the KKT conditions.

For one context x, write r(y) = E_{y' ~ mu} Psi(p*(y > y')) (the first term of eq. 11; it does
not depend on pi). The UPO objective (11) is then

.. math::

    \max_{\pi \in \Delta} \; J(\pi) = \sum_y \pi(y) r(y)
        - \beta \sum_y \pi_{ref}(y) f\!\left(\frac{\pi(y)}{\pi_{ref}(y)}\right).

Its Lagrangian (13) gives, at a KKT point (eq. 14-15),

.. math::

    r(y) = \beta f'\!\left(\frac{\pi^*(y)}{\pi_{ref}(y)}\right) + \lambda - \eta(y),
    \qquad \eta \ge 0,\; \pi^* \eta = 0.

Theorem 3.1: when 0 is not in dom f' (f'(u) -> -inf as u -> 0+) every pi*(y) > 0, so eta = 0
and r(y) = beta f'(pi*/pi_ref) + lambda (eq. 12/16) with one constant lambda. Solving for pi*:

.. math:: \pi^*(y) = \pi_{ref}(y)\, u^*\!\left(\frac{r(y) - \lambda}{\beta}\right),

with u* = (f')^{-1} (``Divergence.optimal_ratio``, which also covers the clipped case u* = 0 of
divergences like chi-squared) and lambda the unique value making pi* sum to one. Under reverse
KL this is pi* = softmax(log pi_ref + r / beta).

Everything here works in float64 on 1-D tensors of shape (K,), K = number of actions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_beta, check_finite
from .divergences import Divergence, ReverseKL, as_divergence

__all__ = [
    "bradley_terry",
    "psi_identity",
    "psi_logit",
    "preference_matrix",
    "expected_psi",
    "upo_objective",
    "optimal_policy",
    "solve_numerically",
    "implied_lambda",
    "KKTResidual",
    "kkt_residual",
]

# Bisection for lambda stops when the bracket is _BISECTION_ULPS float64 ulps of the problem's
# scale (|lambda| + beta) wide: resolving lambda more finely than its own rounding is meaningless.
_BISECTION_ULPS = 2
_BISECTION_MAX_STEPS = 200


# solve_numerically treats a probability below this as sitting on the boundary pi = 0.
_AT_BOUNDARY = 1e-15


# --- Bradley-Terry and the Psi maps (eq. 1-2, 6-7) ----------------------------------------------
def bradley_terry(r_w: Tensor, r_l: Tensor) -> Tensor:
    r"""P(y_w > y_l) = exp(r_w) / (exp(r_w) + exp(r_l)) = sigma(r_w - r_l), eq. (1)-(2)."""
    return torch.sigmoid(r_w - r_l)


def psi_identity(p: Tensor) -> Tensor:
    """Psi(p) = p: IPO (eq. 8) and IUPO (eq. 22)."""
    return p


def psi_logit(p: Tensor) -> Tensor:
    """Psi(p) = log(p / (1 - p)): with Bradley-Terry p*, E Psi = r + const (eq. 7); gives DPO /
    f-DPO."""
    return torch.logit(p)


def preference_matrix(rewards: Tensor) -> Tensor:
    """P[i, j] = p*(y_i > y_j) = sigma(r_i - r_j) under Bradley-Terry. (K,) -> (K, K)."""
    return bradley_terry(rewards[:, None], rewards[None, :])


def expected_psi(P: Tensor, mu: Tensor, psi=psi_identity) -> Tensor:
    r"""r(y) = E_{y' ~ mu} Psi(p*(y > y')), the first term of eq. (6)/(11). P: (K, K), mu: (K,) ->
    (K,)."""
    return psi(P) @ mu


# --- the objective and its optimum -------------------------------------------------------------
def _check_problem(
    rewards: Tensor, pi_ref: Tensor, beta: float, divergence
) -> tuple[float, Divergence]:
    for x, name in ((rewards, "rewards"), (pi_ref, "pi_ref")):
        if not isinstance(x, Tensor) or x.dim() != 1 or not x.is_floating_point():
            raise ValueError(
                f"{name} must be a 1-D floating tensor of shape (K,), got "
                f"{getattr(x, 'shape', type(x))}"
            )
        check_finite(x, name)
    if rewards.shape != pi_ref.shape:
        raise ValueError(
            f"rewards has shape {tuple(rewards.shape)} but pi_ref has {tuple(pi_ref.shape)}; both "
            "must be (K,)"
        )
    if bool((pi_ref <= 0).any()) or abs(pi_ref.sum().item() - 1) > 1e-9:
        raise ValueError(
            "pi_ref must be a strictly positive distribution summing to 1 (Theorem 3.1 assumes "
            f"pi_ref > 0), got min {pi_ref.min().item()!r}, sum {pi_ref.sum().item()!r}"
        )
    return check_beta(beta), as_divergence(divergence)


def upo_objective(pi: Tensor, rewards: Tensor, pi_ref: Tensor, beta: float, divergence) -> Tensor:
    r"""J(pi) = sum_y pi(y) r(y) - beta D_f(pi, pi_ref), eq. (11) for one context. Scalar tensor."""
    beta, div = _check_problem(rewards, pi_ref, beta, divergence)
    return (pi * rewards).sum() - beta * (pi_ref * div.f(pi / pi_ref)).sum()


def optimal_policy(
    rewards: Tensor, pi_ref: Tensor, beta: float, divergence, return_lam: bool = False
):
    r"""The maximiser pi* of eq. (11) on K actions, in closed form: pi_ref u*((r - lambda) / beta).

    Args:
        rewards: (K,) r(y) = E_{y'~mu} Psi(p*(y > y')).
        pi_ref: (K,) reference policy, strictly positive.
        beta: regularisation strength, > 0.
        divergence: any divergence with an inverse f' (not total variation).
        return_lam: also return the multiplier lambda (a Python float).

    Returns:
        pi* of shape (K,) (and lambda). Under reverse KL, lambda = beta (logsumexp(log pi_ref + r /
            beta) - 1) exactly; otherwise lambda is found by bisection on the strictly decreasing
            function lambda -> sum_y pi_ref(y) u*((r(y) - lambda) / beta), to two float64 ulps of
            its scale.
    """
    beta, div = _check_problem(rewards, pi_ref, beta, divergence)
    if isinstance(div, ReverseKL):
        logits = torch.log(pi_ref) + rewards / beta
        lse = torch.logsumexp(logits, dim=0)
        pi, lam = torch.exp(logits - lse), beta * (lse.item() - 1)
        return (pi, lam) if return_lam else pi

    def mass(lam: float) -> float:
        return (pi_ref * div.optimal_ratio((rewards - lam) / beta)).sum().item()

    # At lambda = max r - beta f'(1) every ratio u* <= 1, so the mass is <= 1; at min r - beta f'(1)
    # every u* >= 1 (or +inf), so it is >= 1. lambda* lies in between.
    f_prime_1 = div.f_prime_of_log(torch.zeros((), dtype=torch.float64)).item()
    lo, hi = rewards.min().item() - beta * f_prime_1, rewards.max().item() - beta * f_prime_1
    resolution = _BISECTION_ULPS * torch.finfo(torch.float64).eps * (abs(lo) + abs(hi) + beta)
    for _ in range(_BISECTION_MAX_STEPS):
        mid = 0.5 * (lo + hi)
        if hi - lo <= resolution or mid in (lo, hi):
            break
        if mass(mid) > 1:
            lo = mid
        else:
            hi = mid
    lam = hi  # mass(hi) <= 1 is finite even where mass(lo) is +inf
    u = div.optimal_ratio((rewards - lam) / beta)
    pi = pi_ref * u
    pi = pi / pi.sum()  # removes the last-ulp mass error of the bisection
    return (pi, lam) if return_lam else pi


def solve_numerically(
    rewards: Tensor, pi_ref: Tensor, beta: float, divergence, max_steps: int = 500
) -> Tensor:
    r"""An independent solver for the same problem: Newton's method on the simplex, in pi itself.

    It uses only f, differentiated twice by autograd, never f' or (f')^{-1}, so agreeing with
    :func:`optimal_policy` checks the closed form. J is concave and separable, so its Hessian is the
    diagonal h = -beta f''(pi/pi_ref) / pi_ref < 0, and the Newton step for max J s.t. sum pi = 1 is

        d_i = -(g_i - nu) / h_i,   nu = sum(g / h) / sum(1 / h)   (so that sum d = 0),

    an ascent direction (g.d = -sum (g_i - nu)^2 / h_i > 0). Steps stop short of the boundary pi = 0
    (fraction 0.99) and backtrack until J increases; an optimum with pi*(y) = 0 (chi-squared) is
    approached geometrically from above, and an action that has reached pi < 1e-15 with its step
    pointing outward is held there (an active set).
    """
    beta, div = _check_problem(rewards, pi_ref, beta, divergence)

    def objective(pi: Tensor) -> Tensor:
        return (pi * rewards).sum() - beta * (pi_ref * div.f(pi / pi_ref)).sum()

    pi = pi_ref.clone()
    value = objective(pi).item()
    for _ in range(max_steps):
        p = pi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(p), p, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), p)  # the diagonal Hessian: J is separable
        g = g.detach()
        # Active set: an action already at the boundary whose step points outward stays put
        # (otherwise the fraction-to-boundary rule would shrink every step with it).
        free = torch.ones_like(pi, dtype=torch.bool)
        for _ in range(len(pi)):
            nu = (g / h)[free].sum() / (1 / h)[free].sum()
            stuck = free & (pi < _AT_BOUNDARY) & (g - nu < 0)
            if not stuck.any():
                break
            free &= ~stuck
        step = torch.where(free, -(g - nu) / h, torch.zeros_like(pi))
        shrinking = step < 0
        t = (
            min(1.0, 0.99 * (pi[shrinking] / -step[shrinking]).min().item())
            if shrinking.any()
            else 1.0
        )
        for _ in range(60):  # backtracking until J increases
            candidate = pi + t * step
            new_value = objective(candidate).item()
            if new_value >= value:
                break
            t /= 2
        else:
            break  # no ascent left at float64 resolution
        candidate = candidate / candidate.sum()
        if torch.equal(candidate, pi):
            break
        pi, value = candidate, new_value
    return pi


# --- KKT conditions (eq. 13-16) ----------------------------------------------------------------
def implied_lambda(pi: Tensor, rewards: Tensor, pi_ref: Tensor, beta: float, divergence) -> Tensor:
    r"""r(y) - beta f'(pi(y) / pi_ref(y)) for each action, shape (K,).

    Theorem 3.1 says that at the optimum this is one constant, lambda, on every action. Where
    pi(y) = 0 it is +inf for admissible divergences (f'(0) = -inf) and r(y) - beta f'(0) otherwise.
    """
    beta, div = _check_problem(rewards, pi_ref, beta, divergence)
    return rewards - beta * div.f_prime(pi / pi_ref)


@dataclass
class KKTResidual:
    """How far (pi, lambda) is from satisfying the KKT conditions of eq. (13).

    eta is read off stationarity (eq. 15): eta(y) = lambda - (r(y) - beta f'(pi(y)/pi_ref(y))).

    Attributes:
        stationarity: max over the support of |r - beta f'(pi/pi_ref) - lambda| (eq. 16: eta = 0
            where pi > 0).
        primal_feasibility: |sum pi - 1| + max(0, -min pi).
        dual_feasibility: max(0, -min eta): eta >= 0 fails where an action with pi = 0 would want
            more mass.
        complementary_slackness: max |pi eta|.
        lam: the lambda used (given, or fitted as the pi-weighted mean of r - beta f'(u) on the
            support).
        eta: (K,) the multipliers.
    """

    stationarity: float
    primal_feasibility: float
    dual_feasibility: float
    complementary_slackness: float
    lam: float
    eta: Tensor

    def max(self) -> float:
        return max(
            self.stationarity,
            self.primal_feasibility,
            self.dual_feasibility,
            self.complementary_slackness,
        )


def kkt_residual(
    pi: Tensor, rewards: Tensor, pi_ref: Tensor, beta: float, divergence, lam: float | None = None
) -> KKTResidual:
    """The KKT residuals of a candidate pi (and lambda) for the problem of
    :func:`optimal_policy`."""
    implied = implied_lambda(pi, rewards, pi_ref, beta, divergence)
    support = pi > 0
    if lam is None:
        lam = (pi[support] * implied[support]).sum().item() / pi[support].sum().item()
    eta = lam - implied
    stationarity = (implied[support] - lam).abs().max().item()
    primal = abs(pi.sum().item() - 1) + max(0.0, -pi.min().item())
    dual = max(0.0, -eta.min().item())
    slack = torch.where(support, pi * eta, torch.zeros_like(pi)).abs().max().item()
    return KKTResidual(stationarity, primal, dual, slack, lam, eta)
