"""The paper's Figure 1 grid: train loss, eval loss, eval accuracy, eval reward margin vs examples seen.

One column per beta, one row per quantity, one line per loss (IPO vs JS-IUPO in the paper). The
accuracy and margin are DPO's implicit-reward ones (``losses.preference_metrics``: ``rewards/*``),
the same for every loss, so the lines are comparable. The train loss is a trailing mean over
``smooth`` steps (it is per-batch and noisy); the eval curves are exact means over the eval set.

At step 0 the policy *is* pi_ref, every implicit-reward margin is exactly 0 and the (strict)
accuracy is 0 by convention, not by measurement: the accuracy row therefore starts at the first
evaluation after step 0, with chance (0.5) drawn as a dashed line.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ROWS", "FIGURE_DPI", "trailing_mean", "figure1"]

FIGURE_DPI = 110  # the notebooks' figures use the same

# (metric key, split, y-axis label)
ROWS = (
    ("loss", "train", "train loss"),
    ("loss", "eval", "eval loss"),
    ("rewards/accuracies", "eval", "eval accuracy"),
    ("rewards/margins", "eval", "eval reward margin"),
)


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """out[i] = mean(values[max(0, i-window+1) : i+1])."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def figure1(
    runs: Mapping[tuple[str, float], Sequence[dict]],
    path: str | Path,
    title: str = "",
    smooth: int | None = None,
) -> Path:
    """Draw the grid and save it to ``path`` (PNG at ``FIGURE_DPI``). Returns the path.

    ``runs[(label, beta)]`` is a run's metric records (``train.read_metrics``): dicts with
    ``split``, ``examples_seen`` and the metrics of ``ROWS``. ``smooth``: the train-loss window in
    steps (default: a tenth of the run's steps).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    labels = list(dict.fromkeys(label for label, _ in runs))
    betas = sorted({beta for _, beta in runs})
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    width = max(4.2 * len(betas), 6.0)  # inches; one beta still leaves room for the title
    fig = Figure(figsize=(width, 2.6 * len(ROWS)))
    axes = fig.subplots(len(ROWS), len(betas), squeeze=False)
    for col, beta in enumerate(betas):
        for row, (key, split, ylabel) in enumerate(ROWS):
            ax = axes[row][col]
            for label in labels:
                records = [
                    r for r in runs.get((label, beta), ()) if r["split"] == split and key in r
                ]
                if key == "rewards/accuracies":
                    records = [r for r in records if r["examples_seen"] > 0]
                if not records:
                    continue
                x = [r["examples_seen"] for r in records]
                y = [r[key] for r in records]
                if split == "train":
                    y = trailing_mean(y, smooth or max(1, len(y) // 10))
                ax.plot(
                    x,
                    y,
                    color=colors[label],
                    label=label,
                    marker="o" if split == "eval" else None,
                    ms=3,
                )
            if (
                key == "rewards/accuracies"
            ):  # chance, and a y-range of at least 0.4..0.6 so noise looks like noise
                ax.axhline(0.5, color="grey", ls="--", lw=1)
                low, high = ax.get_ylim()
                ax.set_ylim(min(low, 0.4), max(high, 0.6))
            if row == 0:
                ax.set_title(f"β = {beta:g}")
            if row == len(ROWS) - 1:
                ax.set_xlabel("examples seen")
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    if title:
        fig.suptitle(textwrap.fill(title, int(10 * width)))  # about 10 characters per inch
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI)
    return path
