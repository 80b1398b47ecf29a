r"""Evaluating a policy of the auxiliary-objective experiment before and after training.

Every model is evaluated on held-out pairs and prompts (:class:`HeldOutSet`): preference accuracy
of its implicit reward r = beta log(pi / pi_ref), the accuracy of r at ranking the higher-R response
of a pair first, and the auxiliary reward R of its own samples, all kept per example
(:class:`AuxEvaluation`) so that two runs can be compared pair by pair
(:func:`format_before_after`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..lm.experiment import LogpSettings
from ..lm.phases import reference_logps
from ..lm.tokenize import TokenizedPair
from ..utils.stats import mean_se
from .objectives import MODPOLoss, UPODPOLoss
from .sampling import sample_responses
from .scoring import Reward, checked_rewards, ranked_correct

__all__ = [
    "AuxEvaluation",
    "HeldOutSet",
    "evaluate_aux",
    "AuxRun",
    "dpo_baseline",
    "format_before_after",
]


@dataclass
class AuxEvaluation:
    """One model on the held-out data, kept per example so two models can be compared pair by pair.

    ``preference_correct`` (N,): 1 where the implicit reward r = beta log(pi / pi_ref) ranks y_w
    above y_l, 1/2 on a tie, 0 otherwise; ``auxiliary_correct`` (M,): the same for the response of
    higher R, over the M pairs whose two R differ; ``generation_rewards`` (P,): R of one response
    sampled from the model for each of P held-out prompts; ``generation_lengths`` (P,): their
    lengths in tokens.
    """

    label: str
    preference_correct: Tensor
    auxiliary_correct: Tensor
    generation_rewards: Tensor
    generation_lengths: Tensor
    samples: list[tuple[int, ...]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, float]:
        """Means and standard errors: ``preference_accuracy``, ``auxiliary_accuracy``,
        ``generation_reward`` (each with ``_se``), and ``generation_length``."""
        out = {}
        for key, x in (
            ("preference_accuracy", self.preference_correct),
            ("auxiliary_accuracy", self.auxiliary_correct),
            ("generation_reward", self.generation_rewards),
        ):
            out[key], out[key + "_se"] = mean_se(x)
        out["generation_length"] = self.generation_lengths.double().mean().item()
        return out


@dataclass(frozen=True)
class HeldOutSet:
    """What every model of one experiment is evaluated on, against pi_ref.

    ``pairs``: held-out pairs; ``reference``: log pi_ref(y_w|x), log pi_ref(y_l|x) of them, (N,)
    each, computed in batches of ``batch_size`` like the policy's in :func:`evaluate_aux`, so that
    the SFT model itself scores exactly 0.5 on both accuracies (every implicit reward is 0: all
    ties); ``rewards``: R(x, y_w), R(x, y_l) of them, (N,) each; ``beta`` of the implicit reward;
    ``logps``: how log-probs are computed. ``prompts`` get one response each, sampled by
    ``sampling.sample_responses`` (temperature 1, at most ``max_new_tokens``, ending at
    ``eos_id``, seeded by ``seed``) and scored by ``reward_fn``.
    """

    pairs: Sequence[TokenizedPair]
    reference: tuple[Tensor, Tensor]
    rewards: tuple[Tensor, Tensor]
    beta: float
    logps: LogpSettings
    prompts: Sequence[Sequence[int]]
    reward_fn: Reward
    max_new_tokens: int
    eos_id: int
    batch_size: int = 32
    seed: int = 0


def evaluate_aux(model, label: str, held_out: HeldOutSet, device: torch.device) -> AuxEvaluation:
    """Evaluate ``model`` as a policy against pi_ref on ``held_out``'s pairs and prompts."""
    h, settings = held_out, held_out.logps
    pc, pr = reference_logps(
        model, h.pairs, h.batch_size, settings.pad_id, device, settings.average,
        settings.response_only,
    )  # fmt: skip
    ref_c, ref_r = h.reference
    r_w, r_l = h.beta * (pc - ref_c), h.beta * (pr - ref_r)  # implicit rewards (N,)
    R_w, R_l = h.rewards
    differ = R_w != R_l
    higher = torch.where(R_w > R_l, r_w, r_l)[differ]  # implicit reward of the response of higher R
    lower = torch.where(R_w > R_l, r_l, r_w)[differ]
    samples = sample_responses(
        model, h.prompts, h.max_new_tokens, h.eos_id, settings.pad_id, device, h.seed,
        h.batch_size,
    )  # fmt: skip
    gen_rewards = checked_rewards(
        h.reward_fn(h.prompts, samples), len(h.prompts), "the generated responses"
    )
    return AuxEvaluation(
        label,
        ranked_correct(r_w, r_l),
        ranked_correct(higher, lower),
        gen_rewards,
        torch.tensor([len(s) for s in samples], dtype=torch.float64),
        samples,
    )


@dataclass
class AuxRun:
    """One preference run: its loss, the trainer's final eval metrics and all its metric records
    (``train.read_metrics``), and its evaluation."""

    label: str
    loss: UPODPOLoss | MODPOLoss
    seed: int
    final: dict[str, float]
    records: list[dict]
    evaluation: AuxEvaluation

    @property
    def is_dpo(self) -> bool:
        return isinstance(self.loss, UPODPOLoss) and self.loss.gamma == 0


def dpo_baseline(runs: Sequence[AuxRun], run: AuxRun) -> AuxRun | None:
    """What ``run`` is compared with: DPO of the same seed; for DPO of a later seed, DPO of the
    first seed (their difference is training noise); None for the first DPO run."""
    dpo = [r for r in runs if r.is_dpo]
    if run.is_dpo:
        return None if run is dpo[0] else dpo[0]
    return next(r for r in dpo if r.seed == run.seed)


def format_before_after(before: AuxEvaluation, runs: Sequence[AuxRun]) -> str:
    """A markdown table: each model's preference accuracy, auxiliary-ranking accuracy and mean R of
    its samples (mean +- one standard error), and the change of each against its DPO baseline
    (:func:`dpo_baseline`), paired over the same pairs / prompts (+- the standard error of the
    paired difference)."""

    def pm(x: Tensor) -> str:
        m, se = mean_se(x)
        return f"{m:.3f} +- {se:.3f}"

    keys = ("preference_correct", "auxiliary_correct", "generation_rewards")
    lines = [
        "| model | pref. acc. | aux-rank acc. | R of samples | len | compared with | d pref. | d "
        "aux-rank | d R |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for run in [None, *runs]:
        e = before if run is None else run.evaluation
        base = None if run is None else dpo_baseline(runs, run)
        diffs = (
            ["", "", "", ""]
            if base is None
            else [base.label] + [pm(getattr(e, k) - getattr(base.evaluation, k)) for k in keys]
        )
        lines.append(
            f"| {e.label} | {pm(e.preference_correct)} | {pm(e.auxiliary_correct)} | "
            f"{pm(e.generation_rewards)} | {e.generation_lengths.mean().item():.1f} | "
            + " | ".join(diffs)
            + " |"
        )
    return "\n".join(lines)
