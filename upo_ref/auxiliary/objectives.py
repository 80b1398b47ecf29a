r"""The auxiliary-objective losses as :class:`upo_ref.objective.Objective`\ s, with their per-pair
inputs.

Each is a frozen value (its hyperparameters, checked when it is made) whose ``losses`` calls the
pure function of ``upo_ref.auxiliary.losses`` with the per-pair tensors it names in
``extra_keys``, each (B,):

* :class:`UPODPOLoss`: ``upo_dpo_loss``, reading R(x, y_w), R(x, y_l) and V(x) (:data:`EXTRA_KEYS`);
* :class:`MODPOLoss`: ``modpo_loss`` with R as its margin reward, weights (1 - w_aux, w_aux);
* :class:`KTOLoss`, :class:`UPOKTOLoss`: ``kto_loss``, ``upo_kto_loss`` on the two responses of
  each pair (y_w desirable, y_l undesirable), averaged per pair. KTO's reference point needs the
  *current* policy's log-probs of mismatched responses (:data:`KL_KEYS`), so whoever calls them
  recomputes those extras at every step (the toy of ``auxiliary.frontier`` does); they are not for
  ``lm.train.PreferencePhase``, whose extras are fixed before training.

:func:`aux_extras` builds one split's extras for the first two from the rewards and values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..losses import dpo_loss
from .baselines import kto_loss, kto_reference_point, modpo_loss
from .losses import (
    WEIGHT_CAP,
    advantage_weights,
    advantages,
    auxiliary_loss,
    upo_dpo_loss,
    upo_kto_loss,
    upo_loss,
)

__all__ = [
    "EXTRA_KEYS",
    "KL_KEYS",
    "aux_extras",
    "UPODPOLoss",
    "MODPOLoss",
    "KTOLoss",
    "UPOKTOLoss",
]

# The per-pair inputs of UPO and MODPO: R(x, y_w), R(x, y_l), V(x), each (B,).
EXTRA_KEYS = ("chosen_rewards", "rejected_rewards", "values")
# KTO's mismatched pairs: log pi and log pi_ref of another example's chosen / rejected response
# under this pair's prompt, each (B,); the batch's mean log-ratio over them estimates
# KL(pi || pi_ref).
KL_KEYS = ("kl_policy_chosen", "kl_policy_rejected", "kl_reference_chosen", "kl_reference_rejected")


def aux_extras(
    chosen_rewards: Tensor, rejected_rewards: Tensor, values: Tensor
) -> dict[str, Tensor]:
    """One split's extras for UPO-DPO and MODPO: {``chosen_rewards``, ``rejected_rewards``,
    ``values``}, (N,) each, float32, the values detached."""
    n = chosen_rewards.shape
    if len(n) != 1 or rejected_rewards.shape != n or values.shape != n:
        raise ValueError(
            "chosen_rewards, rejected_rewards and values must be (N,) each, got "
            f"{tuple(chosen_rewards.shape)}, {tuple(rejected_rewards.shape)}, {tuple(values.shape)}"
        )
    tensors = (chosen_rewards.float(), rejected_rewards.float(), values.float().detach())
    return dict(zip(EXTRA_KEYS, tensors, strict=True))


@dataclass(frozen=True)
class UPODPOLoss:
    r"""UPO with DPO as the base: ``auxiliary.losses.upo_dpo_loss`` on R(x, y_w), R(x, y_l), V(x).
    (B,)

    gamma = 0 is DPO: the same loss and the same gradients, bit for bit (``tests/test_aux_lm.py``
    trains both and compares every parameter). ``alpha`` is the advantage temperature of the
    weights w(A) = exp(min(A / alpha, log cap)).
    """

    gamma: float
    alpha: float = 1.0
    cap: float = WEIGHT_CAP
    extra_keys: ClassVar[tuple[str, ...]] = EXTRA_KEYS
    divergence: ClassVar[None] = None  # DPO's implicit reward: reverse KL

    def __post_init__(self):
        # The functions that use gamma, alpha and cap check them, with their messages.
        upo_loss(torch.zeros(1), torch.zeros(1), self.gamma)
        advantage_weights(torch.zeros(1), self.alpha, self.cap)

    @property
    def label(self) -> str:
        return "DPO (gamma=0)" if self.gamma == 0 else f"UPO-DPO gamma={self.gamma:g}"

    def losses(self, pc, pr, rc, rr, beta, extras: Mapping[str, Tensor]) -> Tensor:
        r_w, r_l, v = (extras[k] for k in EXTRA_KEYS)  # (B,) each
        return upo_dpo_loss(pc, pr, rc, rr, r_w, r_l, v, beta, self.gamma, self.alpha, self.cap)

    def metrics(self, pc, pr, rc, rr, beta, extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per pair, averaged over its two responses: ``aux/advantage`` A, ``aux/weight`` w(A),
        ``aux/at_cap`` (fraction of the two weights clamped at ``cap``), and the loss's two terms,
        ``aux/dpo_loss`` and ``aux/weighted_nll`` (L_pi, before the factor gamma). (B,) each."""
        r_w, r_l, v = (extras[k] for k in EXTRA_KEYS)
        a_w, a_l = advantages(r_w, v), advantages(r_l, v)
        w_w = advantage_weights(a_w, self.alpha, self.cap)
        w_l = advantage_weights(a_l, self.alpha, self.cap)
        limit = math.log(self.cap)
        at_cap = ((a_w / self.alpha >= limit).float() + (a_l / self.alpha >= limit).float()) / 2
        nll_w = auxiliary_loss(pc, a_w, self.alpha, self.cap)
        nll_l = auxiliary_loss(pr, a_l, self.alpha, self.cap)
        return {
            "aux/advantage": (a_w + a_l) / 2,
            "aux/weight": (w_w + w_l) / 2,
            "aux/at_cap": at_cap,
            "aux/dpo_loss": dpo_loss(pc, pr, rc, rr, beta),
            "aux/weighted_nll": (nll_w + nll_l) / 2,
        }


