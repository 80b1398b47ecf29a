r"""Auxiliary-objective UPO on a language model, through the training pipeline (issue 6, phase 2).

``upo_ref.auxiliary.losses`` has the losses (Badrinath et al., arXiv 2405.17956):

.. math::

    L_{UPO} = L_{DPO} + \gamma\,\tfrac12\big[L_\pi(x, y_w) + L_\pi(x, y_l)\big], \qquad
    L_\pi(x, y) = -\,w\big(R(x, y) - V_\theta(x)\big)\log\pi_\phi(y \mid x).

This module runs them on HH-RLHF with a causal language model and the trainer of ``upo_ref.lm.train``:

1. **auxiliary rewards**, once, in preprocessing: R(x, y) of every response of every pair
   (:func:`pair_rewards`), by default Flesch reading ease of the response *as the model sees it*
   (decoded from its token ids after truncation; :class:`TextReward`);
2. **the value network**, once, before policy training: V(x) reads the reference (SFT) model's
   last-layer hidden state at the last prompt token (:func:`prompt_features`) and is fitted by
   least squares to the rewards of both responses of every training pair (:func:`fit_prompt_values`);
   A = R - V is then a fixed number per response, and a training step costs what a DPO step costs;
3. **the loss** reaches the trainer through its ``takes_batch`` hook: :class:`UPODPOLoss` (and the
   baseline :class:`MODPOLoss`) read R(x, y_w), R(x, y_l) and V(x) from the batch, where
   ``PreferencePhase(extras=...)`` put them by pair index (:func:`aux_extras`);
4. **evaluation** before and after training, on held-out pairs and prompts (:func:`evaluate_aux`):
   preference accuracy of the implicit reward r = beta log(pi / pi_ref), its accuracy at ranking
   the higher-R response of a pair first, and the auxiliary reward of the policy's own samples.

:func:`run_aux_experiment` does all of it for the configs of :func:`aux_lm_config`.

What is a reconstruction
------------------------
Beyond the reconstructions of ``upo_ref.auxiliary.losses`` (weight function, value loss, pair averaging):
the value network's input (the frozen reference model's hidden state after the prompt, a linear
head), fitting V once before policy training rather than alongside it (A does not depend on the
policy, so nothing is lost offline), and scoring the *truncated* responses. The readability reward
is ``rewards.readability_rewards`` (Flesch reading ease / 100), itself a reconstruction.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lm.config import TINY_GPT2, DataConfig, ExperimentConfig, ModelConfig, PhaseConfig
from ..lm.experiment import ExperimentData, load_experiment_data, prepare_reference
from ..lm.models import default_device
from ..lm.tokenize import TokenizedPair, collate_sequences
from ..lm.train import METRICS, PreferencePhase, autocast, read_metrics, reference_logps, train
from ..losses import dpo_loss
from ..utils.stats import mean_se
from .losses import (
    WEIGHT_CAP,
    ValueNetwork,
    advantage_weights,
    advantages,
    auxiliary_loss,
    fit_value_network,
    last_token_pool,
    modpo_loss,
    upo_dpo_loss,
    upo_loss,
)
from .rewards import readability_rewards

__all__ = [
    "EXTRA_KEYS",
    "TextReward",
    "pair_rewards",
    "preference_agreement",
    "prompt_features",
    "PromptValues",
    "fit_prompt_values",
    "aux_extras",
    "weight_statistics",
    "shorter_response_agreement",
    "UPODPOLoss",
    "MODPOLoss",
    "sample_responses",
    "generation_prompts",
    "AuxEvaluation",
    "evaluate_aux",
    "AuxLMConfig",
    "aux_lm_config",
    "AuxRun",
    "AuxExperiment",
    "run_aux_experiment",
    "dpo_baseline",
    "format_before_after",
]

# The per-pair tensors the losses below read from the batch: R(x, y_w), R(x, y_l), V(x), each (B,).
EXTRA_KEYS = ("chosen_rewards", "rejected_rewards", "values")

# A reward function: (prompts, responses) as token-id tuples -> R(x, y), (N,) float32. Responses
# are given as the model sees them (after truncation, EOS included where the response has one).
Reward = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Tensor]


# ------------------------------------------------------------------------------------------------
# 1. Auxiliary rewards
# ------------------------------------------------------------------------------------------------


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


def _checked_rewards(values, n: int, what: str) -> Tensor:
    r = torch.as_tensor(values)
    if r.shape != (n,) or not r.is_floating_point():
        raise ValueError(
            f"the reward function must return a floating-point (N,) tensor with N = {n} for {what}, "
            f"got {'shape ' + str(tuple(r.shape)) + ' ' + str(r.dtype)}"
        )
    if not bool(torch.isfinite(r).all()):
        i = int((~torch.isfinite(r)).nonzero()[0, 0])
        raise ValueError(
            f"the reward function returned {int((~torch.isfinite(r)).sum())} non-finite value(s) for "
            f"{what}, the first {r[i].item()!r} at index {i}"
        )
    return r.float()


def pair_rewards(reward_fn: Reward, pairs: Sequence[TokenizedPair]) -> tuple[Tensor, Tensor]:
    """R(x, y_w) and R(x, y_l) of every pair, each (N,) float32 on the CPU, computed once.

    Raises ValueError if ``reward_fn`` returns anything but N finite floats per call.
    """
    if not pairs:
        raise ValueError("no pairs to score")
    prompts = [p.prompt for p in pairs]
    chosen = _checked_rewards(
        reward_fn(prompts, [p.chosen for p in pairs]), len(pairs), "the chosen responses"
    )
    rejected = _checked_rewards(
        reward_fn(prompts, [p.rejected for p in pairs]), len(pairs), "the rejected responses"
    )
    return chosen, rejected


def _ranked_correct(higher: Tensor, lower: Tensor) -> Tensor:
    """1 where higher > lower, 1/2 on a tie, 0 otherwise: (N,). Ties count half, so a score that
    cannot tell two responses apart (e.g. the implicit reward of pi = pi_ref, 0 for all) is at 0.5."""
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
    p, p_se = mean_se(_ranked_correct(chosen_rewards, rejected_rewards))
    d, d_se = mean_se(chosen_rewards - rejected_rewards)
    return {
        "p_chosen_higher": p,
        "p_se": p_se,
        "mean_difference": d,
        "difference_se": d_se,
        "n": len(chosen_rewards),
        "ties": int((chosen_rewards == rejected_rewards).sum()),
    }


# ------------------------------------------------------------------------------------------------
# 2. The value network on the reference model's prompt features
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def prompt_features(
    model, prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device
) -> Tensor:
    """h(x): the model's last-layer hidden state at each prompt's last token, (N, H) float32 on the CPU.

    The prompts are right-padded in batches of ``batch_size``; ``last_token_pool`` picks each row's
    last real position, so the features do not depend on the padding. Eval mode, bf16 autocast on CUDA.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt_features needs a non-empty list of non-empty prompts")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [(p, ()) for p in prompts[start : start + batch_size]]
            batch = collate_sequences(chunk, pad_id)  # (b, T) each
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with autocast(device):
                hidden = model.base_model(
                    input_ids=ids, attention_mask=mask
                ).last_hidden_state  # (b, T, H)
            out.append(last_token_pool(hidden.float(), mask).cpu())  # (b, H)
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass
class PromptValues:
    """A fitted V(x): ``network`` on standardised features (``mean``, ``std`` of the training features),
    and its fit: ``losses`` per step, and R^2 of V as a predictor of R on the training responses and on
    held-out ones (``r2_train``, ``r2_eval``; 0 is no better than the training mean, < 0 worse)."""

    network: ValueNetwork
    mean: Tensor
    std: Tensor
    losses: list[float]
    r2_train: float = math.nan
    r2_eval: float = math.nan

    @torch.no_grad()
    def __call__(self, features: Tensor) -> Tensor:
        """V(x) for features (N, H): (N,) float32, detached."""
        return self.network((features - self.mean) / self.std).float()

    def r_squared(
        self, features: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, baseline: float
    ) -> float:
        """1 - SSE(V) / SSE(baseline) over both responses of every pair; ``baseline`` is the training mean."""
        v = self(features)
        r = torch.cat([chosen_rewards, rejected_rewards]).double()
        sse = (r - torch.cat([v, v]).double()).square().sum()
        return 1.0 - (sse / (r - baseline).square().sum()).item()


