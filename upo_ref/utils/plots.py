"""Plot helpers shared by the notebooks: saving a figure, and a seed mean with its 95% band.

Importing this module imports matplotlib's pyplot but changes no global setting.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from torch import Tensor

from .paths import figures_dir
from .stats import mean_interval

__all__ = ["FIGURE_DPI", "save_figure", "plot_mean_band"]

FIGURE_DPI = 110


def save_figure(fig: plt.Figure, name: str) -> Path:
    """Save ``fig`` as ``figures_dir() / name`` (e.g. ``"01_f_prime.png"``) at 110 dpi; return the
    path."""
    path = figures_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight")
    return path


def plot_mean_band(
    ax: plt.Axes, steps: Tensor, x: Tensor, label: str, color=None, level: float = 0.95, **kwargs
):
    """Plot the mean over seeds of ``x`` (T, S) against ``steps`` (T,), with its ``level``
    confidence band.

    The band is the Student-t interval of :func:`upo_ref.utils.stats.mean_interval`. Returns the
    line.
    """
    mean, lo, hi = mean_interval(x, dim=1, level=level)
    (line,) = ax.plot(steps, mean, label=label, color=color, **kwargs)
    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    return line
