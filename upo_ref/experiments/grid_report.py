"""The written results of a preference grid (``python -m upo_ref.reproduce``): the Figure-1 grid,
a table of every run's final eval metrics, the paired differences of runs at the same beta, the
time split, and copies of the metrics.

The table gives each run's final eval accuracy with its binomial standard error and, for every two
runs at the same beta, the difference of their accuracies with its *paired* standard error
(``utils.stats.paired_difference``, from each pair's correctness under both final policies, the
runs' ``final_eval.json``): the runs share the eval pairs and the reference, so most pairs are
ranked alike by both and the unpaired error overstates the noise of the difference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..lm.experiment import RunResult
from ..lm.runfiles import read_metrics
from ..lm.train import FINAL_EVAL
from ..utils.paths import REPO_ROOT
from ..utils.stats import binomial_se, paired_difference
from .by_reference import split_by_reference, write_by_reference
from .figure1 import figure1

__all__ = [
    "format_table",
    "read_final_evals",
    "paired_comparisons",
    "format_comparisons",
    "time_split",
    "write_outputs",
]


def format_table(
    results: list[RunResult], sft_final: dict[str, float], n_eval: int | None = None
) -> str:
    """Markdown table of the final eval metrics of each run.

    With ``n_eval`` (the number of eval pairs) the accuracy carries its binomial standard error
    sqrt(a (1 - a) / n_eval), so that a reader can tell an accuracy from chance (0.5).
    """
    lines = [
        "| run | beta | eval accuracy | eval reward margin | eval loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        f = r.final
        acc = f["rewards/accuracies"]
        se = "" if n_eval is None else f" +- {binomial_se(acc, n_eval):.4f}"
        lines.append(
            f"| {r.label} | {r.beta:g} | {acc:.4f}{se} | {f['rewards/margins']:.4f} | "
            f"{f['loss']:.4f} |"
        )
    if n_eval is not None:
        lines += ["", f"Accuracy +- one binomial standard error over the {n_eval} eval pairs."]
    if sft_final:
        lines.append("")
        lines.append(
            f"SFT model (pi_ref): eval NLL {sft_final['nll_per_token']:.4f} nats/token, "
            f"{sft_final['loss']:.2f} nats/response."
        )
    return "\n".join(lines)


def read_final_evals(results: list[RunResult]) -> dict[str, dict]:
    """Each run's per-pair final evaluation (``final_eval.json``, beside its metrics) by name."""
    return {
        r.name: json.loads((r.metrics_path.parent / FINAL_EVAL).read_text(encoding="utf-8"))
        for r in results
    }


def paired_comparisons(results: list[RunResult], finals: dict[str, dict]) -> list[dict]:
    """Every two runs at the same beta: accuracy of the later minus the earlier, its paired SE and
    the unpaired SE for contrast, from the runs' per-pair final evaluations (``finals``, as
    :func:`read_final_evals` gives them)."""
    # (N,) per run: 1, 1/2 (a tie) or 0 per eval pair
    correct = {r.name: finals[r.name]["rewards/accuracies"] for r in results}
    rows = []
    for i, a in enumerate(results):
        for b in results[i + 1 :]:
            if a.beta != b.beta:
                continue
            diff, se = paired_difference(correct[b.name], correct[a.name])
            n = len(correct[a.name])
            acc_a, acc_b = (sum(correct[x.name]) / n for x in (a, b))
            unpaired = (binomial_se(acc_a, n) ** 2 + binomial_se(acc_b, n) ** 2) ** 0.5
            rows.append(
                dict(a=a.label, b=b.label, beta=a.beta, n=n, diff=diff, se=se, unpaired_se=unpaired)
            )
    return rows