def fit_prompt_values(
    features: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    hidden_sizes: Sequence[int] = (),
    tau: float = 0.5,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> PromptValues:
    """Fit V(x) to R(x, y) over both responses of every pair: the 2N samples (h(x_i), R(x_i, y_w,i)),
    (h(x_i), R(x_i, y_l,i)), by ``auxiliary.fit_value_network`` (full-batch Adam on the expectile loss;
    tau = 0.5 is least squares, V(x) -> E[R | x]).

    ``features`` (N, H) from :func:`prompt_features`, rewards (N,) each. Features are standardised
    with their training mean and standard deviation (so one learning rate suits any model's hidden
    size and scale). ``hidden_sizes=()`` is a linear head. Deterministic given ``seed``.
    """
    if (
        features.dim() != 2
        or chosen_rewards.shape != (features.shape[0],)
        or rejected_rewards.shape != chosen_rewards.shape
    ):
        raise ValueError(
            f"features must be (N, H) and the rewards (N,) each; got {tuple(features.shape)}, "
            f"{tuple(chosen_rewards.shape)}, {tuple(rejected_rewards.shape)}"
        )
    features = features.float()
    mean = features.mean(0)
    std = features.std(0, unbiased=False).clamp(min=1e-6)  # a constant feature stays 0, not NaN
    with torch.random.fork_rng(
        devices=[]
    ):  # seeds the initial weights, leaves the global RNG alone
        torch.manual_seed(seed)
        network = ValueNetwork(features.shape[1], hidden_sizes)
    z = (features - mean) / std
    losses = fit_value_network(
        network,
        torch.cat([z, z]),
        torch.cat([chosen_rewards, rejected_rewards]).float(),
        tau=tau,
        steps=steps,
        lr=lr,
    )
    values = PromptValues(network.eval(), mean, std, losses)
    baseline = torch.cat([chosen_rewards, rejected_rewards]).double().mean().item()
    values.r2_train = values.r_squared(features, chosen_rewards, rejected_rewards, baseline)
    return values


def aux_extras(
    chosen_rewards: Tensor, rejected_rewards: Tensor, values: Tensor
) -> dict[str, Tensor]:
    """One split's ``PreferencePhase`` extras: {``chosen_rewards``, ``rejected_rewards``, ``values``}, (N,) each."""
    n = chosen_rewards.shape
    if len(n) != 1 or rejected_rewards.shape != n or values.shape != n:
        raise ValueError(
            f"chosen_rewards, rejected_rewards and values must be (N,) each, got {tuple(chosen_rewards.shape)}, "
            f"{tuple(rejected_rewards.shape)}, {tuple(values.shape)}"
        )
    return dict(
        zip(EXTRA_KEYS, (chosen_rewards.float(), rejected_rewards.float(), values.float().detach()))
    )


def weight_statistics(
    extras: dict[str, Tensor], alpha: float, cap: float = WEIGHT_CAP
) -> dict[str, float]:
    """The advantages and UPO weights of one split's 2N responses (A = R - V is fixed before training,
    so these describe the whole run): ``mean_advantage``, ``std_advantage``, ``mean_weight``,
    ``max_weight`` and ``at_cap`` (fraction of weights clamped at ``cap``)."""
    values = extras["values"]
    a = torch.cat(
        [
            advantages(extras["chosen_rewards"], values),
            advantages(extras["rejected_rewards"], values),
        ]
    )
    w = advantage_weights(a, alpha, cap)
    return {
        "mean_advantage": a.mean().item(),
        "std_advantage": a.std().item(),
        "mean_weight": w.mean().item(),
        "max_weight": w.max().item(),
        "at_cap": (a / alpha >= math.log(cap)).double().mean().item(),
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
    return _ranked_correct(-length_of_higher, -length_of_lower)  # "higher" score = shorter


# ------------------------------------------------------------------------------------------------
# 3. The losses, as the trainer calls them
# ------------------------------------------------------------------------------------------------


def _batch_extras(batch: dict[str, Tensor] | None, pc: Tensor) -> tuple[Tensor, ...]:
    missing = [k for k in EXTRA_KEYS if batch is None or k not in batch]
    if missing:
        raise ValueError(
            f"the batch has no {missing}: give PreferencePhase extras={{'train': aux_extras(...), "
            f"'eval': aux_extras(...)}} so that every pair carries R(x, y_w), R(x, y_l) and V(x)"
        )
    out = tuple(batch[k] for k in EXTRA_KEYS)
    for k, v in zip(EXTRA_KEYS, out):
        if v.shape != pc.shape:
            raise ValueError(
                f"batch[{k!r}] has shape {tuple(v.shape)} but the batch has {pc.shape[0]} pairs"
            )
    return out


@dataclass(frozen=True)
class UPODPOLoss:
    r"""UPO with DPO as the base, for ``PreferencePhase``: ``auxiliary.upo_dpo_loss`` with R(x, y_w),
    R(x, y_l) and V(x) read from the batch (``takes_batch``). (B,)

    gamma = 0 is DPO: the same loss and the same gradients, bit for bit (``tests/test_aux_lm.py``
    trains both and compares every parameter). ``alpha`` is the advantage temperature of the weights
    w(A) = exp(min(A / alpha, log cap)).
    """

    gamma: float
    alpha: float = 1.0
    cap: float = WEIGHT_CAP
    takes_batch: ClassVar[bool] = True

    def __post_init__(
        self,
    ):  # the functions that use gamma, alpha and cap check them, with their messages
        upo_loss(torch.zeros(1), torch.zeros(1), self.gamma)
        advantage_weights(torch.zeros(1), self.alpha, self.cap)

    @property
    def label(self) -> str:
        return "DPO (gamma=0)" if self.gamma == 0 else f"UPO-DPO gamma={self.gamma:g}"

    def __call__(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, batch=None
    ) -> Tensor:
        r_w, r_l, v = _batch_extras(batch, pc)
        return upo_dpo_loss(pc, pr, rc, rr, r_w, r_l, v, beta, self.gamma, self.alpha, self.cap)

    def metrics(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, batch=None
    ) -> dict[str, Tensor]:
        """Per pair, averaged over its two responses: ``aux/advantage`` A, ``aux/weight`` w(A),
        ``aux/at_cap`` (fraction of the two weights clamped at ``cap``), and the loss's two terms,
        ``aux/dpo_loss`` and ``aux/weighted_nll`` (L_pi, before the factor gamma). (B,) each."""
        r_w, r_l, v = _batch_extras(batch, pc)
        a_w, a_l = advantages(r_w, v), advantages(r_l, v)
        w_w, w_l = (
            advantage_weights(a_w, self.alpha, self.cap),
            advantage_weights(a_l, self.alpha, self.cap),
        )
        limit = math.log(self.cap)
        at_cap = ((a_w / self.alpha >= limit).float() + (a_l / self.alpha >= limit).float()) / 2
        nll = (
            auxiliary_loss(pc, a_w, self.alpha, self.cap)
            + auxiliary_loss(pr, a_l, self.alpha, self.cap)
        ) / 2
        return {
            "aux/advantage": (a_w + a_l) / 2,
            "aux/weight": (w_w + w_l) / 2,
            "aux/at_cap": at_cap,
            "aux/dpo_loss": dpo_loss(pc, pr, rc, rr, beta),
            "aux/weighted_nll": nll,
        }


@dataclass(frozen=True)
class MODPOLoss:
    r"""MODPO, the multi-objective baseline, for ``PreferencePhase``: ``auxiliary.modpo_loss`` with the
    auxiliary reward as its margin, weights w = (1 - w_aux, w_aux) (as in ``upo_ref.auxiliary.frontier``). (B,)"""

    w_aux: float
    takes_batch: ClassVar[bool] = True

    def __post_init__(self):
        if (
            isinstance(self.w_aux, bool)
            or not isinstance(self.w_aux, numbers.Real)
            or not 0.0 <= self.w_aux < 1.0
        ):
            raise ValueError(
                f"w_aux must be in [0, 1) so that the preference weight 1 - w_aux is > 0, got {self.w_aux!r}"
            )

    @property
    def label(self) -> str:
        return f"MODPO w_aux={self.w_aux:g}"

    def __call__(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, batch=None
    ) -> Tensor:
        r_w, r_l, _ = _batch_extras(batch, pc)
        return modpo_loss(pc, pr, rc, rr, r_w, r_l, beta, (1.0 - self.w_aux, self.w_aux))


# ------------------------------------------------------------------------------------------------
# 4. Generation and evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_responses(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 32,
    greedy: bool = False,
) -> list[tuple[int, ...]]:
    """One response per prompt, token by token from the model: y_t ~ pi(. | x, y_<t) at temperature 1
    (``greedy=True``: the most likely token), until EOS (kept, as in the training data) or
    ``max_new_tokens``.

    Prompts are left-padded in batches, with position ids counted from each prompt's first real
    token and a key/value cache, so a prompt's response does not depend on its batch (greedy; the
    test checks it against ``model.generate``). Sampling draws from a CPU generator seeded by
    ``seed``: the same draws on any device, for given ``seed`` and ``batch_size``. Eval mode; bf16
    autocast on CUDA (the sampling itself in float32).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}"
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_responses needs a non-empty list of non-empty prompts")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[tuple[int, ...]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            B, T = len(chunk), max(len(p) for p in chunk)
            ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
            for i, p in enumerate(chunk):
                ids[i, T - len(p) :] = torch.tensor(p)
                mask[i, T - len(p) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at each prompt's first token
            step_ids, past = ids, None
            done = torch.zeros(B, dtype=torch.bool)
            tokens = []
            for _ in range(max_new_tokens):
                with autocast(device):
                    o = model(
                        input_ids=step_ids,
                        attention_mask=mask,
                        position_ids=positions,
                        past_key_values=past,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                past = o.past_key_values
                logits = o.logits[:, -1].float().cpu()  # (B, V)
                if greedy:
                    nxt = logits.argmax(-1)  # (B,)
                else:
                    nxt = torch.multinomial(
                        F.softmax(logits, dim=-1), 1, generator=generator
                    ).squeeze(-1)  # (B,)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                tokens.append(nxt)
                done |= nxt == eos_id
                if bool(done.all()):
                    break
                step_ids = nxt.unsqueeze(-1).to(device)  # (B, 1)
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
                positions = positions[:, -1:] + 1  # (B, 1)
            generated = torch.stack(tokens, dim=1).tolist()  # (B, t)
            for row in generated:
                n = row.index(eos_id) + 1 if eos_id in row else len(row)
                out.append(tuple(row[:n]))
    finally:
        model.train(was_training)
    return out


def generation_prompts(
    pairs: Sequence[TokenizedPair], n: int, max_prompt_tokens: int
) -> list[tuple[int, ...]]:
    """The prompts of the first n pairs, each cut to its last ``max_prompt_tokens`` tokens (the turn
    being answered, as HH truncation keeps it). A prompt shared by several pairs appears once per pair,
    as prompts do in the held-out data; each gets its own sample."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if not 1 <= n <= len(pairs):
        raise ValueError(
            f"asked for {n} generation prompts from {len(pairs)} pairs; need 1 <= n <= {len(pairs)}"
        )
    return [tuple(p.prompt[-max_prompt_tokens:]) for p in pairs[:n]]


@dataclass
class AuxEvaluation:
    """One model on the held-out data, kept per example so two models can be compared pair by pair.

    ``preference_correct`` (N,): 1 where the implicit reward r = beta log(pi / pi_ref) ranks y_w above
    y_l, 1/2 on a tie, 0 otherwise; ``auxiliary_correct`` (M,): the same for the response of higher R,
    over the M pairs whose two R differ; ``generation_rewards`` (P,): R of one response sampled from
    the model for each of P held-out prompts; ``generation_lengths`` (P,): their lengths in tokens.
    """

    label: str
    preference_correct: Tensor
    auxiliary_correct: Tensor
    generation_rewards: Tensor
    generation_lengths: Tensor
    samples: list[tuple[int, ...]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, float]:
        """Means and standard errors: ``preference_accuracy``, ``auxiliary_accuracy``, ``generation_reward``
        (each with ``_se``), and ``generation_length``."""
        out = {}
        for key, x in (
            ("preference_accuracy", self.preference_correct),
            ("auxiliary_accuracy", self.auxiliary_correct),
            ("generation_reward", self.generation_rewards),
        ):
            out[key], out[key + "_se"] = mean_se(x)
        out["generation_length"] = self.generation_lengths.double().mean().item()
        return out


def evaluate_aux(
    model,
    label: str,
    pairs: Sequence[TokenizedPair],
    reference: tuple[Tensor, Tensor],
    rewards: tuple[Tensor, Tensor],
    beta: float,
    prompts: Sequence[Sequence[int]],
    reward_fn: Reward,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
    batch_size: int = 32,
    seed: int = 0,
    average: bool = False,
    response_only: bool = True,
) -> AuxEvaluation:
    """Evaluate ``model`` as a policy against pi_ref on held-out ``pairs`` and ``prompts``.

    ``reference``: log pi_ref(y_w|x), log pi_ref(y_l|x) of the pairs, computed in batches of
    ``batch_size`` like the policy's here, so that the SFT model itself scores exactly 0.5 on both
    accuracies (every implicit reward is 0: all ties). ``rewards``: R(x, y_w), R(x, y_l) of the pairs.
    Responses to ``prompts`` are sampled by :func:`sample_responses` (temperature 1, ``seed``).
    """
    pc, pr = reference_logps(
        model, pairs, batch_size, pad_id, device, average, response_only
    )  # (N,), (N,)
    ref_c, ref_r = reference
    r_w, r_l = beta * (pc - ref_c), beta * (pr - ref_r)  # implicit rewards (N,)
    R_w, R_l = rewards
    differ = R_w != R_l
    higher = torch.where(R_w > R_l, r_w, r_l)[differ]  # implicit reward of the response of higher R
    lower = torch.where(R_w > R_l, r_l, r_w)[differ]
    samples = sample_responses(
        model, prompts, max_new_tokens, eos_id, pad_id, device, seed, batch_size
    )
    gen_rewards = _checked_rewards(
        reward_fn(prompts, samples), len(prompts), "the generated responses"
    )
    return AuxEvaluation(
        label,
        _ranked_correct(r_w, r_l),
        _ranked_correct(higher, lower),
        gen_rewards,
        torch.tensor([len(s) for s in samples], dtype=torch.float64),
        samples,
    )


# ------------------------------------------------------------------------------------------------
# 5. The experiment
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuxLMConfig:
    """The language-model experiment: a model, HH data, SFT (pi_ref) and the preference phase of every
    run, which are DPO (gamma = 0), UPO-DPO at each positive gamma and MODPO at each w_aux; then DPO
    and UPO-DPO again with the preference phase's seed replaced by each of ``extra_seeds``. Those
    runs differ from the first ones only in the order the training pairs come in: DPO against DPO
    measures training noise, and UPO against DPO of the same seed is a second, independent estimate
    of UPO's effect.

    ``alpha``: UPO's advantage temperature, in the reward's units (readability: hundreds of Flesch
    points; the responses' rewards have a standard deviation of about 0.2 on HH). ``value_*``: the
    value network (hidden sizes, Adam steps, learning rate, expectile tau). ``n_generation_prompts``
    held-out prompts get one sampled response of at most ``max_new_tokens`` tokens each.
    """

    name: str
    model: ModelConfig
    data: DataConfig
    sft: PhaseConfig
    pref: PhaseConfig
    beta: float = 0.1
    alpha: float = 0.2
    gammas: tuple[float, ...] = (0.0, 0.1)
    modpo_w_aux: tuple[float, ...] = (0.5,)
    extra_seeds: tuple[int, ...] = (1,)
    value_hidden_sizes: tuple[int, ...] = ()
    value_steps: int = 500
    value_lr: float = 1e-2
    tau: float = 0.5
    n_generation_prompts: int = 64
    max_new_tokens: int = 24
    generation_seed: int = 0

    def __post_init__(self):
        if not self.gammas or self.gammas[0] != 0.0:
            raise ValueError(
                f"gammas must start with 0.0 (plain DPO, the baseline of every comparison), got {self.gammas}"
            )
        for g in self.gammas:
            UPODPOLoss(g, self.alpha)  # raises on a bad gamma or alpha
        for w in self.modpo_w_aux:
            MODPOLoss(w)
        if self.pref.seed in self.extra_seeds:
            raise ValueError(
                f"extra_seeds {self.extra_seeds} must differ from the preference phase's seed "
                f"{self.pref.seed}: a run with the same seed is the first run again"
            )
        if self.max_new_tokens >= self.data.max_length:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must leave room for a prompt within "
                f"max_length ({self.data.max_length}), the tiny model's number of positions"
            )

    def experiment(self) -> ExperimentConfig:
        """The pipeline's view of this config (model, data, SFT, preference phase; beta), for
        ``lm.experiment.prepare_data`` and ``lm.experiment.prepare_reference``."""
        return ExperimentConfig(
            self.name, self.model, self.data, self.sft, self.pref, losses=(), betas=(self.beta,)
        )

    def runs(self) -> list[tuple[str, UPODPOLoss | MODPOLoss, PhaseConfig]]:
        """(label, loss, preference phase) of every run, DPO first."""
        upo = [UPODPOLoss(g, self.alpha) for g in self.gammas]
        out = [
            (loss.label, loss, self.pref) for loss in upo + [MODPOLoss(w) for w in self.modpo_w_aux]
        ]
        for seed in self.extra_seeds:
            out += [
                (f"{loss.label} seed={seed}", loss, dataclasses.replace(self.pref, seed=seed))
                for loss in upo
            ]
        return out


