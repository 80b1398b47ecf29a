"""The paper's Figure 1 grid: train and eval loss, eval accuracy and reward margin vs examples seen.

One column per beta, one line per loss (IPO vs JS-IUPO in the paper). Rows:

* one row per loss with that loss's own train curve (a trailing mean over ``smooth`` steps: it is
  per-batch and noisy) and eval curve (exact means over the eval set). Different losses are
  different functions of the log-ratios (IPO's starts at 1/(4 beta^2), DPO's at log 2), so each
  gets its own y-axis: their values are not comparable with each other;
* eval accuracy, with its band of +- one binomial standard error sqrt(a (1 - a) / n_eval) when the
  number of eval pairs is given: differences smaller than the band are noise;
* eval reward margin.

The accuracy and margin are DPO's implicit-reward ones (``metrics.preference_metrics``:
``rewards/*``), the same for every loss, so those lines are comparable. At step 0 the policy *is*
pi_ref, every implicit-reward margin is exactly 0 and every pair is a tie, so the accuracy is 0.5 by
the tie convention, not by measurement: the accuracy row starts at the first evaluation after step
0, with chance (0.5) drawn as a dashed line.

``python -m upo_ref.experiments.figure1 results/quick figures/figure1_quick.png`` redraws a figure
from the committed results of a run of ``python -m upo_ref.reproduce`` (``summary.json`` and
``metrics/``), without training anything.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["FIGURE_DPI", "trailing_mean", "accuracy_band", "figure1", "draw_figure1", "redraw"]

FIGURE_DPI = 110  # the notebooks' figures use the same
# (metric key, y-axis label) of the rows below the loss rows, all eval
EVAL_ROWS = (("rewards/accuracies", "eval accuracy"), ("rewards/margins", "eval reward margin"))


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """out[i] = mean(values[max(0, i-window+1) : i+1])."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def accuracy_band(accuracies: Sequence[float], n_eval: int) -> tuple[list[float], list[float]]:
    """(a - se, a + se) per point, se = sqrt(a (1 - a) / n_eval): one binomial standard error."""
    if n_eval < 1:
        raise ValueError(f"n_eval must be the number of eval pairs (>= 1), got {n_eval}")
    se = [math.sqrt(a * (1 - a) / n_eval) for a in accuracies]
    return [a - s for a, s in zip(accuracies, se, strict=True)], [
        a + s for a, s in zip(accuracies, se, strict=True)
    ]


def _curve(records, split, key):
    records = [r for r in records if r["split"] == split and key in r]
    if key == "rewards/accuracies":  # step 0: all ties, 0.5 by convention (module docstring)
        records = [r for r in records if r["examples_seen"] > 0]
    return [r["examples_seen"] for r in records], [r[key] for r in records]


def figure1(
    runs: Mapping[tuple[str, float], Sequence[dict]],
    path: str | Path,
    title: str = "",
    smooth: int | None = None,
    n_eval: int | None = None,
) -> Path:
    """Draw the grid (:func:`draw_figure1`) and save it to ``path`` (PNG at ``FIGURE_DPI``).
    Returns the path."""
    fig = draw_figure1(runs, title, smooth, n_eval)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI)
    return path


