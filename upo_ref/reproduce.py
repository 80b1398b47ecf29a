"""The main job: ``python -m upo_ref.reproduce [--preset quick|paper|synthetic] [--smoke] ...``.

Steps (section 5 of the paper, at the scale of the preset):

1. load the preference data and split it (the local HH files: by prompt hash, see ``data``);
2. build the model; SFT it on the chosen responses of the training split (skipped if the preset's
   SFT has 0 examples);
3. compute the reference log-probs log pi_ref(y|x) of the SFT model once, for the train and eval
   pairs; every preference run shares them and starts from a copy of the SFT model;
4. one preference run per (loss, beta) of the preset (IPO and JS-IUPO at beta 0.1, 0.2, 0.5);
5. write the Figure-1 grid, a results table (final eval accuracy and margin per run) and the
   metrics; print the table.

Outputs: everything under ``--out`` (default ``runs/<preset>``, git-ignored): checkpoints, full
metrics, the figure ``figure1_<preset>.png`` and the table and metrics in ``results/``. Running
the job changes no tracked file; ``--publish`` writes the figure to ``figures/`` and the table and
metrics to ``results/<preset>/`` instead, the committed results. Re-running the same command
resumes from the checkpoints; ``--fresh`` starts over.

The table gives each run's final eval accuracy with its binomial standard error and, for every two
runs at the same beta, the difference of their accuracies with its *paired* standard error
(``utils.stats.paired_difference``, from each pair's correctness under both final policies): the
runs share the eval pairs and the reference, so most pairs are ranked alike by both and the
unpaired error overstates the noise of the difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .experiments.figure1 import figure1
from .lm.config import PRESETS, ExperimentConfig, get_preset, smoke
from .lm.data import HH_LOCAL_SUBSETS
from .lm.experiment import RunResult, run_experiment
from .lm.models import default_device
from .lm.train import FINAL_EVAL, read_metrics
from .utils.paths import REPO_ROOT, figures_dir
from .utils.stats import binomial_se, paired_difference

__all__ = ["format_table", "paired_comparisons", "format_comparisons", "config_from_args", "main"]


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
            f"| {r.label} | {r.beta:g} | {acc:.4f}{se} | {f['rewards/margins']:.4f} | {f['loss']:.4f} |"
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


def paired_comparisons(results: list[RunResult]) -> list[dict]:
    """Every two runs at the same beta: accuracy of the later minus the earlier, its paired SE and
    the unpaired SE for contrast, from the runs' per-pair final evaluations
    (``final_eval.json``)."""
    correct = {}
    for r in results:
        final = json.loads((r.metrics_path.parent / FINAL_EVAL).read_text(encoding="utf-8"))
        correct[r.name] = final["rewards/accuracies"]  # (N,) 1/0 per eval pair
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


def _time_split(results: list[RunResult], timings: dict[str, float]) -> dict[str, float]:
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


def _write_outputs(
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
    n_evals = {r.n_eval for r in results}
    table = format_table(results, sft_final, n_evals.pop() if len(n_evals) == 1 else None)
    comparisons = paired_comparisons(results)
    split = _time_split(results, timings)
    runs = {(r.label, r.beta): read_metrics(r.metrics_path) for r in results}
    labels = " vs ".join(dict.fromkeys(r.label for r in results))
    d, p = cfg.data, cfg.pref
    title = (
        f"{labels}, preset {cfg.name}: {cfg.model.name_or_path} on {'+'.join(d.datasets)}, "
        f"{d.n_train_pairs or 'all'} train pairs, {p.n_examples} examples per run, "
        f"{d.n_eval_pairs or 'all'} eval pairs"
    )
    figure1(runs, figure_path, title=title)
    (results_dir / "metrics").mkdir(parents=True, exist_ok=True)
    if cfg.sft.n_examples:
        shutil.copyfile(out_dir / "sft" / "metrics.jsonl", results_dir / "metrics" / "sft.jsonl")
    for r in results:
        shutil.copyfile(r.metrics_path, results_dir / "metrics" / f"{r.name}.jsonl")
        shutil.copyfile(
            r.metrics_path.parent / FINAL_EVAL, results_dir / "metrics" / f"{r.name}.final.json"
        )
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
    times = ", ".join(f"{k.removesuffix('_s')} {v / 60:.1f} min" for k, v in split.items())
    (results_dir / "summary.md").write_text(
        f"# Results of preset `{cfg.name}`\n\nCommand: `{command}`  \nWall time: "
        f"{wall_s / 60:.1f} min ({times})  \nFigure: `{_relative(figure_path)}`\n\n"
        f"Final evaluation (after {cfg.pref.n_examples} preference examples per run):\n\n"
        f"{table}\n\n"
        f"Paired differences of final eval accuracy (same eval pairs, same reference):\n\n"
        f"{format_comparisons(comparisons)}\n",
        encoding="utf-8",
    )
    return table + "\n\n" + format_comparisons(comparisons) + f"\n\n{times}"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m upo_ref.reproduce",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="quick", help=f"one of {', '.join(PRESETS)} (default quick)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the preset shrunk to seconds (tiny model, few examples)",
    )
    p.add_argument(
        "--model",
        help="hub id (gpt2), local checkpoint folder, or .gguf file; replaces the preset's",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer hub id or folder (default: see ModelConfig.tokenizer)"
    )
    p.add_argument("--out", help="run folder for checkpoints and metrics (default runs/<preset>)")
    p.add_argument(
        "--results", help="folder for summary.md/json and metrics copies (default <out>/results)"
    )
    p.add_argument(
        "--figure", help="path of the Figure-1 grid (default <out>/figure1_<preset>.png)"
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="write the figure to figures/ and the table and metrics to results/<preset>/ "
        "(the committed results) instead of under --out",
    )
    p.add_argument(
        "--hh-dir", help="folder of <subset>/<split>.jsonl.gz (default ../shared/data/hh-rlhf)"
    )
    p.add_argument(
        "--hh-split",
        choices=("hash", "official"),
        help="split the local test files by prompt hash, "
        "or use the official train/test files (downloaded if missing)",
    )
    p.add_argument(
        "--shp-dir", help="folder of SHP <subreddit>/{train,test}.json files; adds SHP to the data"
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the preset's)")
    p.add_argument(
        "--runs",
        help="comma-separated run folder names (e.g. ipo_beta0.1,js-iupo_beta0.1): run only these "
        "of the preset's runs",
    )
    p.add_argument(
        "--betas",
        help="comma-separated betas: run only the preset's runs at these (e.g. 0.1 first, the rest "
        "later into the same --out; a finished run is resumed, not retrained)",
    )
    p.add_argument(
        "--fresh", action="store_true", help="ignore checkpoints in --out and start over"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The preset named by ``args`` with the command-line overrides applied (then shrunk by --smoke)."""
    cfg = get_preset(args.preset)
    r = dataclasses.replace
    if args.model:  # a given model brings its own vocabulary
        cfg = r(
            cfg, model=r(cfg.model, name_or_path=args.model), data=r(cfg.data, compact_vocab=None)
        )
    if args.tokenizer:
        cfg = r(cfg, model=r(cfg.model, tokenizer=args.tokenizer))
    data = cfg.data
    if args.hh_dir:
        data = r(data, hh_dir=args.hh_dir)
    if args.hh_split:
        subsets = data.hh_subsets if args.hh_split == "official" else HH_LOCAL_SUBSETS
        data = r(data, hh_split=args.hh_split, hh_subsets=subsets)
    if args.shp_dir:
        data = r(
            data, shp_dir=args.shp_dir, datasets=tuple(dict.fromkeys(data.datasets + ("shp",)))
        )
    cfg = r(cfg, data=data)
    if args.threads:
        cfg = r(cfg, threads=args.threads)
    if args.betas:
        keep = {float(b) for b in args.betas.split(",")}
        if not keep & ({*cfg.betas} | {run[3] for run in cfg.extra_runs}):
            raise SystemExit(f"--betas {args.betas}: preset {cfg.name} has no run at these betas")
        extra = tuple(run for run in cfg.extra_runs if run[3] in keep)
        cfg = r(cfg, betas=tuple(b for b in cfg.betas if b in keep), extra_runs=extra)
    if args.runs:
        cfg = _only_runs(cfg, args.runs.split(","))
    return smoke(cfg) if args.smoke else cfg


