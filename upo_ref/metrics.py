"""What a preference run logs: DPO's implicit rewards, their accuracy, and the loss's own scores.

One convention for ties, used by the trainer, the evaluation command and every notebook: a pair
whose chosen and rejected rewards are equal counts half (``rewards/accuracies`` = 0.5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_beta, check_logps
from .divergences import Divergence, ReverseKL, as_divergence

__all__ = ["preference_metrics"]


@torch.no_grad()
def preference_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    divergence: Divergence | str | None = None,
) -> dict[str, Tensor]:
    r"""Implicit rewards and the metrics people log, each a (B,) tensor (average them yourself).

    ``rewards/*`` are DPO's implicit rewards beta log(pi(y)/pi_ref(y)), the same for every loss, so
    curves of different losses are comparable (the paper's "evaluation margin reward"):
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen - rejected),
    ``rewards/accuracies`` (1.0 where chosen > rejected, 0.5 on a tie, 0.0 otherwise) and
    ``rewards/ties`` (1.0 where chosen == rejected). A tie counts half, so an indifferent policy
    (pi = pi_ref: every margin is 0) scores exactly 0.5, chance, and the mean is an unbiased
    estimate of P(margin > 0) + P(margin = 0) / 2.

    ``scores/*`` are the loss's own reward model, beta f'(pi(y)/pi_ref(y)) (eq. 18-19), for the
    given divergence (reverse KL when None, where scores = rewards + beta): ``scores/chosen``,
    ``scores/rejected``, ``scores/margins``. Since f' is increasing, scores and rewards rank the
    two responses alike whenever f' is strictly increasing.
    """
    check_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    beta = check_beta(beta)
    div = ReverseKL() if divergence is None else as_divergence(divergence)
    log_u_w = policy_chosen_logps - reference_chosen_logps
    log_u_l = policy_rejected_logps - reference_rejected_logps
    chosen, rejected = beta * log_u_w, beta * log_u_l
    score_w, score_l = beta * div.f_prime_of_log(log_u_w), beta * div.f_prime_of_log(log_u_l)
    tie = (chosen == rejected).to(chosen.dtype)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype) + 0.5 * tie,
        "rewards/ties": tie,
        "scores/chosen": score_w,
        "scores/rejected": score_l,
        "scores/margins": score_w - score_l,
    }
