r"""The value network V_theta(x) of auxiliary-objective UPO and its expectile-regression fit (IQL).

A = R - V_theta(x) is the advantage of a response; V is fitted to the offline (x, R) data by
expectile regression (:func:`expectile_loss`; tau = 0.5 is least squares, V = E_mu[R | x], the
advantage baseline of AWR). A reconstruction, as ``upo_ref.auxiliary.losses`` explains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .checks import check_all_finite, check_tau, check_vectors

__all__ = ["expectile_loss", "ValueNetwork", "fit_value_network", "last_token_pool"]


def expectile_loss(values: Tensor, targets: Tensor, tau: float) -> Tensor:
    r"""Expectile regression (IQL, Kostrikov et al. 2021): L_tau(u) = |tau - 1(u < 0)| u^2, u = R -
    V. (B,)

    ``values`` V(x) (B,) are trained towards ``targets`` R(x, y) (B,). tau = 0.5 gives half the
    squared error, whose minimiser is the mean; tau > 0.5 penalises V < R more, so the minimiser
    (the tau-expectile of R) rises with tau towards max R; tau < 0.5 moves it towards min R.
    """
    tau = check_tau(tau)
    check_vectors(values, targets, names=("values", "targets"))
    u = targets - values
    weight = torch.abs(tau - (u < 0).to(u.dtype))  # |tau - 1(u < 0)|, in u's dtype
    return weight * u.square()


class ValueNetwork(nn.Module):
    """V_theta(x): a small MLP from a fixed prompt feature vector (B, in_features) to a value (B,).

    ``hidden_sizes=()`` makes it a linear head, e.g. on the reference model's pooled hidden state
    (:func:`last_token_pool`) for a language model. Tanh hidden units; the last layer starts at
    zero, so V = 0 and A = R before training.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int] = (64,),
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(
                f"in_features must be a positive int (the feature size), got {in_features!r}"
            )
        sizes = [in_features, *hidden_sizes]
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive ints, got {tuple(hidden_sizes)!r}")
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b, dtype=dtype), nn.Tanh()]
        out = nn.Linear(sizes[-1], 1, dtype=dtype)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        self.in_features = in_features

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape (B, {self.in_features}), got {tuple(features.shape)}"
            )
        return self.net(features).squeeze(-1)  # (B, 1) -> (B,)


def fit_value_network(
    value_network: ValueNetwork,
    features: Tensor,
    rewards: Tensor,
    tau: float = 0.5,
    steps: int = 500,
    lr: float = 1e-2,
) -> list[float]:
    """Fit V on offline (x, R) data by full-batch Adam on the mean expectile loss; returns the loss
    per step.

    ``features`` (N, in_features) holds each response's prompt features, ``rewards`` (N,) its
    reward. In place; deterministic given the network's initial weights.
    """
    check_tau(tau)
    if features.dim() != 2 or features.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"features (N, d) and rewards (N,) disagree: {tuple(features.shape)} vs "
            f"{tuple(rewards.shape)}"
        )
    check_all_finite(features, "features")
    check_vectors(rewards, names=("rewards",))
    optimiser = torch.optim.Adam(value_network.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = expectile_loss(value_network(features), rewards, tau).mean()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    return history


def last_token_pool(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """The hidden state of each sequence's last non-padding token: (B, T, H), (B, T) -> (B, H).

    The value head's input for a language model: V(x) reads the reference model's state after the
    prompt. Right padding assumed (mask = 1 then 0); a row with no token raises.
    """
    if hidden_states.dim() != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            "hidden_states must be (B, T, H) and attention_mask (B, T); got "
            f"{tuple(hidden_states.shape)} and {tuple(attention_mask.shape)}"
        )
    lengths = attention_mask.sum(dim=1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError(
            "attention_mask has a row with no token; every prompt needs at least one token"
        )
    index = (lengths - 1).long()  # (B,)
    return hidden_states[torch.arange(hidden_states.shape[0], device=index.device), index]  # (B, H)