def aux_lm_config(fast: bool = False) -> AuxLMConfig:
    """The notebook's configs: a random-init GPT-2 (the ``quick`` preset's family) on the local HH files.

    Full (about four minutes on 2 busy CPU cores): 2 layers of 64, SFT on 1,024 targets, one pass over
    384 training pairs, 192 held-out pairs, 64 held-out prompts; DPO, UPO-DPO at gamma 0.1 and MODPO
    at w_aux 0.5, then DPO and UPO-DPO with another order of the training pairs. Fast (``UPO_REF_FAST=1``, seconds): 2
    layers of 32 and everything smaller. The preference phase uses AdamW at 1e-4: at the ``quick``
    preset's RMSprop 2e-5, 24 steps move the policy so little that its samples barely change.
    Microbatches of 2 pairs keep each (tokens x 50,257) logit buffer under 32 MB, which glibc reuses
    instead of mapping fresh pages every time (a third less time on the CPU; no effect on the
    numbers beyond rounding). The same code runs a hub or local model on a GPU: replace ``model``.
    """
    if fast:
        return AuxLMConfig(
            name="aux-lm-fast",
            model=ModelConfig(TINY_GPT2, n_layer=2, n_head=2, n_embd=32),
            data=DataConfig(
                ("hh",),
                max_length=40,
                max_prompt_length=24,
                n_train_pairs=64,
                n_eval_pairs=32,
                n_sft_examples=128,
            ),
            sft=PhaseConfig(
                n_examples=128,
                batch_size=32,
                microbatch_size=8,
                eval_every=128,
                lr=1e-3,
                optimizer="adamw",
                warmup_steps=2,
                eval_batch_size=8,
            ),
            pref=PhaseConfig(
                n_examples=64,
                batch_size=16,
                microbatch_size=4,
                eval_every=64,
                lr=1e-4,
                optimizer="adamw",
                warmup_steps=2,
                eval_batch_size=8,
            ),
            n_generation_prompts=16,
            max_new_tokens=12,
        )
    return AuxLMConfig(
        name="aux-lm",
        model=ModelConfig(TINY_GPT2, n_layer=2, n_head=2, n_embd=64),
        data=DataConfig(
            ("hh",),
            max_length=64,
            max_prompt_length=32,
            n_train_pairs=384,
            n_eval_pairs=192,
            n_sft_examples=1024,
        ),
        sft=PhaseConfig(
            n_examples=1024,
            batch_size=32,
            microbatch_size=4,
            eval_every=1024,
            lr=1e-3,
            optimizer="adamw",
            warmup_steps=5,
            eval_batch_size=4,
        ),
        pref=PhaseConfig(
            n_examples=384,
            batch_size=16,
            microbatch_size=2,
            eval_every=384,
            lr=1e-4,
            optimizer="adamw",
            warmup_steps=5,
            eval_batch_size=4,
        ),
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


@dataclass
class AuxExperiment:
    """Everything :func:`run_aux_experiment` measured.

    ``rewards[split]``: R(x, y_w), R(x, y_l) of that split's pairs; ``values``: the fitted V;
    ``extras``: the per-pair tensors the losses read; ``before``: pi_ref (the SFT model) evaluated
    like the policies; ``runs``: in the order of ``AuxLMConfig.runs``, DPO first.
    """

    cfg: AuxLMConfig
    data: ExperimentData
    rewards: dict[str, tuple[Tensor, Tensor]]
    values: PromptValues
    extras: dict[str, dict[str, Tensor]]
    before: AuxEvaluation
    runs: list[AuxRun]
    sft_final: dict[str, float]
    seconds: float


def _run_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in label.lower())