def _only_runs(cfg: ExperimentConfig, names: list[str]) -> ExperimentConfig:
    """``cfg`` with only the runs whose folder names are ``names`` (as ``extra_runs``; a run's
    checkpoint identity does not depend on which other runs the config lists)."""
    runs = {RunResult(loss.label, beta, {}, Path()).name: (loss, beta) for loss, beta in cfg.runs()}
    unknown = sorted(set(names) - set(runs))
    if unknown:
        raise SystemExit(f"--runs: preset {cfg.name} has no run {unknown}; its runs: {list(runs)}")
    extra = []
    for name in names:
        loss, beta = runs[name]
        divergence = loss.divergence.name if loss.divergence is not None else None
        extra.append((loss.name, divergence, loss.form, beta))
    return dataclasses.replace(cfg, losses=(), betas=(), extra_runs=tuple(extra))


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(
            cfg.threads
        )  # the main job only (restored below); importing upo_ref sets nothing
    command = "python -m upo_ref.reproduce" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    try:
        return _main(args, cfg, command)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, cfg: ExperimentConfig, command: str) -> list[RunResult]:
    out_dir = Path(args.out) if args.out else REPO_ROOT / "runs" / cfg.name
    if args.publish and args.smoke:
        raise SystemExit("--publish writes the committed results: not with --smoke")
    published = REPO_ROOT / "results" / cfg.name, figures_dir()
    results_dir = Path(args.results or (published[0] if args.publish else out_dir / "results"))
    figure_path = (
        Path(args.figure)
        if args.figure
        else (published[1] if args.publish else out_dir) / f"figure1_{cfg.name}.png"
    )
    device = torch.device(args.device) if args.device else default_device()

    t0 = time.perf_counter()
    sft_final, results, timings = run_experiment(
        cfg, out_dir, device, resume=not args.fresh, progress=not args.no_progress
    )
    wall_s = time.perf_counter() - t0
    table = _write_outputs(
        cfg, results, sft_final, timings, out_dir, results_dir, figure_path, command, wall_s
    )
    print(
        f"\n{table}\n\nwall time {wall_s / 60:.1f} min; figure {figure_path}; table {results_dir / 'summary.md'}"
    )
    return results


if __name__ == "__main__":
    main()
