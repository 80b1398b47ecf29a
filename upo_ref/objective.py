r"""The one interface through which a trainer calls a preference loss: :class:`Objective`.

A preference loss is a pure function of four per-sequence log-prob tensors of shape (B,) (policy
chosen ``pc``, policy rejected ``pr``, reference chosen ``rc``, reference rejected ``rr``) and beta,
returning per-example losses (B,). Some losses need more per pair: auxiliary-objective UPO needs the
designer rewards R(x, y_w), R(x, y_l) and the value V(x) of every pair. An objective says so by
name, in ``extra_keys``, and receives them in ``extras`` ({name: (B,)}); it also names the
divergence of its implicit reward (for the ``scores/*`` metrics) and may add per-example metrics.

* :class:`PreferenceObjective` adapts a plain loss (``losses.PreferenceLoss``, or any callable
  ``(pc, pr, rc, rr, beta) -> (B,)``): no extras, no metrics of its own.
* ``upo_ref.auxiliary.objectives`` has the auxiliary ones (UPO-DPO, MODPO, KTO and UPO-KTO).

:func:`as_objective` turns what a user passes into an :class:`Objective`, and :func:`check_extras`
checks, once where the extras enter, that every split carries each name the objective needs with
one value per pair.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from .divergences import Divergence
from .losses import PreferenceLoss

__all__ = ["Objective", "PreferenceObjective", "as_objective", "check_extras"]


@runtime_checkable
class Objective(Protocol):
    """A preference loss as a trainer calls it.

    ``label``: a short display name. ``extra_keys``: the per-pair inputs it reads from ``extras``,
    each (B,). ``divergence``: the f of its implicit reward model, None for reverse KL (DPO, IPO and
    the losses built on DPO).
    """

    label: str
    extra_keys: tuple[str, ...]
    divergence: Divergence | None

    def losses(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, extras: Mapping
    ) -> Tensor:
        """Per-pair losses (B,) from the log-probs (B,) each and ``extras`` {name: (B,)}."""
        ...

    def metrics(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, extras: Mapping
    ) -> dict[str, Tensor]:
        """Per-pair metrics of its own, {name: (B,)}; called without gradients."""
        ...


@dataclass(frozen=True)
class PreferenceObjective:
    """A plain preference loss ``loss(pc, pr, rc, rr, beta) -> (B,)`` as an :class:`Objective`."""

    loss: Callable[..., Tensor]
    divergence: Divergence | None = None
    label: str = "preference loss"
    extra_keys: tuple[str, ...] = ()

    def losses(self, pc, pr, rc, rr, beta, extras: Mapping) -> Tensor:
        return self.loss(pc, pr, rc, rr, beta)  # (B,)

    def metrics(self, pc, pr, rc, rr, beta, extras: Mapping) -> dict[str, Tensor]:
        return {}


def as_objective(loss) -> Objective:
    """``loss`` as an :class:`Objective`: an objective as it is, a ``PreferenceLoss`` with its
    divergence and label, any other callable ``(pc, pr, rc, rr, beta) -> (B,)`` with neither."""
    if isinstance(loss, Objective):
        return loss
    if isinstance(loss, PreferenceLoss):
        return PreferenceObjective(loss, loss.divergence, loss.label)
    if callable(loss):
        return PreferenceObjective(loss)
    raise ValueError(
        "the loss must be an Objective (upo_ref.objective), a losses.PreferenceLoss or a callable "
        f"(pc, pr, rc, rr, beta) -> (B,), got {type(loss).__name__}"
    )


def check_extras(
    objective: Objective, extras: Mapping[str, Mapping[str, Tensor]], n_pairs: Mapping[str, int]
) -> None:
    """Raise ValueError unless ``extras[split]`` holds every one of ``objective.extra_keys`` as a
    tensor of shape (n_pairs[split],), for every split of ``n_pairs``."""
    for split, n in n_pairs.items():
        given = extras.get(split, {})
        missing = [k for k in objective.extra_keys if k not in given]
        if missing:
            raise ValueError(
                f"{objective.label} needs the per-pair inputs {list(objective.extra_keys)}, but "
                f"the {split!r} extras have no {missing}: pass "
                f"extras={{split: {{name: (N,) tensor}}}} for every split (for UPO, "
                "auxiliary.objectives.aux_extras builds them)"
            )
        for k in objective.extra_keys:
            shape = tuple(getattr(given[k], "shape", ()))
            if not isinstance(given[k], Tensor) or shape != (n,):
                raise ValueError(
                    f"extras[{split!r}][{k!r}] must be a tensor of shape ({n},), one value per "
                    f"{split} pair, got {type(given[k]).__name__} of shape {shape}"
                )
