"""Input checks shared by the losses: each raises a ValueError that names the argument and the fix.

The losses are pure tensor functions, so these checks are the only thing standing between a
NaN from an upstream overflow and a silently NaN training curve. They cost one reduction per
argument, which ``python -m upo_ref.bench losses`` includes in every timing it prints.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

LOGP_NAMES = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
)


def check_beta(beta: float, name: str = "beta") -> float:
    """beta must be a positive finite real number; returns it as a float."""
    if isinstance(beta, Tensor):
        if beta.numel() != 1:
            raise ValueError(
                f"{name} must be a single number, got a tensor of shape {tuple(beta.shape)}"
            )
        beta = beta.item()
    if (
        isinstance(beta, bool)
        or not isinstance(beta, numbers.Real)
        or not math.isfinite(beta)
        or beta <= 0
    ):
        raise ValueError(
            f"{name} must be a positive finite number (the regularisation strength), got {beta!r}; "
            f"the paper's experiments use 0.1, 0.2 and 0.5"
        )
    return float(beta)


def check_finite(x: Tensor, name: str) -> None:
    """Raise if x holds NaN or +-inf, naming the first bad position."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        first = tuple(bad[0].tolist())
        raise ValueError(
            f"{name} has {bad.shape[0]} non-finite value(s), the first {x[first].item()!r} at "
            f"index {first if len(first) > 1 else first[0]}; log-probs must be finite: look for a "
            "-inf from a token of probability 0 or a NaN/inf from an overflow upstream (nothing "
            "is clipped here)"
        )


def check_logps(*logps: Tensor, names: tuple[str, ...] = LOGP_NAMES) -> None:
    """The log-prob arguments of a loss: floating tensors of one shape (B,), all finite."""
    first = logps[0]
    for x, name in zip(logps, names, strict=False):  # names may list more than are given
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B,), got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 1:
            raise ValueError(
                f"{name} must be 1-D of shape (B,) (one summed log-prob per sequence), got "
                f"shape {tuple(x.shape)}"
            )
        if x.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {names[0]} has shape {tuple(first.shape)}: "
                f"the log-prob tensors must all have the same shape (B,)"
            )
        if x.dtype != first.dtype:
            raise ValueError(
                f"{name} has dtype {x.dtype} but {names[0]} has {first.dtype}: cast them to "
                "one dtype"
            )
        check_finite(x, name)
