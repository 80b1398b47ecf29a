r"""Final eval accuracy split by which response the reference prefers.

For an eval pair let a_ref = log pi_ref(y_w|x) - log pi_ref(y_l|x), the reference's own log-ratio
of the chosen and the rejected response (not a policy/reference ratio). JS-IUPO in the paper's form
(eq. 26) uses f'_JS(e^a) = log 2 + log sigma(a) of that log-ratio, so with a the policy's

.. math:: Uh = \log\sigma(a) - \log\sigma(a_{ref}), \qquad
   \frac{\partial Uh}{\partial a} = \sigma(-a).

Where a and a_ref are far below 0, log sigma(a) = a - softplus(a) ~ a and Uh is IPO's h = a - a_ref:
JS-IUPO is IPO there. Where they are far above 0, Uh ~ e^{-a_ref} - e^{-a} and its gradient
sigma(-a) ~ e^{-a}: the pair hardly moves the policy. With summed log-probs of two different
responses |a_ref| is tens of nats, so JS-IUPO trains as IPO on the pairs the reference ranks the
wrong way (a_ref < 0) and scarcely at all on the rest (``tests/test_losses.py`` checks both
limits). A policy that learnt only "raise the response pi_ref finds less likely" is then right on
almost every pair with a_ref < 0, wrong on almost every pair with a_ref > 0, and about at chance
overall; a policy that learnt the preference is right on both. The table of
:func:`format_by_reference` tells the two apart: each run's accuracy on each half, with binomial
standard errors, and their difference (the halves are disjoint sets of pairs, so its standard
error is the unpaired one).

a_ref is recovered from a run's per-pair final evaluation (``final_eval.json``, float32):
log pi_ref(y) = log pi(y) - rewards(y) / beta, since the implicit reward is
beta log(pi(y) / pi_ref(y)) (``metrics.preference_metrics``). The reward's two float32 roundings
make the recovered log pi_ref(y) err by at most about 2.4e-7 |log(pi(y) / pi_ref(y))|, far below a
nat: no pair changes side unless |a_ref| is that small.

``python -m upo_ref.experiments.by_reference results/<preset>`` prints the table of a finished grid
from its committed metrics and writes it to ``results/<preset>/by_reference.md``; every grid run of
``python -m upo_ref.reproduce`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..utils.stats import binomial_se

__all__ = [
    "NEAR",
    "reference_log_ratios",
    "ReferenceSplit",
    "split_by_reference",
    "format_by_reference",
    "render_by_reference",
    "write_by_reference",
    "by_reference_of_results",
    "read_final_eval",
]

# |a_ref| below log(99) nats: where JS-IUPO's weight sigma(-a) at the start, a = a_ref, lies in
# (0.01, 0.99), neither IPO-like nor inert.
NEAR = math.log(99.0)


def reference_log_ratios(final: dict, beta: float) -> list[float]:
    """a_ref = log pi_ref(y_w|x) - log pi_ref(y_l|x) of every pair of a per-pair final evaluation
    (``final_eval.json``: lists ``logps/chosen``, ``logps/rejected``, ``rewards/chosen``,
    ``rewards/rejected``) of a run at ``beta``."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    keys = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")
    missing = [k for k in keys if k not in final]
    if missing:
        raise ValueError(f"the per-pair final evaluation lacks {missing}: not a preference run's")
    pc, pr, rw, rl = (final[k] for k in keys)
    if not len(pc) == len(pr) == len(rw) == len(rl):
        raise ValueError("the per-pair final evaluation's lists differ in length")
    return [(c - w / beta) - (r - x / beta) for c, r, w, x in zip(pc, pr, rw, rl, strict=True)]


@dataclass(frozen=True)
class ReferenceSplit:
    """One run's final accuracy on the pairs where pi_ref prefers the rejected response
    (a_ref < 0, ``below``) and on those where it prefers the chosen one (a_ref > 0, ``above``);
    ``n_equal`` pairs with a_ref = 0 exactly belong to neither and are counted, not dropped. The
    accuracy of an empty half is NaN."""

    label: str
    beta: float
    n_below: int
    acc_below: float
    n_above: int
    acc_above: float
    n_equal: int
    n_near: int  # pairs with |a_ref| < NEAR
    median_abs: float  # median |a_ref| over all pairs

    @property
    def se_below(self) -> float:
        return binomial_se(self.acc_below, self.n_below) if self.n_below else math.nan

    @property
    def se_above(self) -> float:
        return binomial_se(self.acc_above, self.n_above) if self.n_above else math.nan

    @property
    def difference(self) -> tuple[float, float]:
        """acc_below - acc_above and its (unpaired: disjoint pairs) standard error."""
        return self.acc_below - self.acc_above, math.hypot(self.se_below, self.se_above)


