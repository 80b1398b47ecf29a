r"""The preference datasets of Azar et al.'s bandit experiment (``upo_ref.experiments.bandits``).

Datasets (pairs are (y_w, y_l), winner first; actions a, b, c are 0, 1, 2):

* ``D1`` = {(a, b), (b, c), (a, c)}: a total order a > b > c.
* ``D3`` = {(a, b), (b, a)}: a and b tied; c never observed.

:func:`preference_population` builds the population of labelled pairs of a preference matrix.
The choice of 0-indexed actions and the uniform pi_ref follow Azar et al.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ACTION_NAMES", "PreferenceData", "preference_population", "D1", "D3", "BANDIT_DATASETS"]

ACTION_NAMES = ("a", "b", "c")


@dataclass(frozen=True)
class PreferenceData:
    """A finite preference dataset on ``n_actions`` actions: pairs (y_w, y_l) and how often each is
    drawn.

    Attributes:
        name: e.g. ``"D1"``.
        pairs: ((y_w, y_l), ...), action indices, winner first.
        n_actions: K.
        weights: the probability of drawing each pair (normalised here), or None for uniform.
    """

    name: str
    pairs: tuple[tuple[int, int], ...]
    n_actions: int = 3
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if not self.pairs:
            raise ValueError(f"{self.name}: a dataset needs at least one pair")
        for y_w, y_l in self.pairs:
            if not (0 <= y_w < self.n_actions and 0 <= y_l < self.n_actions) or y_w == y_l:
                raise ValueError(
                    f"{self.name}: pair ({y_w}, {y_l}) must name two different actions in "
                    f"0..{self.n_actions - 1}"
                )
        if self.weights is not None and (
            len(self.weights) != len(self.pairs) or min(self.weights) < 0 or sum(self.weights) <= 0
        ):
            raise ValueError(
                f"{self.name}: weights must be {len(self.pairs)} non-negative numbers with a "
                "positive sum"
            )

    @property
    def winners(self) -> Tensor:
        """(N,) int64: y_w of each pair."""
        return torch.tensor([w for w, _ in self.pairs], dtype=torch.int64)

    @property
    def losers(self) -> Tensor:
        """(N,) int64: y_l of each pair."""
        return torch.tensor([y_l for _, y_l in self.pairs], dtype=torch.int64)

    @property
    def probabilities(self) -> Tensor:
        """(N,) float64: the probability of drawing each pair (uniform when ``weights`` is None)."""
        n = len(self.pairs)
        w = (
            torch.ones(n, dtype=torch.float64)
            if self.weights is None
            else torch.tensor(self.weights, dtype=torch.float64)
        )
        return w / w.sum()


def preference_population(
    P: Tensor, mu: Tensor | None = None, name: str = "population"
) -> PreferenceData:
    r"""Every ordered pair (i, j), i != j, labelled i > j, weighted mu(i) mu(j) P[i, j].

    This is the population of labelled pairs when (y, y') ~ mu x mu and y wins with probability
    P[y, y'] (pairs of an action with itself carry no preference and are left out). P: (K, K) with
    P + P^T = 1; mu: (K,), uniform by default.
    """
    k = P.shape[0]
    mu = torch.full((k,), 1.0 / k, dtype=torch.float64) if mu is None else mu
    pairs = tuple((i, j) for i in range(k) for j in range(k) if i != j)
    weights = tuple((mu[i] * mu[j] * P[i, j]).item() for i, j in pairs)
    return PreferenceData(name, pairs, n_actions=k, weights=weights)


D1 = PreferenceData("D1", ((0, 1), (1, 2), (0, 2)))
D3 = PreferenceData("D3", ((0, 1), (1, 0)))
BANDIT_DATASETS = {"D1": D1, "D3": D3}


def uniform(k: int) -> Tensor:
    return torch.full((k,), 1.0 / k, dtype=torch.float64)