def format_comparisons(rows: list[dict]) -> str:
    """Markdown table of :func:`paired_comparisons`."""
    lines = [
        "| comparison | beta | accuracy difference +- paired SE | difference / SE | unpaired SE |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for c in rows:
        z = c["diff"] / c["se"] if c["se"] else float("nan")
        lines.append(
            f"| {c['b']} - {c['a']} | {c['beta']:g} | {c['diff']:+.4f} +- {c['se']:.4f} | "
            f"{z:+.2f} | {c['unpaired_se']:.4f} |"
        )
    return "\n".join(lines)


def time_split(results: list[RunResult], timings: dict[str, float]) -> dict[str, float]:
    """Seconds spent on the trunk cache, the reference log-probs, training steps and evaluations
    (the last two summed over runs from their metrics)."""
    train_s = eval_s = 0.0
    for r in results:
        for rec in read_metrics(r.metrics_path):
            if rec["split"] == "eval":
                eval_s += rec.get("time/eval_s", 0.0)
            else:
                train_s += rec.get("time/step_s", 0.0)
    return {**timings, "training_s": train_s, "evaluation_s": eval_s}


def write_outputs(
    cfg,
    results,
    sft_final,
    timings,
    out_dir: Path,
    results_dir: Path,
    figure_path: Path,
    command: str,
    wall_s: float,
) -> str:
    """Write the figure, ``summary.json``, ``summary.md``, ``by_reference.md`` (the final accuracy
    split by pi_ref's preference, ``experiments.by_reference``) and the metrics copies; return the
    tables (and the time split) as printed."""
    n_evals = {r.n_eval for r in results}
    n_eval = n_evals.pop() if len(n_evals) == 1 else None
    table = format_table(results, sft_final, n_eval)
    finals = read_final_evals(results)
    comparisons = paired_comparisons(results, finals)
    split = time_split(results, timings)
    runs = {(r.label, r.beta): read_metrics(r.metrics_path) for r in results}
    labels = " vs ".join(dict.fromkeys(r.label for r in results))
    d, p = cfg.data, cfg.pref
    title = (
        f"{labels}, preset {cfg.name}: {cfg.model.name_or_path} on {'+'.join(d.datasets)}, "
        f"{d.n_train_pairs or 'all'} train pairs, {p.n_examples} examples per run, "
        f"{d.n_eval_pairs or 'all'} eval pairs"
    )
    figure1(runs, figure_path, title=title, n_eval=n_eval)
    (results_dir / "metrics").mkdir(parents=True, exist_ok=True)
    if cfg.sft.n_examples:
        shutil.copyfile(out_dir / "sft" / "metrics.jsonl", results_dir / "metrics" / "sft.jsonl")
    for r in results:
        shutil.copyfile(r.metrics_path, results_dir / "metrics" / f"{r.name}.jsonl")
        shutil.copyfile(
            r.metrics_path.parent / FINAL_EVAL, results_dir / "metrics" / f"{r.name}.final.json"
        )
    splits = [split_by_reference(r.label, r.beta, finals[r.name]) for r in results]
    write_by_reference(splits, results_dir)
    summary = {
        "command": command,
        "wall_seconds": round(wall_s, 1),
        "seconds": {k: round(v, 1) for k, v in split.items()},
        "config": cfg.to_dict(),
        "sft_final": sft_final,
        "runs": [
            {"label": r.label, "beta": r.beta, "n_eval_pairs": r.n_eval, "final": r.final}
            for r in results
        ],
        "paired_comparisons": comparisons,
    }
    (results_dir / "summary.json").write_text(
        json.dumps(summary, indent=1) + "\n", encoding="utf-8"
    )

    def minutes(keys) -> str:
        return ", ".join(f"{k.removesuffix('_s')} {split[k] / 60:.1f} min" for k in keys)

    times, here, own = minutes(split), minutes(timings), minutes(("training_s", "evaluation_s"))
    (results_dir / "summary.md").write_text(
        f"# Results of preset `{cfg.name}`\n\nCommand: `{command}`  \nWall time: "
        f"{wall_s / 60:.1f} min (in this command: {here}); the runs' own {own}, from their "
        "metrics (a run an earlier command finished counts that command's time)  \n"
        f"Figure: `{relative(figure_path)}`\n\n"
        f"Final evaluation (after {cfg.pref.n_examples} preference examples per run):\n\n"
        f"{table}\n\n"
        f"Paired differences of final eval accuracy (same eval pairs, same reference):\n\n"
        f"{format_comparisons(comparisons)}\n",
        encoding="utf-8",
    )
    return table + "\n\n" + format_comparisons(comparisons) + f"\n\n{times}"


def relative(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
