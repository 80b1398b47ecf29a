r"""Azar et al.'s illustrative bandit experiment, extended to f-divergences.

Azar et al. (2023, "A general theoretical paradigm to understand learning from human
preferences", section 5.1) train a policy pi = softmax(theta) over three actions {a, b, c} on a
handful of fixed preference pairs and compare DPO, which drifts to a deterministic policy, with
IPO, which converges to a regularised one. The optimisation settings here are Adam, lr 0.01,
mini-batches of 9 pairs drawn with replacement. upo_ref runs the same experiment for every loss of
``upo_ref.losses``, vectorised over seeds: theta has shape (S, K), one row per seed, and each seed's
gradient is that of its own mini-batch mean (Adam is elementwise, so the seeds never interact).

The datasets (D1, D3) are in ``experiments.bandit_data``, the population targets each loss should
reach in ``experiments.bandit_targets``; this module has the training loop.

The choice of 0-indexed actions, the uniform pi_ref and theta = 0 at the start follow Azar et al.;
the number of steps and seeds, and the betas, are upo_ref's (:data:`BANDIT_FULL`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_beta
from ..divergences import AlphaDivergence
from ..losses import PreferenceLoss
from ..utils.paths import fast_mode
from .bandit_data import PreferenceData, uniform

__all__ = [
    "BanditConfig",
    "BANDIT_FULL",
    "BANDIT_FAST",
    "bandit_config",
    "bandit_losses",
    "BanditRun",
    "train_bandit",
]


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
    pi_ref = uniform(k) if pi_ref is None else pi_ref.to(torch.float64)
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
