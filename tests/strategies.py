"""Shared hypothesis strategies and tolerances for the maths tests (float64 throughout).

Tolerances are named here so that every test says which bar it holds the code to.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from upo_ref.divergences import DIVERGENCE_NAMES, get_divergence

F64_RTOL = 1e-12  # float64 agreement between two forms of one formula
F32_RTOL = 1e-5  # float32 agreement with a high-precision reference

ADMISSIBLE_NAMES = ("reverse_kl", "forward_kl", "jensen_shannon", "alpha")


def divergence_of(name: str, alpha: float = 0.5):
    return get_divergence(name, alpha=alpha if name == "alpha" else None)


alphas = st.floats(min_value=0.02, max_value=0.98)
betas = st.floats(min_value=0.01, max_value=10.0)


@st.composite
def divergences(draw, names=DIVERGENCE_NAMES):
    name = draw(st.sampled_from(names))
    return divergence_of(name, draw(alphas))


@st.composite
def admissible_divergences(draw):
    return draw(divergences(ADMISSIBLE_NAMES))


def logp_batches(size: int | None = None, low: float = -500.0, high: float = 0.0):
    """Four float64 tensors (policy chosen, policy rejected, reference chosen, reference rejected)
    of one shape (B,)."""

    @st.composite
    def _draw(draw):
        n = size if size is not None else draw(st.integers(1, 16))
        elems = st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
        return tuple(
            torch.from_numpy(draw(arrays(np.float64, (n,), elements=elems))) for _ in range(4)
        )

    return _draw()


def dyadic_logp_batches(size: int | None = None):
    """Log-probs that are multiples of 2**-20 in [-2**10, 0]: every sum and difference of a few
    of them, and +1, is exact in float64, so identities that hold in real arithmetic hold bit
    for bit."""

    @st.composite
    def _draw(draw):
        n = size if size is not None else draw(st.integers(1, 16))
        ints = st.integers(min_value=-(2**30), max_value=0)
        return tuple(
            torch.tensor([draw(ints) * 2.0**-20 for _ in range(n)], dtype=torch.float64)
            for _ in range(4)
        )

    return _draw()