def run_aux_experiment(
    cfg: AuxLMConfig,
    out_dir: str | Path,
    reward_fn: Reward | None = None,
    reward_name: str = "readability",
    device: torch.device | None = None,
    resume: bool = True,
    progress: bool = False,
) -> AuxExperiment:
    """Data, SFT (pi_ref), rewards, V, then one preference run per loss of ``cfg``, each evaluated
    before (pi_ref, once) and after training.

    ``reward_fn`` defaults to readability, ``TextReward(tokenizer)``; it is required for the synthetic
    task, which has no tokenizer. ``reward_name`` names it in the checkpoints' identity. Checkpoints
    and metrics go under ``out_dir`` (``sft/``, one folder per run); with ``resume`` a finished run is
    not retrained.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    device = device if device is not None else default_device()
    exp = cfg.experiment()
    tokenizer, data = load_experiment_data(exp)
    if reward_fn is None:
        if tokenizer is None:
            raise ValueError(
                "the synthetic task has no text: pass reward_fn, a function of token ids"
            )
        reward_fn = TextReward(tokenizer)
    rewards = {
        "train": pair_rewards(reward_fn, data.pref_train),
        "eval": pair_rewards(reward_fn, data.pref_eval),
    }

    ref = prepare_reference(exp, data, out_dir, device, resume, progress)
    model, batch = ref.model, cfg.pref.eval_batch_size
    features = {
        split: prompt_features(model, [p.prompt for p in pairs], batch, data.pad_id, device)
        for split, pairs in (("train", data.pref_train), ("eval", data.pref_eval))
    }
    values = fit_prompt_values(
        features["train"],
        *rewards["train"],
        cfg.value_hidden_sizes,
        cfg.tau,
        cfg.value_steps,
        cfg.value_lr,
    )
    baseline = torch.cat(rewards["train"]).double().mean().item()
    values.r2_eval = values.r_squared(features["eval"], *rewards["eval"], baseline)
    extras = {
        split: aux_extras(*rewards[split], values(features[split])) for split in ("train", "eval")
    }

    prompts = generation_prompts(
        data.pref_eval, cfg.n_generation_prompts, cfg.data.max_length - cfg.max_new_tokens
    )
    evaluation = dict(
        pairs=data.pref_eval,
        reference=ref.reference["eval"],
        rewards=rewards["eval"],
        beta=cfg.beta,
        prompts=prompts,
        reward_fn=reward_fn,
        max_new_tokens=cfg.max_new_tokens,
        eos_id=data.pad_id,
        pad_id=data.pad_id,
        device=device,
        batch_size=batch,
        seed=cfg.generation_seed,
        average=ref.common["average"],
        response_only=ref.common["response_only"],
    )
    before = evaluate_aux(model, "SFT (pi_ref, before)", **evaluation)

    aux_identity = {
        "reward": reward_name,
        "alpha": cfg.alpha,
        "value": [cfg.value_hidden_sizes, cfg.value_steps, cfg.value_lr, cfg.tau],
    }
    runs = []
    for label, loss, pref in cfg.runs():
        policy = copy.deepcopy(model)
        phase = PreferencePhase(loss, cfg.beta, ref.reference, extras=extras, **ref.common)
        run_dir = out_dir / _run_name(label)
        identity = {
            **ref.identity,
            "pref": dataclasses.asdict(pref),
            "loss": repr(loss),
            "beta": cfg.beta,
            "aux": aux_identity,
        }
        final = train(
            policy,
            phase,
            data.pref_train,
            data.pref_eval,
            pref,
            run_dir,
            device,
            resume,
            progress,
            desc=label,
            identity=identity,
        )
        evaluated = evaluate_aux(policy, label, **evaluation)
        runs.append(
            AuxRun(label, loss, pref.seed, final, read_metrics(run_dir / METRICS), evaluated)
        )
        del policy
    return AuxExperiment(
        cfg, data, rewards, values, extras, before, runs, ref.sft_final, time.perf_counter() - t0
    )


def dpo_baseline(runs: Sequence[AuxRun], run: AuxRun) -> AuxRun | None:
    """What ``run`` is compared with: DPO of the same seed; for DPO of a later seed, DPO of the first
    seed (their difference is training noise); None for the first DPO run."""
    dpo = [r for r in runs if r.is_dpo]
    if run.is_dpo:
        return None if run is dpo[0] else dpo[0]
    return next(r for r in dpo if r.seed == run.seed)


def format_before_after(before: AuxEvaluation, runs: Sequence[AuxRun]) -> str:
    """A markdown table: each model's preference accuracy, auxiliary-ranking accuracy and mean R of
    its samples (mean +- one standard error), and the change of each against its DPO baseline
    (:func:`dpo_baseline`), paired over the same pairs / prompts (+- the standard error of the paired
    difference)."""

    def pm(x: Tensor) -> str:
        m, se = mean_se(x)
        return f"{m:.3f} +- {se:.3f}"

    keys = ("preference_correct", "auxiliary_correct", "generation_rewards")
    lines = [
        "| model | pref. acc. | aux-rank acc. | R of samples | len | compared with | d pref. | d aux-rank | d R |",
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
