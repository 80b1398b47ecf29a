r"""Auxiliary-objective UPO (Badrinath et al., arXiv 2405.17956): a preference loss plus an
advantage-weighted maximum-likelihood term for a designer reward that is not a preference.

.. math::

    L_{UPO} = L_{pref} + \gamma \, L_{\pi}, \qquad
    L_{\pi}(x, y) = -\, w\big(A_\theta(x, y)\big) \log \pi_\phi(y \mid x), \qquad
    A_\theta(x, y) = R(x, y) - V_\theta(x),

with ``L_pref`` DPO (``upo_ref.losses.dpo_loss``) or KTO (``auxiliary.baselines.kto_loss``),
``R`` an auxiliary reward (``upo_ref.auxiliary.rewards``: readability, safety), and ``V_theta`` a
value network fitted to the same offline data (``auxiliary.value_network``: ``ValueNetwork``,
``expectile_loss``). MODPO (Zhou et al. 2023), the main multi-objective baseline the paper compares
with, is ``auxiliary.baselines.modpo_loss``.

Like ``upo_ref.losses``, every loss here is a pure function of per-sequence tensors of shape (B,)
(summed log-probs, per-response rewards, per-prompt values) returning per-example losses (B,).

What is a reconstruction
------------------------
This implementation is built from the paper's abstract and a summary card, not its full text, and
no code of theirs is public. The card gives the decomposition above, A = R - V with V "a value
network trained on the same offline data", "alpha/beta temperature scales", a KL regulariser, and
gamma = 0 reducing to the base method. Everything below beyond that is a reconstruction, named
where it is made:

* **weight function** w(A) = exp(min(A / alpha, log c)), c = :data:`WEIGHT_CAP` (AWR, Peng et al.
  2019; IQL's policy extraction, Kostrikov et al. 2021, which clamps exp(A / alpha) at 100). It is
  the weighted-MLE projection of the KL-regularised improvement step
  argmax_pi E_pi[A] - alpha KL(pi || mu), whose solution is mu(y|x) exp(A(x, y) / alpha) / Z(x):
  this is where the card's KL regularisation of the auxiliary term lives, with alpha its strength.
  No separate KL term is added (on offline samples y ~ mu it would not estimate KL(pi || pi_ref)).
* **value loss**: expectile regression (IQL); tau = 0.5 gives least squares, V = E_mu[R | x], the
  advantage baseline of AWR, and is the default the toy experiments use.
* **pairs**: with DPO as the base, each pair's two responses are two (x, y, R) samples of the
  auxiliary term; L_pi is averaged over them (:func:`upo_dpo_loss`).
* **several rewards**: a weighted sum with explicit weights, before the value network
  (:func:`combine_rewards`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..checks import check_logps
from ..losses import dpo_loss
from .baselines import kto_loss
from .checks import (
    WEIGHT_CAP,
    check_all_finite,
    check_alpha,
    check_cap,
    check_number,
    check_vectors,
)

__all__ = [
    "WEIGHT_CAP",
    "advantages",
    "advantage_weights",
    "auxiliary_loss",
    "combine_rewards",
    "upo_loss",
    "upo_dpo_loss",
    "upo_kto_loss",
]


# --- advantages and their weights ----------------------------------------------------------------
def advantages(rewards: Tensor, values: Tensor) -> Tensor:
    r"""A_theta(x, y) = R(x, y) - V_theta(x), with V detached: the policy loss never trains V. (B,)

    ``rewards`` R(x, y) and ``values`` V(x) are (B,), one per response; a prompt's value is repeated
    for each of its responses.
    """
    check_vectors(rewards, values, names=("rewards", "values"))
    return rewards - values.detach()


def advantage_weights(advantages: Tensor, alpha: float, cap: float = WEIGHT_CAP) -> Tensor:
    r"""w(A) = exp(min(A / alpha, log cap)), detached; shape of ``advantages``. (Reconstruction:
    AWR/IQL.)

    Finite and in [0, cap] for every finite or infinite advantage: the exponent is clamped *before*
    exp, so nothing overflows (clamping exp(A / alpha) afterwards would give inf, then NaN
    gradients). A = -inf (or A / alpha below about -745 in float64, -104 in float32) gives weight 0.
    Small alpha approaches "imitate only the best response" (weights concentrate on the largest A);
    large alpha approaches plain maximum likelihood (all weights 1).

    Note that with these weights V(x) only rescales all responses of one prompt by exp(-V(x) /
    alpha): within a prompt the relative weights are exp((R_i - R_j) / alpha) whatever V is. V
    matters for how prompts are weighted against each other and for where the cap binds.
    """
    alpha = check_alpha(alpha)
    cap = check_cap(cap)
    check_vectors(advantages, names=("advantages",), finite=False)
    exponent = torch.clamp(advantages.detach() / alpha, max=math.log(cap))
    return torch.exp(exponent)


def auxiliary_loss(
    policy_logps: Tensor, advantages: Tensor, alpha: float, cap: float = WEIGHT_CAP
) -> Tensor:
    r"""UPO's auxiliary term L_pi(x, y) = -w(A(x, y)) log pi(y|x), advantage-weighted MLE. (B,)

    Its gradient with respect to log pi(y|x) is exactly -w(A): every response in the data has its
    log-probability raised (w > 0), in proportion to its weight, so responses with A > 0 are raised
    more than those with A < 0, whose weight is below 1 and tends to 0 as A -> -inf. (Probability
    mass moves towards high-advantage responses because pi is normalised.) Alone, the term is
    minimised by pi(y|x) proportional to the weighted empirical distribution, mu(y|x) w(A(x, y)).
    """
    check_logps(policy_logps, names=("policy_logps",))
    check_vectors(policy_logps, advantages, names=("policy_logps", "advantages"), finite=False)
    return -advantage_weights(advantages, alpha, cap) * policy_logps


# --- several rewards, and the combined loss -------------------------------------------------------
def combine_rewards(rewards: Tensor, weights: Sequence[float]) -> Tensor:
    r"""R = sum_k c_k R_k for rewards (B, K) and explicit weights c (K,): (B,). (Reconstruction.)

    A linear scalarisation, taken *before* the value network, so one V fits the combined reward and
    A = R - V. The weights carry the units: Flesch reading ease spans about 0-100 while a safety
    logit spans a few units, so choose c (or rescale each R_k) with that in mind; nothing is
    normalised silently.
    """
    if rewards.dim() != 2 or rewards.shape[1] != len(weights):
        raise ValueError(
            f"rewards must be (B, K) with K = len(weights) = {len(weights)}, got "
            f"{tuple(rewards.shape)}"
        )
    check_all_finite(rewards, "rewards")
    c = torch.tensor([float(v) for v in weights], dtype=rewards.dtype, device=rewards.device)
    check_all_finite(c, "weights")
    return rewards @ c  # (B, K) @ (K,) -> (B,)


def upo_loss(preference_losses: Tensor, auxiliary_losses: Tensor, gamma: float) -> Tensor:
    r"""The UPO objective per example: L_pref + gamma L_pi. (B,)

    gamma = 0 returns the base loss exactly (x + 0 * finite = x in floating point), with exactly the
    base gradients; larger gamma trades preference fit for auxiliary reward.
    """
    gamma = check_number(
        gamma, "gamma", "the weight of the auxiliary term; 0 is the base method", allow_zero=True
    )
    if preference_losses.shape != auxiliary_losses.shape:
        raise ValueError(
            f"preference_losses {tuple(preference_losses.shape)} and auxiliary_losses "
            f"{tuple(auxiliary_losses.shape)} must have the same shape (B,)"
        )
    return preference_losses + gamma * auxiliary_losses


def upo_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    values: Tensor,
    beta: float,
    gamma: float,
    alpha: float,
    cap: float = WEIGHT_CAP,
) -> Tensor:
    r"""UPO with DPO as the base: DPO + gamma (L_pi(x, y_w) + L_pi(x, y_l)) / 2. (B,)

    ``chosen_rewards``/``rejected_rewards`` are the auxiliary rewards R(x, y_w), R(x, y_l);
    ``values`` is V(x), shared by both responses of a pair. Averaging L_pi over the pair's two
    responses is a reconstruction: it weighs every response of the data equally, so gamma is "per
    response".
    """
    pref = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    a_w, a_l = advantages(chosen_rewards, values), advantages(rejected_rewards, values)
    aux_w = auxiliary_loss(policy_chosen_logps, a_w, alpha, cap)  # L_pi(x, y_w)
    aux_l = auxiliary_loss(policy_rejected_logps, a_l, alpha, cap)  # L_pi(x, y_l)
    aux = (aux_w + aux_l) / 2
    return upo_loss(pref, aux, gamma)


def upo_kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    z0: Tensor | float,
    rewards: Tensor,
    values: Tensor,
    beta: float,
    gamma: float,
    alpha: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    cap: float = WEIGHT_CAP,
) -> Tensor:
    r"""UPO with KTO as the base: KTO + gamma L_pi, one loss per response. (B,)"""
    pref = kto_loss(policy_logps, reference_logps, desirable, z0, beta, lambda_d, lambda_u)
    aux = auxiliary_loss(policy_logps, advantages(rewards, values), alpha, cap)
    return upo_loss(pref, aux, gamma)
