r"""Two grids on the same eval pairs, run by run: what changing one setting did to each run.

An ablation changes one thing of a grid (SFT first, ``smol-sft``; mean log-probs, ``smol-average``;
the number of training pairs, ``reproduce --train-pairs``) and keeps its eval pairs: the same
data settings (those that choose only training examples aside) and data seed give the same pairs
in the same order. So each run the two grids share is scored on the same pairs twice, and the
change in its final accuracy is a *paired* difference (``utils.stats.paired_difference``) of its
per-pair correctness (1, 1/2 for a tie, 0) from the grids' ``metrics/<run>.final.json``. The pairs
differ in their reference between the grids (another pi_ref), which is the point: the difference
is that of the whole recipe, each policy judged against its own reference as training judged it.

``python -m upo_ref.experiments.ablation results/smol results/smol-sft`` prints, for every run both
grids have, A's and B's accuracy and B - A with its paired standard error, and names the settings
in which the two grids differ (``--write FILE`` writes it too). Grids whose eval pairs could differ
(any data setting but those that choose only training examples, the eval set's size) are
refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.stats import binomial_se, paired_difference
from .by_reference import read_final_eval
from .grid_report import relative
from .samples import read_grid

__all__ = ["settings_changed", "check_same_eval_pairs", "ablation", "format_ablation", "main"]

# Data settings that choose training examples only (SFT's, or how many preference pairs are
# drawn: the eval pairs are drawn apart from them, tests/test_reproduce.py checks it): the eval
# pairs do not depend on them.
_TRAIN_ONLY = ("n_sft_examples", "sft_disjoint", "n_train_pairs")


# What names a grid or chooses its runs, not how a run is made.
_NOT_SETTINGS = ("name", "losses", "betas", "extra_runs")


def settings_changed(a: dict, b: dict) -> list[str]:
    """The configuration fields (``section.field``, or ``field``) in which grids a and b differ,
    besides their names and the runs they hold; a phase that one grid skips (0 examples) is named
    whole, since its other fields mean nothing there."""
    ca, cb = a["config"], b["config"]
    out = []
    for k in dict.fromkeys([*ca, *cb]):
        if k in _NOT_SETTINGS or ca.get(k) == cb.get(k):
            continue
        sections = isinstance(ca.get(k), dict) and isinstance(cb.get(k), dict)
        if sections and 0 not in (ca[k].get("n_examples"), cb[k].get("n_examples")):
            fields = dict.fromkeys([*ca[k], *cb[k]])
            out += [f"{k}.{f}" for f in fields if ca[k].get(f) != cb[k].get(f)]
        else:
            out.append(k)
    return out


def check_same_eval_pairs(a: dict, b: dict) -> None:
    """ValueError unless a and b score the same eval pairs in the same order: equal data settings
    (those that choose only training examples aside) and equal eval-set sizes."""
    differ = [s for s in settings_changed(a, b) if s.startswith("data.")]
    differ = [s for s in differ if s.removeprefix("data.") not in _TRAIN_ONLY]
    sizes = {r["n_eval_pairs"] for g in (a, b) for r in g["runs"]}
    if differ or len(sizes) != 1:
        what = differ or f"the eval-set size {sorted(sizes)}"
        raise ValueError(
            f"{a['dir']} and {b['dir']} may score other eval pairs (they differ in {what}): a "
            "paired difference needs the same pairs"
        )


def _correct(grid: dict, label: str, beta: float) -> list[float]:
    return read_final_eval(grid["dir"], label, beta)["rewards/accuracies"]


def ablation(a: dict, b: dict) -> tuple[list[dict], list[str]]:
    """(one row per run both grids have: label, beta, n, acc_a, se_a, acc_b, se_b, diff = B - A,
    its paired se; the runs only one grid has)."""
    check_same_eval_pairs(a, b)
    runs_a = [(r["label"], r["beta"]) for r in a["runs"]]
    runs_b = [(r["label"], r["beta"]) for r in b["runs"]]
    rows = []
    for label, beta in runs_a:
        if (label, beta) not in runs_b:
            continue
        ca, cb = _correct(a, label, beta), _correct(b, label, beta)
        n = len(ca)
        diff, se = paired_difference(cb, ca)
        acc_a, acc_b = sum(ca) / n, sum(cb) / n
        rows.append(
            dict(
                label=label, beta=beta, n=n, diff=diff, se=se,
                acc_a=acc_a, se_a=binomial_se(acc_a, n), acc_b=acc_b, se_b=binomial_se(acc_b, n),
            )
        )  # fmt: skip
    both = set(runs_a) & set(runs_b)
    only = [
        f"{lb} beta {bt:g}" for lb, bt in dict.fromkeys(runs_a + runs_b) if (lb, bt) not in both
    ]
    return rows, only


def format_ablation(a: dict, b: dict, rows: list[dict], only: list[str]) -> str:
    """The markdown table of :func:`ablation`."""
    changed = ", ".join(f"`{s}`" for s in settings_changed(a, b)) or "no setting"
    n = rows[0]["n"] if rows else "no"
    lines = [
        f"A = `{relative(Path(a['dir']))}`, B = `{relative(Path(b['dir']))}`; they differ in "
        f"{changed}. Final eval accuracy on the same {n} eval pairs (`python -m "
        "upo_ref.experiments.ablation`):",
        "",
        "| run | beta | A | B | B - A +- paired SE | difference / SE |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["se"]:
            z = f"{r['diff'] / r['se']:+.2f}"
        else:  # every pair's correctness changed by the same amount: none, or all alike
            z = "no pair changed" if r["diff"] == 0 else "every pair changed alike"
        lines.append(
            f"| {r['label']} | {r['beta']:g} | {r['acc_a']:.4f} +- {r['se_a']:.4f} | "
            f"{r['acc_b']:.4f} +- {r['se_b']:.4f} | {r['diff']:+.4f} +- {r['se']:.4f} | {z} |"
        )
    if only:
        lines += ["", f"In one grid only, so not compared: {', '.join(only)}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        prog="python -m upo_ref.experiments.ablation",
        description="two grids on the same eval pairs: each shared run's change in final accuracy, "
        "paired",
    )
    p.add_argument("a", help="results folder of the grid compared against (summary.json)")
    p.add_argument("b", help="results folder of the changed grid")
    p.add_argument("--write", metavar="FILE", help="also write the table to FILE (markdown)")
    args = p.parse_args(argv)
    try:
        a, b = read_grid(args.a), read_grid(args.b)
        rows, only = ablation(a, b)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    if not rows:
        p.error(f"{args.a} and {args.b} have no run in common")
    text = format_ablation(a, b, rows, only)
    if args.write:
        Path(args.write).write_text(text + "\n", encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