def split_by_reference(label: str, beta: float, final: dict) -> ReferenceSplit:
    """:class:`ReferenceSplit` of one run from its per-pair final evaluation; accuracy is the mean
    of ``rewards/accuracies`` (1, 1/2 on a tie, 0 per pair)."""
    a_ref = reference_log_ratios(final, beta)
    if "rewards/accuracies" not in final:
        raise ValueError("the per-pair final evaluation lacks ['rewards/accuracies']")
    correct = final["rewards/accuracies"]
    if len(correct) != len(a_ref):
        raise ValueError("the per-pair final evaluation's lists differ in length")
    if not a_ref:
        raise ValueError(f"{label} at beta {beta:g}: the per-pair final evaluation has no pairs")
    below = [c for c, a in zip(correct, a_ref, strict=True) if a < 0]
    above = [c for c, a in zip(correct, a_ref, strict=True) if a > 0]
    magnitudes = sorted(abs(a) for a in a_ref)
    m = len(magnitudes)
    median = (magnitudes[(m - 1) // 2] + magnitudes[m // 2]) / 2
    return ReferenceSplit(
        label,
        beta,
        len(below),
        _mean(below),
        len(above),
        _mean(above),
        len(a_ref) - len(below) - len(above),
        sum(x < NEAR for x in magnitudes),
        median,
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _cell(acc: float, se: float) -> str:
    return "no pairs" if math.isnan(acc) else f"{acc:.4f} +- {se:.4f}"


def format_by_reference(splits: list[ReferenceSplit]) -> str:
    """Markdown: the share of pairs on each side and near 0 (the runs share their eval pairs and
    reference: the first run's), then one row per run."""
    if not splits:
        raise ValueError("no runs to tabulate: give the split of at least one run")
    first = splits[0]
    n = first.n_below + first.n_above + first.n_equal
    lines = [
        f"a_ref = log pi_ref(y_w|x) - log pi_ref(y_l|x) over the {n} eval pairs: below 0 on "
        f"{first.n_below} ({first.n_below / n:.4f}), above 0 on {first.n_above}, exactly 0 on "
        f"{first.n_equal}; median |a_ref| {first.median_abs:.1f} nats; |a_ref| < log 99 "
        f"= {NEAR:.2f} (where JS-IUPO's weight sigma(-a_ref) is in (0.01, 0.99)) on "
        f"{first.n_near} ({first.n_near / n:.4f}).",
        "",
        "| run | beta | accuracy, pi_ref prefers y_l | accuracy, pi_ref prefers y_w | difference |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in splits:
        d, se = s.difference
        diff = "-" if math.isnan(d) else f"{d:+.4f} +- {se:.4f}"
        lines.append(
            f"| {s.label} | {s.beta:g} | {_cell(s.acc_below, s.se_below)} | "
            f"{_cell(s.acc_above, s.se_above)} | {diff} |"
        )
    lines += [
        "",
        "Accuracy +- one binomial standard error on each half; the difference's standard error is "
        "the unpaired one (the halves are disjoint). A policy that favoured whichever response "
        "pi_ref finds less likely would score near 1 on the first half and near 0 on the second.",
    ]
    return "\n".join(lines)


def render_by_reference(splits: list[ReferenceSplit]) -> str:
    """The text of ``by_reference.md``."""
    return (
        "# Final eval accuracy by the reference's preference\n\n"
        "(`python -m upo_ref.experiments.by_reference`; see `upo_ref/experiments/by_reference.py` "
        f"for why it matters for JS-IUPO.)\n\n{format_by_reference(splits)}\n"
    )


def write_by_reference(splits: list[ReferenceSplit], results_dir: Path) -> str:
    """Write ``results_dir/by_reference.md``; return its table."""
    (Path(results_dir) / "by_reference.md").write_text(
        render_by_reference(splits), encoding="utf-8"
    )
    return format_by_reference(splits)


def by_reference_of_results(results_dir: str | Path) -> list[ReferenceSplit]:
    """The splits of every run of a finished grid, from its results folder (``summary.json``,
    ``metrics/<run>.final.json``)."""
    results_dir = Path(results_dir)
    summary_path = results_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path} not found: give the results folder of a finished grid "
            f"(python -m upo_ref.reproduce ... --publish writes results/<preset>/)"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return [
        split_by_reference(
            r["label"], r["beta"], read_final_eval(results_dir, r["label"], r["beta"])
        )
        for r in summary["runs"]
    ]


def read_final_eval(results_dir: str | Path, label: str, beta: float) -> dict:
    """The per-pair final evaluation of run (label, beta) of a finished grid's results folder
    (``metrics/<run>.final.json``)."""
    from ..lm.experiment import run_name  # the pipeline's file names, imported only here

    path = Path(results_dir) / "metrics" / f"{run_name(label, beta)}.final.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the grid's per-pair final evaluation")
    return json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m upo_ref.experiments.by_reference",
        description="final eval accuracy of every run of a grid, split by the reference's "
        "preference; writes <results>/by_reference.md",
    )
    parser.add_argument("results", help="a results folder of upo_ref.reproduce (results/<preset>)")
    args = parser.parse_args()
    print(write_by_reference(by_reference_of_results(args.results), Path(args.results)))
