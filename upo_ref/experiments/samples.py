r"""One grid repeated on other training samples: how far a final accuracy moves between samples.

A binomial standard error sqrt(p (1 - p) / n) says how far an accuracy measured on n eval pairs
would move with another draw of *eval* pairs. It says nothing about another draw of *training*
pairs: a run that learnt from a lucky sample of 2,048 pairs scores higher on the same eval set.
``python -m upo_ref.reproduce --preset P --data-seed N`` trains on another sample of the same
training split and scores the same eval pairs (in another order); this module sets the S grids
side by side. For each run that every grid has, and for each paired comparison of two such runs,
it gives the S values, their mean, their standard deviation s between samples (Bessel's S - 1),
the standard error of the mean s / sqrt(S) and its Student-t 95% interval
(``utils.stats.mean_interval``: with S = 3 the quantile is 4.30, not 1.96), beside the mean of
the grids' own binomial (or paired) standard errors. A difference within one grid stays paired
(the two runs share the eval pairs and the reference); across grids only the S values are
compared, so the training sample's part of the noise is in s and nowhere else.

``python -m upo_ref.experiments.samples results/smol results/smol-seed1 ...`` prints the table
(``--write FILE`` writes it too). Grids whose configurations differ in anything but the data seed
and the runs they hold are refused, as is the same seed twice.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils.stats import binomial_se, mean_interval

__all__ = [
    "Spread",
    "read_grid",
    "data_seeds",
    "check_comparable",
    "spreads",
    "format_spreads",
    "main",
]

# What must be equal for two grids to be samples of the same experiment (the data seed and the
# runs held may differ).
_SAME = ("model", "sft", "pref", "average_logps", "precision", "trunk_precision", "cache_dtype")


@dataclass(frozen=True)
class Spread:
    """One run's final accuracy (``what = "IPO"``), or a paired difference of two runs
    (``"JS-IUPO - IPO"``), at one beta, over S grids."""

    what: str
    beta: float
    values: tuple[float, ...]  # (S,) one per grid, in the order given
    ses: tuple[float, ...]  # (S,) each grid's own standard error of its value
    mean: float
    sd: float  # between samples, Bessel's S - 1
    interval: tuple[float, float]  # Student-t 95% interval of the mean

    @property
    def is_difference(self) -> bool:
        return " - " in self.what

    @property
    def se_of_mean(self) -> float:
        return self.sd / math.sqrt(len(self.values))

    @property
    def mean_own_se(self) -> float:
        return sum(self.ses) / len(self.ses)


def read_grid(results_dir: str | Path) -> dict:
    """A finished grid's ``summary.json``, with the folder it came from under ``"dir"``."""
    path = Path(results_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: give the results folder of a finished grid (results/<preset>, or "
            "runs/<preset>-seed<N>/results)"
        )
    return {**json.loads(path.read_text(encoding="utf-8")), "dir": str(results_dir)}


def data_seeds(grids: list[dict]) -> list[int]:
    """Each grid's data seed (``DataConfig.shuffle_seed``), in the order given."""
    return [g["config"]["data"]["shuffle_seed"] for g in grids]


def check_comparable(grids: list[dict]) -> None:
    """ValueError unless the grids differ only in their data seed (each its own) and their runs."""
    if len(grids) < 2:
        raise ValueError(f"need the results of at least 2 grids, got {len(grids)}")

    def but_seed(config: dict) -> dict:
        return {k: v for k, v in config["data"].items() if k != "shuffle_seed"}

    first = grids[0]["config"]
    for g in grids[1:]:
        c = g["config"]
        differ = [k for k in _SAME if c.get(k) != first.get(k)]
        differ += ["data"] * (but_seed(c) != but_seed(first))
        if differ:
            raise ValueError(
                f"{g['dir']} and {grids[0]['dir']} differ in {differ}, not only in the data seed: "
                "they are not samples of one experiment"
            )
    seeds = data_seeds(grids)
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"two grids have the same data seed ({seeds}): the same sample twice")


def _spread(what: str, beta: float, values: list[float], ses: list[float]) -> Spread:
    x = torch.tensor(values, dtype=torch.float64)  # (S,)
    mean, lo, hi = mean_interval(x, dim=0)
    sd = float(x.std(correction=1))
    return Spread(what, beta, tuple(values), tuple(ses), float(mean), sd, (float(lo), float(hi)))


def _union(tables: list[dict]) -> list:
    """The keys of all the dicts, each once, in the order first seen."""
    return list(dict.fromkeys(k for t in tables for k in t))


def spreads(grids: list[dict]) -> tuple[list[Spread], list[str]]:
    """(the spreads of every run and every paired comparison that all grids have, the names of
    those some grid lacks: left out of the table, and said so by :func:`format_spreads`)."""
    check_comparable(grids)
    runs = [{(r["label"], r["beta"]): r for r in g["runs"]} for g in grids]
    pairs = [{(c["b"], c["a"], c["beta"]): c for c in g["paired_comparisons"]} for g in grids]
    out, missing = [], []
    for label, beta in _union(runs):
        if not all((label, beta) in r for r in runs):
            missing.append(f"{label} beta {beta:g}")
            continue
        held = [r[(label, beta)] for r in runs]
        acc = [h["final"]["rewards/accuracies"] for h in held]
        ses = [binomial_se(a, h["n_eval_pairs"]) for a, h in zip(acc, held, strict=True)]
        out.append(_spread(label, beta, acc, ses))
    for b, a, beta in _union(pairs):
        if not all((b, a, beta) in p for p in pairs):
            missing.append(f"{b} - {a} beta {beta:g}")
            continue
        held = [p[(b, a, beta)] for p in pairs]
        out.append(_spread(f"{b} - {a}", beta, [h["diff"] for h in held], [h["se"] for h in held]))
    return out, missing


def format_spreads(grids: list[dict], table: list[Spread], missing: list[str]) -> str:
    """The markdown table of :func:`spreads`."""
    seeds = ", ".join(map(str, data_seeds(grids)))
    lines = [
        f"Final eval accuracy over {len(grids)} training samples (data seeds {seeds}; "
        "`python -m upo_ref.experiments.samples`):",
        "",
        "| run | beta | per sample | mean | sd between samples | SE of the mean (95% t "
        "interval) | mean own SE |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for s in table:
        fmt = "{:+.4f}" if s.is_difference else "{:.4f}"  # a difference carries its sign
        vals = ", ".join(fmt.format(v) for v in s.values)
        lines.append(
            f"| {s.what} | {s.beta:g} | {vals} | {fmt.format(s.mean)} | {s.sd:.4f} | "
            f"{s.se_of_mean:.4f} ({fmt.format(s.interval[0])}, {fmt.format(s.interval[1])}) | "
            f"{s.mean_own_se:.4f} |"
        )
    lines += [
        "",
        "Own SE: each grid's binomial standard error of an accuracy, or paired standard error of a "
        "difference, over its eval pairs.",
    ]
    if missing:
        lines.append(f"Not in every grid, so not compared: {', '.join(missing)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        prog="python -m upo_ref.experiments.samples",
        description="one grid's final accuracies over several training samples "
        "(reproduce --data-seed N)",
    )
    p.add_argument("results", nargs="+", help="results folders of finished grids (summary.json)")
    p.add_argument("--write", metavar="FILE", help="also write the table to FILE (markdown)")
    args = p.parse_args(argv)
    try:
        grids = [read_grid(d) for d in args.results]
        table, missing = spreads(grids)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    text = format_spreads(grids, table, missing)
    if args.write:
        Path(args.write).write_text(text + "\n", encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
