r"""The baselines auxiliary-objective UPO builds on or compares with: KTO (Ethayarajh et al. 2024),
one of its two base losses, and MODPO (Zhou et al. 2023), the multi-objective baseline. Pure
functions of per-sequence tensors (B,) returning per-example losses (B,), like ``upo_ref.losses``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ..checks import check_beta, check_logps
from ..losses import h_pi, softplus
from .checks import check_all_finite, check_mask, check_number

__all__ = ["kto_reference_point", "kto_loss", "modpo_loss"]


def kto_reference_point(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    r"""KTO's reference point z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)]),
    detached. ()

    As in ContextualAI/HALOs: (x_i, y'_i) are *mismatched* pairs (each prompt with another example's
    response), so the mean log-ratio is a batch estimate of KL(pi || pi_ref) that needs no sampling.
    It is detached (no gradient flows through the reference point) and clamped at 0 because a KL is
    non-negative. Returns a 0-dim tensor.
    """
    check_logps(
        policy_kl_logps, reference_kl_logps, names=("policy_kl_logps", "reference_kl_logps")
    )
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    z0: Tensor | float,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> Tensor:
    r"""KTO (Ethayarajh et al. 2024, eq. 7; HALOs' ``KTOTrainer``), one loss per response. (B,)

    With r = log(pi(y|x) / pi_ref(y|x)) and z0 the reference point (:func:`kto_reference_point`):

    * desirable y:   lambda_D (1 - sigma(beta (r - z0)))
    * undesirable y: lambda_U (1 - sigma(beta (z0 - r)))

    computed as lambda sigma(-t), which equals lambda (1 - sigma(t)) and keeps full precision where
    sigma(t) is near 1. ``desirable`` is a bool (B,) tensor; from preference pairs, chosen responses
    are desirable and rejected ones undesirable. The loss lies in (0, lambda) for every finite r.
    """
    check_logps(policy_logps, reference_logps, names=("policy_logps", "reference_logps"))
    check_mask(desirable, policy_logps, "desirable")
    beta = check_beta(beta)
    lambda_d = check_number(lambda_d, "lambda_d", "KTO's weight of desirable responses, e.g. 1.0")
    lambda_u = check_number(lambda_u, "lambda_u", "KTO's weight of undesirable responses, e.g. 1.0")
    # z0 is a constant: no gradient flows through the reference point.
    z0 = torch.as_tensor(z0, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    if z0.numel() != 1:
        raise ValueError(
            f"z0 must be a single number (the batch KL estimate), got shape {tuple(z0.shape)}"
        )
    check_all_finite(z0, "z0")
    r = policy_logps - reference_logps  # log pi / pi_ref
    desirable_losses = lambda_d * torch.sigmoid(-beta * (r - z0))
    undesirable_losses = lambda_u * torch.sigmoid(-beta * (z0 - r))
    return torch.where(desirable, desirable_losses, undesirable_losses)


def modpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_margin_rewards: Tensor,
    rejected_margin_rewards: Tensor,
    beta: float,
    w: Sequence[float],
) -> Tensor:
    r"""MODPO (Zhou et al. 2023, ZHZisZZ/modpo ``modpo_loss``): DPO with the other objectives as a
    margin. (B,)

    .. math::

        -\log\sigma\!\Big(\tfrac{1}{w_0}\big[\beta h_\pi
            - w_{1:}\cdot(r_{1:}(x, y_w) - r_{1:}(x, y_l))\big]\Big)

    ``w = (w_0, w_1, ..., w_K)``: w_0 > 0 weighs the preference being trained on, w_k the k-th
    margin reward. ``chosen_margin_rewards``/``rejected_margin_rewards`` are (B,) for one other
    objective or (B, K) for K. Its optimum has beta log(pi / pi_ref) = w_0 r_pref + sum_k w_k r_k (+
    a function of x): the KL-regularised optimum of the weighted reward. With w = (1,) (no margin)
    it is DPO.
    """
    check_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    beta = check_beta(beta)
    w = [
        float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else math.nan for v in w
    ]
    if len(w) < 1 or not all(math.isfinite(v) for v in w) or w[0] <= 0:
        raise ValueError(
            "w must be finite numbers (w_0 > 0 for the preference, then one per margin reward), "
            f"got {w!r}"
        )
    chosen_m, rejected_m = chosen_margin_rewards, rejected_margin_rewards
    if chosen_m.dim() == 1:
        chosen_m, rejected_m = chosen_m.unsqueeze(-1), rejected_m.unsqueeze(-1)  # (B,) -> (B, 1)
    B = policy_chosen_logps.shape[0]
    for m, name in ((chosen_m, "chosen_margin_rewards"), (rejected_m, "rejected_margin_rewards")):
        if m.shape != (B, len(w) - 1):
            raise ValueError(
                f"{name} must be (B,) or (B, K) with B = {B} and K = len(w) - 1 = {len(w) - 1}, "
                f"got {tuple(m.shape)}"
            )
        check_all_finite(m, name)
    w_rest = torch.tensor(w[1:], dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    margin = (chosen_m - rejected_m) @ w_rest  # (B, K) @ (K,) -> (B,)
    h = h_pi(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = (beta * h - margin) / w[0]
    return softplus(-logits)
