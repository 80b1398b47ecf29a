r"""Auxiliary rewards of a language model's responses, and how they relate to the preferences.

R(x, y) is computed once, in preprocessing, for every response of every pair
(:func:`pair_rewards`), by default Flesch reading ease of the response *as the model sees it*:
decoded from its token ids after truncation (:class:`TextReward`, a reconstruction: the paper
scores the full response). :func:`preference_agreement` and :func:`shorter_response_agreement`
say how R agrees with the preference labels and with response length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..lm.tokenize import TokenizedPair
from ..utils.stats import mean_se
from .rewards import readability_rewards

__all__ = [
    "Reward",
    "TextReward",
    "checked_rewards",
    "pair_rewards",
    "ranked_correct",
    "preference_agreement",
    "shorter_response_agreement",
]

# A reward function: (prompts, responses) as token-id tuples -> R(x, y), (N,) float32. Responses
# are given as the model sees them (after truncation, EOS included where the response has one).
Reward = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Tensor]


@dataclass(frozen=True, eq=False)
class TextReward:
    """R(x, y) = score(text of y): the response's token ids are decoded (special tokens such as EOS
    dropped) and scored by ``score``, a function of a list of texts returning (N,) (default:
    ``rewards.readability_rewards``, Flesch reading ease / 100, 0 for a text with no word)."""

    tokenizer: object
    score: Callable[[list[str]], Tensor] = readability_rewards

    def texts(self, responses: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(list(r), skip_special_tokens=True) for r in responses]

    def __call__(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
    ) -> Tensor:
        return torch.as_tensor(self.score(self.texts(responses))).float()


def checked_rewards(values, n: int, what: str) -> Tensor:
    r = torch.as_tensor(values)
    if r.shape != (n,) or not r.is_floating_point():
        raise ValueError(
            f"the reward function must return a floating-point (N,) tensor with N = {n} for "
            f"{what}, got {'shape ' + str(tuple(r.shape)) + ' ' + str(r.dtype)}"
        )
    if not bool(torch.isfinite(r).all()):
        i = int((~torch.isfinite(r)).nonzero()[0, 0])
        raise ValueError(
            f"the reward function returned {int((~torch.isfinite(r)).sum())} non-finite value(s) "
            f"for {what}, the first {r[i].item()!r} at index {i}"
        )
    return r.float()


def pair_rewards(reward_fn: Reward, pairs: Sequence[TokenizedPair]) -> tuple[Tensor, Tensor]:
    """R(x, y_w) and R(x, y_l) of every pair, each (N,) float32 on the CPU, computed once.

    Raises ValueError if ``reward_fn`` returns anything but N finite floats per call.
    """
    if not pairs:
        raise ValueError("no pairs to score")
    prompts = [p.prompt for p in pairs]
    chosen = checked_rewards(
        reward_fn(prompts, [p.chosen for p in pairs]), len(pairs), "the chosen responses"
    )
    rejected = checked_rewards(
        reward_fn(prompts, [p.rejected for p in pairs]), len(pairs), "the rejected responses"
    )
    return chosen, rejected


def ranked_correct(higher: Tensor, lower: Tensor) -> Tensor:
    """1 where higher > lower, 1/2 on a tie, 0 otherwise: (N,). Ties count half, so a score that
    cannot tell two responses apart (e.g. the implicit reward of pi = pi_ref, 0 for all) is at
    0.5."""
    return (higher > lower).double() + 0.5 * (higher == lower).double()


def preference_agreement(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """How an auxiliary reward agrees with preferences, over N pairs (N,) each.

    ``p_chosen_higher``: fraction of pairs with R(y_w) > R(y_l) (ties count 1/2; 0.5 means R says
    nothing about the preference, below 0.5 means they conflict), with its standard error
    ``p_se``; ``mean_difference``: mean of R(y_w) - R(y_l), with ``difference_se``; ``n``; ``ties``.
    """
    chosen_rewards, rejected_rewards = (
        torch.as_tensor(chosen_rewards),
        torch.as_tensor(rejected_rewards),
    )
    if (
        chosen_rewards.shape != rejected_rewards.shape
        or chosen_rewards.dim() != 1
        or len(chosen_rewards) < 2
    ):
        raise ValueError(
            f"need two (N,) reward tensors with N >= 2, got {tuple(chosen_rewards.shape)} and "
            f"{tuple(rejected_rewards.shape)}"
        )
    p, p_se = mean_se(ranked_correct(chosen_rewards, rejected_rewards))
    d, d_se = mean_se(chosen_rewards - rejected_rewards)
    return {
        "p_chosen_higher": p,
        "p_se": p_se,
        "mean_difference": d,
        "difference_se": d_se,
        "n": len(chosen_rewards),
        "ties": int((chosen_rewards == rejected_rewards).sum()),
    }


def shorter_response_agreement(
    pairs: Sequence[TokenizedPair], chosen_rewards: Tensor, rejected_rewards: Tensor
) -> Tensor:
    """A baseline for the auxiliary-ranking accuracy: over the pairs whose two R differ, 1 where the
    response of higher R is the shorter one (in tokens), 1/2 on equal lengths, 0 otherwise. (M,)

    Its mean far from 1/2 means R and length are entangled, so anything that shifts the implicit
    reward with length (sums of log-probs do) moves the auxiliary-ranking accuracy too."""
    length_w = torch.tensor([len(p.chosen) for p in pairs], dtype=torch.float64)
    length_l = torch.tensor([len(p.rejected) for p in pairs], dtype=torch.float64)
    differ = chosen_rewards != rejected_rewards
    higher_w = chosen_rewards > rejected_rewards
    length_of_higher = torch.where(higher_w, length_w, length_l)[
        differ
    ]  # (M,) the higher-R response's length
    length_of_lower = torch.where(higher_w, length_l, length_w)[differ]
    return ranked_correct(-length_of_higher, -length_of_lower)  # "higher" score = shorter
