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

Outputs: checkpoints and full metrics under ``--out`` (default ``runs/<preset>``, git-ignored);
the figure to ``figures/figure1_<preset>.png`` and the table and metrics to ``results/<preset>/``
(with ``--smoke``, everything goes under ``--out``). Re-running the same command resumes from
the checkpoints there; ``--fresh-run NAME`` starts one run over (``sft``, or a run such as
``ipo_beta0.1``; ``sft`` restarts every run, since they all start from the SFT model), ``--fresh``
all of them. While it runs, the command holds the lock of ``--out`` (``lm.runfiles``): a second
command on the same folder stops at once, naming the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .experiments.figure1 import figure1
from .lm.config import HH_LOCAL_SUBSETS, PRESETS, ExperimentConfig, get_preset, smoke
from .lm.distributed import data_parallel
from .lm.experiment import RunResult, run_experiment
from .lm.models import resolve_device
from .lm.runfiles import CHECKPOINT, METRICS, read_metrics, run_lock
from .losses import PreferenceLoss
from .utils.paths import REPO_ROOT, figures_dir
from .utils.stats import binomial_se

__all__ = ["format_table", "config_from_args", "run_names", "fresh_runs", "start_runs_over", "main"]


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


def _write_outputs(
    cfg,
    results,
    sft_final,
    out_dir: Path,
    results_dir: Path,
    figure_path: Path,
    command: str,
    wall_s: float,
) -> str:
    n_evals = {r.n_eval for r in results}
    n_eval = n_evals.pop() if len(n_evals) == 1 else None
    table = format_table(results, sft_final, n_eval)
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
    summary = {
        "command": command,
        "wall_seconds": round(wall_s, 1),
        "config": cfg.to_dict(),
        "sft_final": sft_final,
        "runs": [
            {"label": r.label, "beta": r.beta, "n_eval_pairs": r.n_eval, "final": r.final}
            for r in results
        ],
    }
    (results_dir / "summary.json").write_text(
        json.dumps(summary, indent=1) + "\n", encoding="utf-8"
    )
    (results_dir / "summary.md").write_text(
        f"# Results of preset `{cfg.name}`\n\nCommand: `{command}`  \nWall time: "
        f"{wall_s / 60:.1f} min  \nFigure: `{_relative(figure_path)}`\n\nFinal evaluation (after "
        f"{cfg.pref.n_examples} preference examples per run):\n\n{table}\n",
        encoding="utf-8",
    )
    return table


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
        "--results", help="folder for summary.md/json and metrics copies (default results/<preset>)"
    )
    p.add_argument(
        "--figure", help="path of the Figure-1 grid (default figures/figure1_<preset>.png)"
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
    p.add_argument(
        "--data",
        help="JSON-lines file in TRL's preference format (prompt, chosen, rejected); replaces the "
        "preset's data (eval: --eval-data, else a prompt-hash split of this file)",
    )
    p.add_argument("--eval-data", help="eval pairs for --data, in the same format")
    p.add_argument(
        "--keep-identical",
        action="store_true",
        help="keep pairs whose chosen and rejected responses are identical (dropped and listed "
        "by default)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument(
        "--threads", type=_positive_int, help="torch CPU threads, >= 1 (default: the preset's)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="ignore every checkpoint in --out and start over"
    )
    p.add_argument(
        "--fresh-run",
        action="append",
        default=[],
        metavar="NAME",
        help="start this run over (repeatable): sft, or a run folder name such as ipo_beta0.1; "
        "sft restarts every run",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The preset named by ``args`` with the command-line overrides applied (then shrunk by
    --smoke)."""
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
    if args.eval_data and not args.data:
        raise ValueError("--eval-data is the eval set of --data: give --data PATH too")
    if args.data:
        data = r(data, datasets=("trl",), trl_train=args.data, trl_eval=args.eval_data)
    if args.shp_dir:
        data = r(
            data, shp_dir=args.shp_dir, datasets=tuple(dict.fromkeys(data.datasets + ("shp",)))
        )
    if args.keep_identical:
        data = r(data, keep_identical=True)
    cfg = smoke(r(cfg, data=data)) if args.smoke else r(cfg, data=data)
    return cfg if args.threads is None else r(cfg, threads=args.threads)


def run_names(cfg: ExperimentConfig) -> list[str]:
    """The run folders of ``cfg`` under ``--out``: ``sft`` (when SFT runs), then one per (loss,
    beta)."""
    names = ["sft"] if cfg.sft.n_examples else []
    for name, divergence in cfg.losses:
        label = PreferenceLoss(name, divergence).label
        names += [RunResult(label, beta, {}, Path()).name for beta in cfg.betas]
    return names


def fresh_runs(cfg: ExperimentConfig, names: list[str]) -> list[str]:
    """The runs that ``--fresh-run`` names restart: those named, or every run when ``sft`` is one
    of them (all start from the SFT model). ValueError listing the runs for an unknown name."""
    known = run_names(cfg)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"--fresh-run {unknown[0]}: no such run; the runs are {', '.join(known)}")
    return known if "sft" in names else [n for n in known if n in names]


def start_runs_over(out_dir: Path, runs: list[str]) -> None:
    """Remove the checkpoint and metrics of each run folder (under its lock): they start over."""
    for name in runs:
        with run_lock(out_dir / name):
            for file in (CHECKPOINT, METRICS):
                (out_dir / name / file).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        data_parallel()  # accelerate launch: each process's device is set before any model
        device = resolve_device(args.device)
        restart = fresh_runs(cfg, args.fresh_run)
    except ValueError as err:
        parser.error(str(err))
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(
            cfg.threads
        )  # the main job only (restored below); importing upo_ref sets nothing
    command = "python -m upo_ref.reproduce" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    try:
        return _main(args, cfg, device, restart, command)
    finally:
        torch.set_num_threads(threads)


def _main(args, cfg, device: torch.device, restart: list[str], command: str) -> list[RunResult]:
    out_dir = Path(args.out) if args.out else REPO_ROOT / "runs" / cfg.name
    inside = out_dir if args.smoke else None
    results_dir = (
        Path(args.results)
        if args.results
        else (inside / "results" if inside else REPO_ROOT / "results" / cfg.name)
    )
    figure_path = (
        Path(args.figure) if args.figure else (inside or figures_dir()) / f"figure1_{cfg.name}.png"
    )
    dp = data_parallel()  # under accelerate launch only the main process writes the folder
    with run_lock(out_dir) if dp is None or dp.is_main else nullcontext():
        if restart and (dp is None or dp.is_main):
            start_runs_over(out_dir, restart)
            print(f"starting over: {', '.join(restart)}")
        if dp is not None:
            dp.barrier()
        t0 = time.perf_counter()
        sft_final, results = run_experiment(
            cfg, out_dir, device, resume=not args.fresh, progress=not args.no_progress
        )
    wall_s = time.perf_counter() - t0
    if dp is not None and not dp.is_main:
        return results  # the main process writes the figure and the tables
    table = _write_outputs(
        cfg, results, sft_final, out_dir, results_dir, figure_path, command, wall_s
    )
    print(
        f"\n{table}\n\nwall time {wall_s / 60:.1f} min; figure {figure_path}; table "
        f"{results_dir / 'summary.md'}"
    )
    return results


if __name__ == "__main__":
    main()
