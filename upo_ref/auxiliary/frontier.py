r"""The toy "beyond the preference frontier" experiment: categorical policies trained offline.

A contextual bandit stands in for a language model. There are K prompts x, each with n responses
y; the policy is pi(y|x) = softmax(theta_x)_y, one logit vector per prompt, started at the
reference pi_ref. Two rewards live on the responses:

* r(x, y), the *preference* reward: labellers compare two responses drawn from pi_ref and prefer y
  with Bradley-Terry probability sigma(r(x, y) - r(x, y')). Methods see only these labels.
* R(x, y), the *auxiliary* (designer) reward, e.g. safety or readability: known for every response
  in the data, and built to conflict with r (correlation ``-conflict``).

Every method trains on the same offline pairs by full-batch Adam for a fixed number of steps, and
is scored by two numbers of the trained policy, both exact sums over the finite response set:

* preference win-rate against pi_ref, E_x E_{y ~ pi, y' ~ pi_ref} sigma(r(x, y) - r(x, y')) (0.5 at
  pi_ref);
* auxiliary reward E_x E_{y ~ pi} R(x, y).

Methods (``METHODS``): ``dpo``; ``kto`` (chosen = desirable, rejected = undesirable); ``modpo``
(R as MODPO's margin reward, w = (1 - w_aux, w_aux)); ``upo-dpo`` and ``upo-kto`` (UPO with that
base and weight gamma, advantages from an expectile value network on the prompt features). As a
yardstick, :func:`oracle_logps` is the KL-regularised optimum pi_ref exp((r + lam R) / beta) / Z,
which knows r exactly: sweeping lam traces the best trade-off any beta-regularised policy can reach.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import PreferenceLoss
from ..objective import Objective, as_objective
from ..utils.stats import mean_se
from .objectives import KL_KEYS, KTOLoss, MODPOLoss, UPODPOLoss, UPOKTOLoss
from .value_network import ValueNetwork, fit_value_network

__all__ = [
    "METHODS",
    "Bandit",
    "make_bandit",
    "Pairs",
    "sample_pairs",
    "win_rate",
    "auxiliary_value",
    "oracle_logps",
    "ToyConfig",
    "fit_values",
    "method_objective",
    "method_loss",
    "train_policy",
    "FrontierPoint",
    "run_frontier",
    "summarise",
]

# Each method's loss, made from its config (``method_objective``).
_OBJECTIVES = {
    "dpo": lambda c: as_objective(PreferenceLoss("dpo")),
    "kto": lambda c: KTOLoss(),
    "modpo": lambda c: MODPOLoss(c.w_aux),
    "upo-dpo": lambda c: UPODPOLoss(c.gamma, c.alpha),
    "upo-kto": lambda c: UPOKTOLoss(c.gamma, c.alpha),
}
METHODS = tuple(_OBJECTIVES)


@contextlib.contextmanager
def _one_thread():
    """Run the tiny-tensor loops on one thread (restored afterwards): with several threads each op
    of a (K, n) problem pays a synchronisation cost larger than its work, ten times slower on a busy
    machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Bandit:
    """A finite contextual bandit; every tensor is float64.

    Attributes:
        reference_logps: log pi_ref(y|x), (K, n), each row normalised.
        preference_reward: r(x, y), (K, n), the Bradley-Terry reward behind the labels.
        auxiliary_reward: R(x, y), (K, n), the designer reward.
        features: (K, d) fixed prompt features, the value network's input.
    """

    reference_logps: Tensor
    preference_reward: Tensor
    auxiliary_reward: Tensor
    features: Tensor

    @property
    def n_prompts(self) -> int:
        return self.reference_logps.shape[0]


def make_bandit(
    n_prompts: int = 4,
    n_actions: int = 8,
    n_features: int = 8,
    conflict: float = 0.8,
    reward_scale: float = 2.0,
    seed: int = 0,
) -> Bandit:
    """A random bandit whose auxiliary reward has correlation about ``-conflict`` with the
    preference reward.

    r ~ reward_scale N(0, 1); R = -conflict z + sqrt(1 - conflict^2) N(0, 1) with z = r /
    reward_scale, so R has unit scale; pi_ref = softmax(N(0, 0.5^2)) logits; features ~ N(0, 1).
    """
    if not -1.0 <= conflict <= 1.0:
        raise ValueError(
            f"conflict must be in [-1, 1] (the negative correlation of R with r), got {conflict!r}"
        )
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    reference_logps = F.log_softmax(0.5 * randn(n_prompts, n_actions), dim=-1)
    z = randn(n_prompts, n_actions)
    auxiliary = -conflict * z + math.sqrt(1.0 - conflict**2) * randn(n_prompts, n_actions)
    return Bandit(reference_logps, reward_scale * z, auxiliary, randn(n_prompts, n_features))


