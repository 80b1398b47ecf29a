"""upo_ref: a reference implementation of Unified Preference Optimization.

Import graph (it mirrors the maths): ``divergences`` -> ``losses`` -> ``optimal`` (policies on
finite action sets) / training -> experiments -> plots. Importing ``upo_ref`` loads only the
core maths: no downloads, no global torch settings, no printing.
"""

from .divergences import DIVERGENCE_NAMES, Divergence, get_divergence
from .losses import (
    LOSS_NAMES,
    PreferenceLoss,
    dpo_loss,
    fdpo_loss,
    h_pi,
    ipo_loss,
    iupo_loss,
    preference_metrics,
    uh_pi,
)

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCE_NAMES",
    "Divergence",
    "get_divergence",
    "LOSS_NAMES",
    "PreferenceLoss",
    "dpo_loss",
    "fdpo_loss",
    "h_pi",
    "ipo_loss",
    "iupo_loss",
    "preference_metrics",
    "uh_pi",
]
