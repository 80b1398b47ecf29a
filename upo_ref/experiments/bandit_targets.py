r"""The population targets of the bandit experiment: what each loss should converge to.

Population targets (:func:`bandit_target`). Sampling pairs uniformly from a dataset, the expected
mini-batch loss is the dataset mean of the loss, the "population loss" here. Azar et al. show that
for IPO its minimiser is the maximiser of eq. (8), pi*(y) proportional to pi_ref(y) exp(p(y > mu) /
beta), with the empirical preferences p = P_hat and mu the empirical action distribution, when the
pairs are distributed like (y, y') ~ mu x mu (true of D1 and D3). The same argument with f' in place
of log gives the UPO optimum of eq. (11)-(12) for IUPO in the kkt form (eq. 17). Where P_hat is 0 or
1, Psi = logit is infinite and DPO/f-DPO have no finite optimum; the paper-form IUPO (eq. 23) has
its own fixed point, found numerically here, which may not exist (``upo_ref.experiments.analysis``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_beta
from ..divergences import ReverseKL
from ..losses import PreferenceLoss
from ..optimal import expected_psi, optimal_policy, psi_identity
from .bandit_data import ACTION_NAMES, PreferenceData, uniform

__all__ = [
    "empirical_preferences",
    "empirical_rewards",
    "closed_form_target",
    "population_loss",
    "population_minimiser",
    "BanditTarget",
    "bandit_target",
]

# population_minimiser: a minimiser whose logits spread over more than this many nats (a probability
# ratio of e^30 ~ 1e13) is taken to be "at infinity": the loss has no finite minimiser and the
# search is only following its infimum outwards.
_THETA_SPREAD_MAX = 30.0
# ... and one is accepted as stationary when every |d loss / d theta| is below this. (L-BFGS's line
# search stalls once loss differences reach float64 rounding, at gradients of about 1e-10 here.)
_STATIONARY_GRAD = 1e-8


# --- empirical preferences and the closed-form optimum -------------------------------------------
def empirical_preferences(data: PreferenceData) -> tuple[Tensor, Tensor]:
    r"""P_hat and mu of a dataset, in float64.

    Returns:
        P_hat: (K, K), P_hat[i, j] = the (weighted) fraction of the comparisons of i with j that i
            won; 1/2 on the diagonal (an action ties with itself); NaN where i and j were never
            compared.
        mu: (K,), the empirical action distribution: how often each action appears in a pair.

    If the pairs were drawn as (y, y') ~ m x m with ties dropped, this mu is proportional to
    m (1 - m): it is m itself only where m is uniform on its support, as for D1 and D3.
    """
    k = data.n_actions
    wins = torch.zeros(k, k, dtype=torch.float64)
    for (y_w, y_l), p in zip(data.pairs, data.probabilities.tolist(), strict=True):
        wins[y_w, y_l] += p
    games = wins + wins.T
    p_hat = torch.where(games > 0, wins / games, torch.full_like(wins, float("nan")))
    p_hat.fill_diagonal_(0.5)
    mu = games.sum(1) / games.sum()
    return p_hat, mu


def empirical_rewards(data: PreferenceData, psi=psi_identity) -> Tensor:
    r"""r(y) = E_{y' ~ mu} Psi(P_hat(y > y')), the first term of eq. (11), for each action. (K,)

    Computed with ``upo_ref.optimal.expected_psi`` on the columns of the support of mu. NaN for an
    action never compared with some action of the support (its p(y > mu) is not in the data);
    +-inf or NaN where Psi(P_hat) is infinite (Psi = logit of a 0/1 preference).
    """
    p_hat, mu = empirical_preferences(data)
    support = mu > 0
    return expected_psi(p_hat[:, support], mu[support], psi)


def closed_form_target(
    data: PreferenceData, pi_ref: Tensor, beta: float, divergence, psi=psi_identity
) -> Tensor:
    r"""The UPO optimum (eq. 11-12) for the dataset's empirical preferences: (K,).

    optimal_policy(empirical_rewards(data, psi), pi_ref, beta, divergence). With Psi = identity and
    reverse KL this is IPO's population optimum, pi* proportional to pi_ref exp(P_hat(y > mu) /
    beta).

    Raises:
        ValueError: where some r(y) is not finite, naming the action and the reason (an action
            never compared with the support of mu, or Psi = logit of a deterministic preference).
    """
    p_hat, mu = empirical_preferences(data)
    r = empirical_rewards(data, psi)
    bad = ~torch.isfinite(r)
    if bad.any():
        y = int(bad.nonzero()[0, 0])
        name = ACTION_NAMES[y] if data.n_actions == len(ACTION_NAMES) else str(y)
        if torch.isnan(p_hat[y, mu > 0]).any():
            reason = (
                f"action {name} is never compared with the support of mu, so p({name} > mu) is "
                "not in the data"
            )
        else:
            reason = (
                "Psi(P_hat) is infinite (Psi = logit of a 0/1 preference): the optimum is at "
                "infinity"
            )
        raise ValueError(
            f"{data.name}: no closed-form optimum: r({name}) = {r[y].item()}; {reason}"
        )
    return optimal_policy(r, pi_ref, beta, divergence)


# --- the population loss and its minimiser -------------------------------------------------------
def population_loss(
    theta: Tensor, data: PreferenceData, loss: PreferenceLoss, beta: float, pi_ref: Tensor
) -> Tensor:
    r"""The (weighted) dataset mean of ``loss`` for the policy softmax(theta): the expected
    mini-batch loss. Scalar.

    theta: (K,) logits; pi_ref: (K,) reference policy. Both float64 in practice.
    """
    logp = torch.log_softmax(theta, dim=-1)  # (K,)
    log_ref = torch.log(pi_ref)  # (K,)
    y_w, y_l = data.winners, data.losers  # (N,), (N,)
    return (data.probabilities * loss(logp[y_w], logp[y_l], log_ref[y_w], log_ref[y_l], beta)).sum()


def population_minimiser(
    data: PreferenceData,
    loss: PreferenceLoss,
    beta: float,
    pi_ref: Tensor,
    theta0: Tensor | None = None,
    max_iter: int = 2000,
) -> Tensor | None:
    r"""A minimiser of :func:`population_loss` found by L-BFGS from theta0, as pi = softmax(theta).

    theta0 defaults to log pi_ref - mean(log pi_ref), where :func:`train_bandit` starts (0 for a
    uniform pi_ref).

    Returns the (K,) policy, or None when the loss has no finite minimiser along the search: the
    logits spread beyond 30 nats (a probability ratio of 1e13), the gradient does not vanish
    (|dL/dtheta| > 1e-8), or going twice as far from theta0 lowers the loss further. The
    loss may have a continuum of minimisers (softmax's theta + const always, and on D3 any pi(c));
    the one returned is the one L-BFGS reaches from theta0, which never moves theta along a
    direction the gradient is orthogonal to.
    """
    check_beta(beta)
    if theta0 is None:  # the policy starts at pi_ref, as in train_bandit
        theta0 = torch.log(pi_ref) - torch.log(pi_ref).mean()
    theta0 = theta0.to(torch.float64)
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=_STATIONARY_GRAD / 10,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = population_loss(theta, data, loss, beta, pi_ref)
        value.backward()
        return value

    opt.step(closure)
    theta = theta.detach()
    at = theta.clone().requires_grad_(True)
    value = population_loss(at, data, loss, beta, pi_ref)
    (grad,) = torch.autograd.grad(value, at)
    # A loss whose infimum is at infinity can look stationary far out (its gradient decays
    # exponentially, or faster for forward KL); there, going twice as far still lowers it.
    further = population_loss(2 * theta - theta0, data, loss, beta, pi_ref).item()
    rounding = 8 * torch.finfo(torch.float64).eps * abs(value.item())
    if (
        (theta.max() - theta.min()).item() > _THETA_SPREAD_MAX
        or grad.abs().max().item() > _STATIONARY_GRAD
        or further < value.item() - rounding
    ):
        return None
    return torch.softmax(theta, dim=0)


@dataclass(frozen=True)
class BanditTarget:
    """The population optimum a bandit run should approach, and how it was obtained.

    Attributes:
        pi: (K,) the target policy, or None where the population loss has no finite minimiser.
        how: "closed form" (``upo_ref.optimal.optimal_policy``), "numerical" (L-BFGS on the
            population loss from the initial policy, :func:`population_minimiser`) or "none".
        note: one sentence saying why this target (or none) applies.
    """

    pi: Tensor | None
    how: str
    note: str


def bandit_target(
    data: PreferenceData, loss: PreferenceLoss, beta: float, pi_ref: Tensor | None = None
) -> BanditTarget:
    r"""The population optimum of ``loss`` on ``data``, in closed form where the theory gives one.

    * IPO and IUPO in the kkt form (Psi = identity): the UPO optimum of eq. (11)-(12),
      :func:`closed_form_target` with the loss's divergence (reverse KL for IPO), when every
      action has a defined r(y) (not D3, whose action c is never compared).
    * DPO and f-DPO (Psi = logit) on a dataset with a 0/1 empirical preference: none, since
      logit(0/1) is infinite and the loss only reaches its infimum 0 at a deterministic policy.
    * Otherwise the minimiser of the population loss reached from pi_ref
      (:func:`population_minimiser`): the paper-form IUPO's fixed point, or a stationary point of a
      loss that leaves some direction free (every loss on D3); none if it is not finite (the
      paper-form JS-IUPO where its target is unreachable, ``upo_ref.experiments.analysis``).
    """
    pi_ref = uniform(data.n_actions) if pi_ref is None else pi_ref
    if loss.name == "ipo" or (loss.name == "iupo" and loss.form == "kkt"):
        try:
            pi = closed_form_target(data, pi_ref, beta, loss.divergence or ReverseKL())
            return BanditTarget(
                pi,
                "closed form",
                "the UPO optimum of eq. (11) with Psi = identity (optimal_policy)",
            )
        except ValueError:
            pass  # an action without r(y): fall back to the stationary point reached from pi_ref
    if loss.name in ("dpo", "fdpo"):
        p_hat, _ = empirical_preferences(data)
        if ((p_hat == 0) | (p_hat == 1)).any():
            return BanditTarget(
                None,
                "none",
                "Psi = logit of a 0/1 preference is infinite: the optimum is deterministic",
            )
    pi = population_minimiser(data, loss, beta, pi_ref)
    if pi is None:
        return BanditTarget(
            None, "none", "the population loss decreases forever: no finite minimiser"
        )
    return BanditTarget(
        pi, "numerical", "minimiser of the population loss reached by L-BFGS from pi_ref"
    )