@dataclass(frozen=True)
class Pairs:
    """Offline preference data: prompt ``x``, preferred ``y_w`` and dispreferred ``y_l``, each (N,)
    int64."""

    x: Tensor
    y_w: Tensor
    y_l: Tensor


def sample_pairs(bandit: Bandit, n_pairs: int, seed: int) -> Pairs:
    """N pairs: x uniform, two *different* responses from pi_ref(.|x), labelled by Bradley-Terry on
    r."""
    g = torch.Generator().manual_seed(seed)
    K, n = bandit.reference_logps.shape
    x = torch.randint(K, (n_pairs,), generator=g)
    ref = bandit.reference_logps.exp()[x]  # (N, n)
    y1 = torch.multinomial(ref, 1, generator=g).squeeze(-1)  # (N,)
    ref_other = ref.scatter(1, y1.unsqueeze(-1), 0.0)  # pi_ref conditioned on y2 != y1
    y2 = torch.multinomial(ref_other, 1, generator=g).squeeze(-1)
    r = bandit.preference_reward[x]  # (N, n)
    p_first = torch.sigmoid(r.gather(1, y1[:, None]) - r.gather(1, y2[:, None])).squeeze(-1)
    first_wins = torch.rand(n_pairs, generator=g, dtype=torch.float64) < p_first
    return Pairs(x, torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1))


def win_rate(bandit: Bandit, logps: Tensor) -> Tensor:
    """E_x sum_{y, y'} pi(y|x) pi_ref(y'|x) sigma(r(x, y) - r(x, y')): the preference win-rate
    against pi_ref. ()"""
    r = bandit.preference_reward
    p_beats = torch.sigmoid(r[:, :, None] - r[:, None, :])  # (K, n, n): y beats y'
    pi, ref = logps.exp(), bandit.reference_logps.exp()
    return torch.einsum("ky,kyz,kz->k", pi, p_beats, ref).mean()


def auxiliary_value(bandit: Bandit, logps: Tensor) -> Tensor:
    """E_x E_{y ~ pi(.|x)} R(x, y): the expected auxiliary reward. ()"""
    return (logps.exp() * bandit.auxiliary_reward).sum(-1).mean()


def oracle_logps(bandit: Bandit, beta: float, lam: float) -> Tensor:
    """log of the KL-regularised optimum pi_ref exp((r + lam R) / beta) / Z, which knows r exactly.
    (K, n)"""
    reward = bandit.preference_reward + lam * bandit.auxiliary_reward
    return F.log_softmax(bandit.reference_logps + reward / beta, dim=-1)


@dataclass(frozen=True)
class ToyConfig:
    """One training run. ``gamma`` is UPO's, ``w_aux`` MODPO's weight of R (w = (1 - w_aux, w_aux)).

    ``alpha`` is the advantage temperature and ``tau`` the value network's expectile; ``steps`` and
    ``lr`` are full-batch Adam's.
    """

    method: str = "dpo"
    beta: float = 0.5
    gamma: float = 0.0
    alpha: float = 1.0
    w_aux: float = 0.0
    tau: float = 0.5
    steps: int = 300
    lr: float = 0.05

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.w_aux < 1.0:
            raise ValueError(
                "w_aux must be in [0, 1) so that MODPO's preference weight 1 - w_aux is > 0, got "
                f"{self.w_aux!r}"
            )


def fit_values(
    bandit: Bandit, pairs: Pairs, tau: float = 0.5, steps: int = 300, seed: int = 0
) -> Tensor:
    """V(x) for every prompt, (K,): a small MLP on the prompt features fitted by expectile
    regression to R(x, y) over all 2N responses of the data (both sides of every pair)."""
    x = torch.cat([pairs.x, pairs.x])
    y = torch.cat([pairs.y_w, pairs.y_l])
    rewards = bandit.auxiliary_reward[x, y]  # (2N,)
    with torch.random.fork_rng(
        devices=[]
    ):  # seed the initial weights without touching the global RNG
        torch.manual_seed(seed)
        net = ValueNetwork(bandit.features.shape[1], hidden_sizes=(32,), dtype=torch.float64)
    with _one_thread():
        fit_value_network(net, bandit.features[x], rewards, tau=tau, steps=steps, lr=0.02)
    with torch.no_grad():
        return net(bandit.features)


def method_objective(config: ToyConfig) -> Objective:
    """The loss of ``config.method`` with its hyperparameters, as an
    ``upo_ref.objective.Objective``."""
    return _OBJECTIVES[config.method](config)


