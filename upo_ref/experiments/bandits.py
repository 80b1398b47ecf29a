r"""Azar et al.'s illustrative bandit experiment, extended to f-divergences.

Azar et al. (2023, "A general theoretical paradigm to understand learning from human
preferences", section 5.1) train a policy pi = softmax(theta) over three actions {a, b, c} on a
handful of fixed preference pairs and compare DPO, which drifts to a deterministic policy, with
IPO, which converges to a regularised one. The optimisation settings here are Adam, lr 0.01,
mini-batches of 9 pairs drawn with replacement. upo_ref runs the same experiment for every loss of
``upo_ref.losses``, vectorised over seeds: theta has shape (S, K), one row per seed, and each seed's
gradient is that of its own mini-batch mean (Adam is elementwise, so the seeds never interact).

Datasets (pairs are (y_w, y_l), winner first; actions a, b, c are 0, 1, 2):

* ``D1`` = {(a, b), (b, c), (a, c)}: a total order a > b > c.
* ``D3`` = {(a, b), (b, a)}: a and b tied; c never observed.

Population targets (:func:`bandit_target`). Sampling pairs uniformly from a dataset, the expected
mini-batch loss is the dataset mean of the loss, the "population loss" here. Azar et al. show that
for IPO its minimiser is the maximiser of eq. (8), pi*(y) proportional to pi_ref(y) exp(p(y > mu) /
beta), with the empirical preferences p = P_hat and mu the empirical action distribution, when the
pairs are distributed like (y, y') ~ mu x mu (true of D1 and D3). The same argument with f' in place
of log gives the UPO optimum of eq. (11)-(12) for IUPO in the kkt form (eq. 17). Where P_hat is 0 or
1, Psi = logit is infinite and DPO/f-DPO have no finite optimum; the paper-form IUPO (eq. 23) has
its own fixed point, found numerically here, which may not exist (``upo_ref.experiments.analysis``).

The choice of 0-indexed actions, the uniform pi_ref and theta = 0 at the start follow Azar et al.;
the number of steps and seeds, and the betas, are upo_ref's (:data:`BANDIT_FULL`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_beta
from ..divergences import AlphaDivergence, ReverseKL
from ..losses import PreferenceLoss
from ..optimal import expected_psi, optimal_policy, psi_identity
from ..utils.paths import fast_mode

__all__ = [
    "ACTION_NAMES",
    "PreferenceData",
    "D1",
    "D3",
    "BANDIT_DATASETS",
    "preference_population",
    "empirical_preferences",
    "empirical_rewards",
    "closed_form_target",
    "population_loss",
    "population_minimiser",
    "BanditTarget",
    "bandit_target",
    "BanditConfig",
    "BANDIT_FULL",
    "BANDIT_FAST",
    "bandit_config",
    "bandit_losses",
    "BanditRun",
    "train_bandit",
]

ACTION_NAMES = ("a", "b", "c")

# population_minimiser: a minimiser whose logits spread over more than this many nats (a probability
# ratio of e^30 ~ 1e13) is taken to be "at infinity": the loss has no finite minimiser and the
# search is only following its infimum outwards.
_THETA_SPREAD_MAX = 30.0
# ... and one is accepted as stationary when every |d loss / d theta| is below this. (L-BFGS's line
# search stalls once loss differences reach float64 rounding, at gradients of about 1e-10 here.)
_STATIONARY_GRAD = 1e-8


@dataclass(frozen=True)
class PreferenceData:
    """A finite preference dataset on ``n_actions`` actions: pairs (y_w, y_l) and how often each is
    drawn.

    Attributes:
        name: e.g. ``"D1"``.
        pairs: ((y_w, y_l), ...), action indices, winner first.
        n_actions: K.
        weights: the probability of drawing each pair (normalised here), or None for uniform.
    """

    name: str
    pairs: tuple[tuple[int, int], ...]
    n_actions: int = 3
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if not self.pairs:
            raise ValueError(f"{self.name}: a dataset needs at least one pair")
        for y_w, y_l in self.pairs:
            if not (0 <= y_w < self.n_actions and 0 <= y_l < self.n_actions) or y_w == y_l:
                raise ValueError(
                    f"{self.name}: pair ({y_w}, {y_l}) must name two different actions in "
                    f"0..{self.n_actions - 1}"
                )
        if self.weights is not None and (
            len(self.weights) != len(self.pairs) or min(self.weights) < 0 or sum(self.weights) <= 0
        ):
            raise ValueError(
                f"{self.name}: weights must be {len(self.pairs)} non-negative numbers with a "
                "positive sum"
            )

    @property
    def winners(self) -> Tensor:
        """(N,) int64: y_w of each pair."""
        return torch.tensor([w for w, _ in self.pairs], dtype=torch.int64)

    @property
    def losers(self) -> Tensor:
        """(N,) int64: y_l of each pair."""
        return torch.tensor([y_l for _, y_l in self.pairs], dtype=torch.int64)

    @property
    def probabilities(self) -> Tensor:
        """(N,) float64: the probability of drawing each pair (uniform when ``weights`` is None)."""
        n = len(self.pairs)
        w = (
            torch.ones(n, dtype=torch.float64)
            if self.weights is None
            else torch.tensor(self.weights, dtype=torch.float64)
        )
        return w / w.sum()


def preference_population(
    P: Tensor, mu: Tensor | None = None, name: str = "population"
) -> PreferenceData:
    r"""Every ordered pair (i, j), i != j, labelled i > j, weighted mu(i) mu(j) P[i, j].

    This is the population of labelled pairs when (y, y') ~ mu x mu and y wins with probability
    P[y, y'] (pairs of an action with itself carry no preference and are left out). P: (K, K) with
    P + P^T = 1; mu: (K,), uniform by default.
    """
    k = P.shape[0]
    mu = torch.full((k,), 1.0 / k, dtype=torch.float64) if mu is None else mu
    pairs = tuple((i, j) for i in range(k) for j in range(k) if i != j)
    weights = tuple((mu[i] * mu[j] * P[i, j]).item() for i, j in pairs)
    return PreferenceData(name, pairs, n_actions=k, weights=weights)


D1 = PreferenceData("D1", ((0, 1), (1, 2), (0, 2)))
D3 = PreferenceData("D3", ((0, 1), (1, 0)))
BANDIT_DATASETS = {"D1": D1, "D3": D3}


def _uniform(k: int) -> Tensor:
    return torch.full((k,), 1.0 / k, dtype=torch.float64)


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
    pi_ref = _uniform(data.n_actions) if pi_ref is None else pi_ref
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


# --- training ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BanditConfig:
    """One bandit experiment's optimisation settings (Azar et al.'s: Adam, lr 0.01, batches of 9).

    Attributes:
        steps: optimiser steps.
        seeds: independent runs, trained together as the rows of a (seeds, K) theta.
        batch_size: pairs per mini-batch, drawn uniformly with replacement from the dataset.
        lr: learning rate.
        optimizer: "adam" (torch defaults betas=(0.9, 0.999), eps=1e-8) or "sgd" (plain gradient
            descent).
        record_every: the policy is recorded at step 0, every ``record_every`` steps, and at the
            end.
        seed: seeds the one generator that draws every batch index, so that all losses see the same
            batches (common random numbers) and a run is reproducible.
        betas: the regularisation strengths an experiment sweeps (not used by :func:`train_bandit`).
    """

    steps: int = 5_000
    seeds: int = 40
    batch_size: int = 9
    lr: float = 0.01
    optimizer: str = "adam"
    record_every: int = 25
    seed: int = 0
    betas: tuple[float, ...] = (0.1, 0.5, 1.0)

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for name in ("steps", "seeds", "batch_size", "record_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


BANDIT_FULL = BanditConfig()
BANDIT_FAST = BanditConfig(steps=300, seeds=4, record_every=10, betas=(0.1, 1.0))


def bandit_losses() -> list[PreferenceLoss]:
    """The losses the bandit experiment compares: DPO, IPO, f-DPO (JS, forward KL, alpha = 0.5) and
    JS-IUPO in the paper's form (eq. 23) and in the kkt form (eq. 17)."""
    return [
        PreferenceLoss("dpo"),
        PreferenceLoss("ipo"),
        PreferenceLoss("fdpo", "jensen_shannon"),
        PreferenceLoss("fdpo", "forward_kl"),
        PreferenceLoss("fdpo", AlphaDivergence(0.5)),
        PreferenceLoss("iupo", "jensen_shannon", form="paper"),
        PreferenceLoss("iupo", "jensen_shannon", form="kkt"),
    ]


def bandit_config() -> BanditConfig:
    """:data:`BANDIT_FAST` when ``UPO_REF_FAST=1`` (``upo_ref.utils.paths.fast_mode``), else
    :data:`BANDIT_FULL`."""
    return BANDIT_FAST if fast_mode() else BANDIT_FULL


@dataclass
class BanditRun:
    """The record of one :func:`train_bandit` call.

    Attributes:
        steps: (T,) int64, the step at which each record was taken (0 = before training).
        pi: (T, S, K) float64, the policy of every seed at every record.
        theta: (S, K) float64, the final logits.
    """

    steps: Tensor
    pi: Tensor
    theta: Tensor

    @property
    def final(self) -> Tensor:
        """(S, K): the policy of every seed after the last step."""
        return self.pi[-1]


def train_bandit(
    data: PreferenceData,
    loss: PreferenceLoss,
    beta: float,
    config: BanditConfig = BANDIT_FULL,
    pi_ref: Tensor | None = None,
) -> BanditRun:
    r"""Train pi = softmax(theta) on ``data`` with ``loss``, for ``config.seeds`` seeds at once, in
    float64.

    theta starts at log pi_ref - mean(log pi_ref) (theta = 0 for the default uniform pi_ref), i.e.
    pi = pi_ref. At every step each seed draws ``batch_size`` pairs with replacement (uniformly, or
    by ``data.weights``) and takes one optimiser step on its mini-batch mean loss; the loss sees log
    pi(y) = log_softmax(theta)[y] and log pi_ref(y).
    """
    beta = check_beta(beta)
    k, s, b = data.n_actions, config.seeds, config.batch_size
    pi_ref = _uniform(k) if pi_ref is None else pi_ref.to(torch.float64)
    log_ref = torch.log(pi_ref)  # (K,)
    winners, losers = data.winners, data.losers  # (N,)
    probabilities = None if data.weights is None else data.probabilities  # (N,)
    generator = torch.Generator().manual_seed(config.seed)

    theta = (
        (log_ref - log_ref.mean()).expand(s, k).clone().requires_grad_(True)
    )  # (S, K); 0 for uniform pi_ref
    if config.optimizer == "adam":
        opt = torch.optim.Adam([theta], lr=config.lr)
    else:
        opt = torch.optim.SGD([theta], lr=config.lr)

    record_steps, records = [], []

    def record(step: int) -> None:
        record_steps.append(step)
        records.append(torch.softmax(theta.detach(), dim=1))  # (S, K)

    record(0)
    for step in range(1, config.steps + 1):
        if probabilities is None:
            idx = torch.randint(len(data.pairs), (s, b), generator=generator)  # (S, B)
        else:
            idx = torch.multinomial(
                probabilities, s * b, replacement=True, generator=generator
            ).view(s, b)
        y_w, y_l = winners[idx], losers[idx]  # (S, B)
        logp = torch.log_softmax(theta, dim=1)  # (S, K)
        per_pair = loss(
            logp.gather(1, y_w).reshape(-1),
            logp.gather(1, y_l).reshape(-1),  # (S*B,)
            log_ref[y_w].reshape(-1),
            log_ref[y_l].reshape(-1),
            beta,
        )
        opt.zero_grad()
        per_pair.view(s, b).mean(1).sum().backward()  # sum over seeds of each seed's own batch mean
        opt.step()
        if step % config.record_every == 0 or step == config.steps:
            record(step)
    return BanditRun(torch.tensor(record_steps), torch.stack(records), theta.detach())
