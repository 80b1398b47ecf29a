"""upo_ref: a reference implementation of Unified Preference Optimization.

Layers, each importing only from those before it: the mathematics at the top of the package
(``divergences`` -> ``losses`` and ``metrics`` -> ``optimal``, with ``checks`` and the
``objective`` interface); ``utils`` (standard errors,
paths, plot styling); ``lm`` (the language-model pipeline); ``auxiliary`` (auxiliary-objective
UPO) and ``experiments``; the commands ``reproduce``, ``overlap`` and ``bench``. Importing
``upo_ref`` loads only the mathematics: no downloads, no global torch settings, no printing.
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
    uh_pi,
)
from .metrics import preference_metrics

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