def method_loss(
    bandit: Bandit, pairs: Pairs, logps: Tensor, config: ToyConfig, values: Tensor | None = None
) -> Tensor:
    """The method's mean loss at the policy ``logps`` (K, n), a scalar; what :func:`train_policy`
    minimises. ``values`` (K,) is needed by the UPO methods."""
    return _mean_loss(method_objective(config), bandit, pairs, logps, config.beta, values)


def _mean_loss(
    objective: Objective, bandit: Bandit, pairs: Pairs, logps: Tensor, beta: float, values
) -> Tensor:
    x, y_w, y_l = pairs.x, pairs.y_w, pairs.y_l
    ref = bandit.reference_logps
    pc, pr, rc, rr = logps[x, y_w], logps[x, y_l], ref[x, y_w], ref[x, y_l]  # (N,) each
    extras = {
        "chosen_rewards": bandit.auxiliary_reward[x, y_w],  # R(x, y_w), (N,)
        "rejected_rewards": bandit.auxiliary_reward[x, y_l],
    }
    if values is not None:
        extras["values"] = values[x]  # V(x), (N,)
    if set(KL_KEYS) & set(objective.extra_keys):
        # KTO's mismatched pairs (HALOs' KL batch): prompt i with the response of example i - 1 of
        # the 2N responses (chosen, then rejected), under the current policy.
        N = len(x)
        y_mismatched = torch.cat([y_w, y_l]).roll(1)  # (2N,)
        kl_policy = logps[torch.cat([x, x]), y_mismatched]  # (2N,)
        kl_reference = ref[torch.cat([x, x]), y_mismatched]
        extras |= dict(zip(KL_KEYS, (*kl_policy.split(N), *kl_reference.split(N)), strict=True))
    return objective.losses(pc, pr, rc, rr, beta, extras).mean()


def train_policy(
    bandit: Bandit, pairs: Pairs, config: ToyConfig, values: Tensor | None = None
) -> Tensor:
    """Train theta (K, n) from pi_ref by full-batch Adam on :func:`method_loss`; returns log pi (K,
    n), detached."""
    objective = method_objective(config)
    if "values" in objective.extra_keys and values is None:
        raise ValueError(f"{config.method} needs values V(x), shape (K,): see fit_values")
    theta = bandit.reference_logps.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([theta], lr=config.lr)
    with _one_thread():
        for _ in range(config.steps):
            optimiser.zero_grad()
            logps = F.log_softmax(theta, dim=-1)  # (K, n)
            _mean_loss(objective, bandit, pairs, logps, config.beta, values).backward()
            optimiser.step()
    return F.log_softmax(theta.detach(), dim=-1)


@dataclass(frozen=True)
class FrontierPoint:
    """One trained policy: its config, data seed, win-rate against pi_ref and auxiliary reward."""

    config: ToyConfig
    seed: int
    win_rate: float
    auxiliary: float


def run_frontier(
    bandit: Bandit,
    configs: list[ToyConfig],
    seeds: list[int],
    n_pairs: int = 200,
    value_steps: int = 300,
) -> list[FrontierPoint]:
    """Train every config on the data of every seed (one dataset and one value network per seed)."""
    points = []
    for seed in seeds:
        pairs = sample_pairs(bandit, n_pairs, seed)
        values_by_tau: dict[float, Tensor] = {}
        for config in configs:
            values = None
            if "values" in method_objective(config).extra_keys:
                if config.tau not in values_by_tau:
                    values_by_tau[config.tau] = fit_values(
                        bandit, pairs, config.tau, value_steps, seed
                    )
                values = values_by_tau[config.tau]
            logps = train_policy(bandit, pairs, config, values)
            win, aux = win_rate(bandit, logps).item(), auxiliary_value(bandit, logps).item()
            points.append(FrontierPoint(config, seed, win, aux))
    return points


def summarise(points: list[FrontierPoint], z: float = 1.96) -> list[dict]:
    """Mean and normal-approximation interval half-width (z standard errors) over seeds, per config.

    Returns one dict per config, in first-seen order, with keys ``config``, ``n``, ``win_rate``,
    ``win_rate_ci``, ``auxiliary``, ``auxiliary_ci`` (half-widths are 0 for a single seed).
    """
    groups: dict[ToyConfig, list[FrontierPoint]] = {}
    for p in points:
        groups.setdefault(p.config, []).append(p)
    rows = []
    for config, ps in groups.items():
        row = {"config": config, "n": len(ps)}
        for key in ("win_rate", "auxiliary"):
            mean, se = mean_se(torch.tensor([getattr(p, key) for p in ps], dtype=torch.float64))
            row[key], row[key + "_ci"] = mean, z * se
        rows.append(row)
    return rows
