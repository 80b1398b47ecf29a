r"""The value network V(x) of auxiliary-objective UPO on a language model, fitted once.

V(x) reads the reference (SFT) model's last-layer hidden state at the last prompt token
(:func:`prompt_features`) and is fitted by least squares to the rewards of both responses of every
training pair (:func:`fit_prompt_values`), before policy training. A = R - V is then a fixed number
per response, so a UPO training step costs what a DPO step costs. (A reconstruction: the value
network's input, a linear head on the frozen reference model, and fitting V once rather than
alongside the policy, which loses nothing offline since A does not depend on the policy.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..lm.phases import autocast
from ..lm.tokenize import collate_sequences
from .losses import WEIGHT_CAP, advantage_weights, advantages
from .value_network import ValueNetwork, fit_value_network, last_token_pool

__all__ = ["prompt_features", "PromptValues", "fit_prompt_values", "weight_statistics"]


@torch.no_grad()
def prompt_features(
    model, prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device
) -> Tensor:
    """h(x): the model's last-layer hidden state at each prompt's last token, (N, H) float32 on the
    CPU.

    The prompts are right-padded in batches of ``batch_size``; ``last_token_pool`` picks each row's
    last real position, so the features do not depend on the padding. Eval mode, bf16 autocast on
    CUDA.
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
    """A fitted V(x): ``network`` on standardised features (``mean``, ``std`` of the training
    features), and its fit: ``losses`` per step, and R^2 of V as a predictor of R on the training
    responses and on held-out ones (``r2_train``, ``r2_eval``; 0 is no better than the training
    mean, < 0 worse)."""

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
        """1 - SSE(V) / SSE(baseline) over both responses of every pair; ``baseline`` is the
        training mean."""
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
    """Fit V(x) to R(x, y) over both responses of every pair: the 2N samples (h(x_i), R(x_i,
    y_w,i)), (h(x_i), R(x_i, y_l,i)), by ``auxiliary.fit_value_network`` (full-batch Adam on the
    expectile loss; tau = 0.5 is least squares, V(x) -> E[R | x]).

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


def weight_statistics(
    extras: dict[str, Tensor], alpha: float, cap: float = WEIGHT_CAP
) -> dict[str, float]:
    """The advantages and UPO weights of one split's 2N responses (A = R - V is fixed before
    training, so these describe the whole run): ``mean_advantage``, ``std_advantage``,
    ``mean_weight``, ``max_weight`` and ``at_cap`` (fraction of weights clamped at ``cap``)."""
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