@dataclass(frozen=True)
class MODPOLoss:
    r"""MODPO, the multi-objective baseline: ``auxiliary.losses.modpo_loss`` with the auxiliary
    reward as its margin and weights w = (1 - w_aux, w_aux). (B,)"""

    w_aux: float
    extra_keys: ClassVar[tuple[str, ...]] = EXTRA_KEYS[:2]
    divergence: ClassVar[None] = None

    def __post_init__(self):
        w = self.w_aux
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0.0 <= w < 1.0:
            raise ValueError(
                f"w_aux must be in [0, 1) so that the preference weight 1 - w_aux is > 0, got {w!r}"
            )

    @property
    def label(self) -> str:
        return f"MODPO w_aux={self.w_aux:g}"

    def losses(self, pc, pr, rc, rr, beta, extras: Mapping[str, Tensor]) -> Tensor:
        r_w, r_l = extras["chosen_rewards"], extras["rejected_rewards"]
        return modpo_loss(pc, pr, rc, rr, r_w, r_l, beta, (1.0 - self.w_aux, self.w_aux))

    def metrics(self, pc, pr, rc, rr, beta, extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {}


def _kto_inputs(pc, pr, rc, rr, extras: Mapping[str, Tensor]):
    """The 2B responses of B pairs, chosen then rejected: log pi (2B,), log pi_ref (2B,), desirable
    (2B,) and KTO's reference point z0 () from the mismatched pairs."""
    policy, reference = torch.cat([pc, pr]), torch.cat([rc, rr])  # (2B,) each
    B = pc.shape[0]
    desirable = torch.arange(2 * B, device=pc.device) < B  # chosen desirable, rejected not
    kl_policy = torch.cat([extras["kl_policy_chosen"], extras["kl_policy_rejected"]])  # (2B,)
    kl_reference = torch.cat([extras["kl_reference_chosen"], extras["kl_reference_rejected"]])
    return policy, reference, desirable, kto_reference_point(kl_policy, kl_reference)


def _per_pair(losses: Tensor) -> Tensor:
    """(2B,) per-response losses, chosen then rejected -> (B,), the mean of each pair's two."""
    return losses.reshape(2, -1).mean(0)


@dataclass(frozen=True)
class KTOLoss:
    r"""KTO on preference pairs (y_w desirable, y_l undesirable): ``auxiliary.losses.kto_loss`` of
    both responses, averaged per pair, with z0 from :data:`KL_KEYS`. (B,)"""

    lambda_d: float = 1.0
    lambda_u: float = 1.0
    extra_keys: ClassVar[tuple[str, ...]] = KL_KEYS
    divergence: ClassVar[None] = None
    label: ClassVar[str] = "KTO"

    def losses(self, pc, pr, rc, rr, beta, extras: Mapping[str, Tensor]) -> Tensor:
        policy, reference, desirable, z0 = _kto_inputs(pc, pr, rc, rr, extras)
        per_response = kto_loss(
            policy, reference, desirable, z0, beta, self.lambda_d, self.lambda_u
        )
        return _per_pair(per_response)

    def metrics(self, pc, pr, rc, rr, beta, extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {}


@dataclass(frozen=True)
class UPOKTOLoss:
    r"""UPO with KTO as the base: ``auxiliary.losses.upo_kto_loss`` of both responses of each pair
    (rewards R(x, y_w), R(x, y_l), value V(x)), averaged per pair. (B,)"""

    gamma: float
    alpha: float = 1.0
    lambda_d: float = 1.0
    lambda_u: float = 1.0
    cap: float = WEIGHT_CAP
    extra_keys: ClassVar[tuple[str, ...]] = EXTRA_KEYS + KL_KEYS
    divergence: ClassVar[None] = None

    def __post_init__(self):
        upo_loss(torch.zeros(1), torch.zeros(1), self.gamma)
        advantage_weights(torch.zeros(1), self.alpha, self.cap)

    @property
    def label(self) -> str:
        return f"UPO-KTO gamma={self.gamma:g}"

    def losses(self, pc, pr, rc, rr, beta, extras: Mapping[str, Tensor]) -> Tensor:
        policy, reference, desirable, z0 = _kto_inputs(pc, pr, rc, rr, extras)
        rewards = torch.cat([extras["chosen_rewards"], extras["rejected_rewards"]])  # (2B,)
        values = torch.cat([extras["values"], extras["values"]])  # (2B,): V(x) for both
        per_response = upo_kto_loss(
            policy, reference, desirable, z0, rewards, values, beta, self.gamma, self.alpha,
            self.lambda_d, self.lambda_u, self.cap,
        )  # fmt: skip
        return _per_pair(per_response)

    def metrics(self, pc, pr, rc, rr, beta, extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {}
