"""Input checks of the auxiliary-objective losses, for the arguments ``upo_ref.checks`` does not
cover (temperatures, expectiles, rewards, values, masks): each raises a ValueError that names the
argument and what it should be."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "WEIGHT_CAP",
    "check_number",
    "check_alpha",
    "check_cap",
    "check_tau",
    "check_vectors",
    "check_all_finite",
    "check_mask",
]

# The largest weight one example can get, relative to an example with A = 0. IQL's code clamps
# exp(A / alpha) at 100 for the same reason: one high-advantage sample (or one outlier reward)
# must not dominate a batch. The clamp acts on the exponent (A / alpha <= log 100), so the weight is
# finite for every advantage, +-1e30 included and in float32, where exp overflows above 88.7.
WEIGHT_CAP = 100.0


def check_number(value: float, name: str, what: str, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``); returns it as a float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound} ({what}), got {value!r}")
    return float(value)


def check_alpha(alpha: float) -> float:
    return check_number(
        alpha, "alpha", "the temperature of the advantage weights exp(A / alpha), e.g. 1.0"
    )


def check_cap(cap: float) -> float:
    return check_number(
        cap,
        "cap",
        "the largest weight; without one exp(A / alpha) overflows, default WEIGHT_CAP = "
        f"{WEIGHT_CAP:g}",
    )


def check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 < tau < 1.0:
        raise ValueError(
            "tau must be a number strictly between 0 and 1 (the expectile; 0.5 is least squares), "
            f"got {tau!r}"
        )
    return float(tau)


def check_vectors(*tensors: Tensor, names: tuple[str, ...], finite: bool = True) -> None:
    """Rewards, values, advantages: 1-D floating tensors of one shape (B,) and dtype; finite, or
    with ``finite=False`` at least not NaN (an advantage of +-inf still has a finite weight)."""
    first = tensors[0]
    for x, name in zip(tensors, names, strict=True):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 1:
            got = (
                f"shape {tuple(x.shape)}, dtype {x.dtype}"
                if isinstance(x, Tensor)
                else type(x).__name__
            )
            raise ValueError(
                f"{name} must be a 1-D floating-point torch.Tensor of shape (B,), got {got}"
            )
        if x.shape != first.shape or x.dtype != first.dtype:
            raise ValueError(
                f"{name} is {tuple(x.shape)} {x.dtype} but {names[0]} is {tuple(first.shape)} "
                f"{first.dtype}: they must have one shape (B,) and one dtype"
            )
        bad = ~torch.isfinite(x) if finite else torch.isnan(x)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name} has {int(bad.sum())} {'non-finite' if finite else 'NaN'} value(s), the "
                f"first {x[i].item()!r} at index {i}; look for a reward model or value network "
                "that overflowed"
            )


def check_all_finite(x: Tensor, name: str) -> None:
    """Any-shape tensor of rewards or features: finite everywhere."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} has {int((~torch.isfinite(x)).sum())} non-finite value(s); rewards and "
            "features must be finite"
        )


def check_mask(mask: Tensor, like: Tensor, name: str) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"{name} must be a torch.bool tensor of shape (B,) (True = desirable), got "
            f"{type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}"
        )
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the log-probs have shape {tuple(like.shape)}"
        )