def draw_figure1(
    runs: Mapping[tuple[str, float], Sequence[dict]],
    title: str = "",
    smooth: int | None = None,
    n_eval: int | None = None,
):
    """The grid as a matplotlib ``Figure``.

    ``runs[(label, beta)]`` is a run's metric records (``train.read_metrics``): dicts with
    ``split``, ``examples_seen``, ``loss`` and the keys of ``EVAL_ROWS``. ``smooth``: the
    train-loss window in steps (default: a tenth of the run's steps). ``n_eval``: the number of
    eval pairs; with it the accuracy is drawn with its standard-error band. A loss with no run at
    a beta leaves its panel blank, saying so.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    labels = list(dict.fromkeys(label for label, _ in runs))
    betas = sorted({beta for _, beta in runs})
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    n_rows = len(labels) + len(EVAL_ROWS)
    width = max(4.2 * len(betas), 6.0)  # inches; one beta still leaves room for the title
    fig = Figure(figsize=(width, 2.4 * n_rows))
    axes = fig.subplots(n_rows, len(betas), squeeze=False, sharex="col")
    for col, beta in enumerate(betas):
        for row, label in enumerate(labels):  # one loss per row: its own y-axis
            ax, records = axes[row][col], runs.get((label, beta), ())
            if not records:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no {label} run at β = {beta:g}", ha="center", va="center",
                        transform=ax.transAxes, color="grey")  # fmt: skip
                continue
            x, y = _curve(records, "train", "loss")
            if x:
                y = trailing_mean(y, smooth or max(1, len(y) // 10))
                ax.plot(x, y, color=colors[label], alpha=0.6, label=f"{label}, train (smoothed)")
            x, y = _curve(records, "eval", "loss")
            ax.plot(x, y, color=colors[label], marker="o", ms=3, ls="--", label=f"{label}, eval")
            if col == 0:
                ax.set_ylabel(f"{label} loss")
                ax.legend(fontsize=8)
        for k, (key, ylabel) in enumerate(EVAL_ROWS):
            ax = axes[len(labels) + k][col]
            for label in labels:
                x, y = _curve(runs.get((label, beta), ()), "eval", key)
                ax.plot(x, y, color=colors[label], label=label, marker="o", ms=3)
                if key == "rewards/accuracies" and n_eval and x:
                    low, high = accuracy_band(y, n_eval)
                    ax.fill_between(x, low, high, color=colors[label], alpha=0.2, lw=0)
            if key == "rewards/accuracies":  # chance, and a y-range of at least 0.4..0.6
                ax.axhline(0.5, color="grey", ls="--", lw=1)
                low, high = ax.get_ylim()
                low, high = min(low, 0.4), max(high, 0.6)
                ax.set_ylim(low, high + 0.4 * (high - low))  # headroom: the legend sits above
                if col == 0:
                    band = " (band: +- 1 s.e.)" if n_eval else ""
                    ax.legend(
                        fontsize=8, title=f"{n_eval or '?'} eval pairs{band}", title_fontsize=8,
                        loc="upper left", ncol=2,
                    )  # fmt: skip
            if col == 0:
                ax.set_ylabel(ylabel)
        axes[0][col].set_title(f"β = {beta:g}")
        axes[-1][col].set_xlabel("examples seen")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(textwrap.fill(title, int(10 * width)))  # about 10 characters per inch
    fig.tight_layout()
    return fig


def redraw(results_dir: str | Path, path: str | Path) -> Path:
    """Redraw the figure of a finished ``python -m upo_ref.reproduce`` run from its results folder
    (``summary.json``, ``metrics/<run>.jsonl``), with the title the command gives it."""
    from ..lm.experiment import run_name  # the pipeline's folder names, imported only here

    results_dir = Path(results_dir)
    summary = json.loads((results_dir / "summary.json").read_text(encoding="utf-8"))
    runs = {}
    for r in summary["runs"]:
        name = f"{run_name(r['label'], r['beta'])}.jsonl"
        lines = (results_dir / "metrics" / name).read_text(encoding="utf-8").splitlines()
        runs[r["label"], r["beta"]] = [json.loads(line) for line in lines if line.strip()]
    n_evals = {r["n_eval_pairs"] for r in summary["runs"]}
    cfg = summary["config"]
    d, p = cfg["data"], cfg["pref"]
    title = (
        f"{' vs '.join(dict.fromkeys(r['label'] for r in summary['runs']))}, preset {cfg['name']}: "
        f"{cfg['model']['name_or_path']} on {'+'.join(d['datasets'])}, "
        f"{d['n_train_pairs'] or 'all'} train pairs, {p['n_examples']} examples per run, "
        f"{d['n_eval_pairs'] or 'all'} eval pairs"
    )
    return figure1(runs, path, title, n_eval=n_evals.pop() if len(n_evals) == 1 else None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m upo_ref.experiments.figure1")
    parser.add_argument("results", help="a results folder of upo_ref.reproduce (results/<preset>)")
    parser.add_argument("figure", help="the PNG to write (figures/figure1_<preset>.png)")
    args = parser.parse_args()
    print(redraw(args.results, args.figure))
