"""The main job: ``python -m upo_ref.reproduce [--preset quick|paper|synthetic] [--smoke] ...``.

Steps (section 5 of the paper, at the scale of the preset):

1. load the preference data and split it (the local HH files: by prompt hash, see ``data``);
2. build the model; SFT it on the chosen responses of the training split (skipped if the preset's
   SFT has 0 examples);
3. compute the reference log-probs log pi_ref(y|x) of the SFT model once, for the train and eval
   pairs; every preference run shares them and starts from a copy of the SFT model;
4. one preference run per (loss, beta) of the preset (IPO and JS-IUPO at beta 0.1, 0.2, 0.5),
   then the preset's extra runs (``ExperimentConfig.runs``);
5. write the Figure-1 grid, a results table (final eval accuracy and margin per run, the paired
   differences of runs at the same beta: ``experiments.grid_report``) and the metrics; print the
   tables.

Outputs: everything under ``--out`` (default ``runs/<preset>``, git-ignored): checkpoints, full
metrics, the figure ``figure1_<preset>.png`` and the table and metrics in ``results/``. Running
the job changes no tracked file; ``--publish`` writes the figure to ``figures/`` and the table and
metrics to ``results/<preset>/`` instead, the committed results. ``--betas`` runs only the runs at
those betas. ``--data-seed N`` draws another sample of training pairs (``DataConfig.shuffle_seed``)
into ``runs/<preset>-seed<N>`` (``results/<preset>-seed<N>`` with ``--publish``), for the spread
between samples (``experiments.samples``). ``--trunk-precision`` runs a partially fine-tuned
preset's frozen trunk in another precision than the preset's (``float32`` on a CPU without bf16
matmul kernels, where the preset's bfloat16 is slow: the command warns) into
``runs/<preset>-trunk-<precision>``, ``--precision`` runs the trained model (the top of a
partially fine-tuned one) in another precision into ``runs/<preset>-<precision>``, ``--lr``
trains at another learning rate into ``runs/<preset>-lr<rate>``, and ``--train-pairs N`` on N
training pairs (as many passes over them as the preset makes over its own) into
``runs/<preset>-pairs<N>``. Re-running the same
command resumes from the checkpoints there; ``--fresh-run NAME`` starts one run over (``sft``,
or a run such as ``ipo_beta0.1``; ``sft`` restarts every run, since they all start from the SFT
model), ``--fresh`` all of them. While it runs, the command holds the lock of ``--out``
(``lm.runfiles``): a second command on the same folder stops at once, naming the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .experiments.grid_report import format_comparisons, format_table, paired_comparisons
from .experiments.grid_report import write_outputs as _write_outputs
from .lm.command import command, whole_number, with_data_seed
from .lm.config import HH_LOCAL_SUBSETS, PRECISIONS, ExperimentConfig
from .lm.distributed import data_parallel
from .lm.experiment import RunResult, run_experiment, run_name
from .lm.models import resolve_device
from .lm.presets import PRESETS, get_preset, smoke
from .lm.runfiles import CHECKPOINT, METRICS, run_lock
from .utils.paths import REPO_ROOT, figures_dir

__all__ = [
    "format_table",
    "paired_comparisons",
    "format_comparisons",
    "config_from_args",
    "run_names",
    "fresh_runs",
    "start_runs_over",
    "main",
]


def _parser() -> argparse.ArgumentParser:
    """The command line (long: one ``add_argument`` per option, all in one place, in --help's
    order, so that this reads as the command's reference)."""
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
        "--trunk-cache",
        metavar="DIR",
        help="folder of the frozen trunk's cached states, for a partially fine-tuned preset "
        "(default <out>/trunk_cache); presets with the same model, data and precision can share "
        "one: --preset smol-average --trunk-cache runs/smol/trunk_cache reuses smol's",
    )
    p.add_argument(
        "--trunk-precision",
        choices=("float32", "bfloat16"),
        help="the precision the frozen trunk of a partially fine-tuned preset runs in, once "
        "(ExperimentConfig.trunk_precision; smol: bfloat16, fast on CPUs with AMX or "
        "AVX512-BF16, slow on others: python -m upo_ref.bench grid times both). Another "
        "precision than the preset's gives other cached states, so other numbers than the "
        "committed results: its runs go to runs/<preset>-trunk-<precision> (results too)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the precision of the trained model's passes: training, the reference log-probs "
        "and evaluation (ExperimentConfig.precision; the top of a partially fine-tuned preset, "
        "whose trunk keeps its own; smol: float32). bfloat16 is faster on a CPU with bf16 "
        "matmul kernels but rounds pi and pi_ref differently, so it gives other numbers than "
        "the committed results: its runs go to runs/<preset>-<precision> (results too)",
    )
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
    p.add_argument(
        "--data-seed",
        type=whole_number(0),
        metavar="N",
        help="seed of the shuffle that draws the training pairs and orders the eval pairs "
        "(DataConfig.shuffle_seed; the presets use 0): another N trains on another sample of "
        "the training split, for the spread between samples that a binomial standard error "
        "leaves out; its runs go to runs/<preset>-seed<N> (results too, with --publish)",
    )
    p.add_argument(
        "--lr",
        type=_positive_number,
        help="the preference phase's learning rate (PhaseConfig.lr; default the preset's), for a "
        "learning-rate sweep: another rate than the preset's trains every run at it into "
        "runs/<preset>-lr<rate> (results too, with --publish); SFT keeps the preset's",
    )
    p.add_argument(
        "--train-pairs",
        type=whole_number(1),
        metavar="N",
        help="draw N training pairs instead of the preset's (DataConfig.n_train_pairs), with as "
        "many passes over them as the preset makes over its own (PhaseConfig.n_examples scaled), "
        "for the question 'does it learn with more data?': its runs go to runs/<preset>-pairs<N> "
        "(results too, with --publish); the eval pairs stay the preset's",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument(
        "--threads", type=whole_number(1), help="torch CPU threads, >= 1 (default: the preset's)"
    )
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


def _positive_number(text: str) -> float:
    """An argparse ``type``: a finite number > 0, else a usage error saying so."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _partial_presets() -> str:
    """The presets that train only the top of their model, for error messages."""
    return ", ".join(n for n in PRESETS if get_preset(n).model.train_layers is not None)


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
    cfg = with_data_seed(r(cfg, data=data), args.data_seed)
    data = cfg.data
    if args.trunk_precision is not None:
        if cfg.model.train_layers is None:
            raise ValueError(
                f"--trunk-precision: preset {cfg.name} trains the whole model and has no trunk; "
                f"it applies to a partially fine-tuned preset ({_partial_presets()})"
            )
        if args.trunk_precision != cfg.trunk_pass_precision:
            cfg = r(
                cfg,
                trunk_precision=args.trunk_precision,
                name=f"{cfg.name}-trunk-{args.trunk_precision}",  # its own runs/ and results/
            )
    if args.precision is not None and args.precision != cfg.precision:
        cfg = r(
            cfg,
            precision=args.precision,
            trunk_precision=cfg.trunk_pass_precision if cfg.model.train_layers else None,
            name=f"{cfg.name}-{args.precision}",  # its own runs/ and results/
        )
    if args.lr is not None and args.lr != cfg.pref.lr:
        cfg = r(cfg, pref=r(cfg.pref, lr=args.lr), name=f"{cfg.name}-lr{args.lr:g}")
    if args.train_pairs is not None:
        if data.n_train_pairs is None:
            raise ValueError(
                f"--train-pairs: preset {cfg.name} already draws every training pair of its "
                "split (DataConfig.n_train_pairs None); --train-pairs applies to a preset that "
                "draws a sample of them (e.g. smol, quick)"
            )
        # The number it would draw otherwise: the preset's own, or --smoke's (which sets its own).
        own = (smoke(r(cfg, data=data)) if args.smoke else r(cfg, data=data)).data.n_train_pairs
        if args.train_pairs != own:
            cfg = r(cfg, name=f"{cfg.name}-pairs{args.train_pairs}")  # its own runs/, results/
    cfg = _only_betas(r(cfg, data=data), args.betas)
    if args.runs:
        cfg = _only_runs(cfg, args.runs.split(","))
    cfg = smoke(cfg) if args.smoke else cfg
    if args.train_pairs is not None:  # after --smoke, which sets sizes of its own
        cfg = _with_train_pairs(cfg, args.train_pairs)
    return cfg if args.threads is None else r(cfg, threads=args.threads)


def _with_train_pairs(cfg: ExperimentConfig, n: int) -> ExperimentConfig:
    """``cfg`` drawing ``n`` training pairs, its preference phase making as many passes over them
    as it makes over its own (``n_examples / n_train_pairs``); ValueError, with two values that
    work, when that is not a whole number of batches."""
    data = cfg.data
    passes, batch = cfg.pref.n_examples / data.n_train_pairs, cfg.pref.batch_size
    examples = n * passes
    if examples != round(examples) or round(examples) % batch:
        below = int(examples // batch) * batch
        raise ValueError(
            f"--train-pairs {n}: preset {cfg.name} makes {passes:g} pass(es) over its training "
            f"pairs, so {examples:g} examples, not a whole number of batches of {batch}; give N "
            f"for which that is, e.g. {below / passes:g} or {(below + batch) / passes:g}"
        )
    pref = dataclasses.replace(cfg.pref, n_examples=round(examples))
    return dataclasses.replace(cfg, pref=pref, data=dataclasses.replace(data, n_train_pairs=n))


def _only_betas(cfg: ExperimentConfig, betas: str | None) -> ExperimentConfig:
    """``cfg`` with only its runs at the comma-separated ``betas`` (all of them for None)."""
    if not betas:
        return cfg
    try:
        keep = {float(b) for b in betas.split(",")}
    except ValueError:
        raise ValueError(f"--betas {betas}: give comma-separated numbers, e.g. 0.1,0.5") from None
    if not keep & ({*cfg.betas} | {run[3] for run in cfg.extra_runs}):
        raise ValueError(f"--betas {betas}: preset {cfg.name} has no run at these betas")
    extra = tuple(run for run in cfg.extra_runs if run[3] in keep)
    betas_kept = tuple(b for b in cfg.betas if b in keep)
    return dataclasses.replace(cfg, betas=betas_kept, extra_runs=extra)


def _only_runs(cfg: ExperimentConfig, names: list[str]) -> ExperimentConfig:
    """``cfg`` with only the runs whose folder names are ``names`` (as ``extra_runs``; a run's
    checkpoint identity does not depend on which other runs the config lists)."""
    runs = {run_name(loss.label, beta): (loss, beta) for loss, beta in cfg.runs()}
    unknown = sorted(set(names) - set(runs))
    if unknown:
        raise ValueError(f"--runs: preset {cfg.name} has no run {unknown}; its runs: {list(runs)}")
    extra = []
    for name in names:
        loss, beta = runs[name]
        divergence = loss.divergence.name if loss.divergence is not None else None
        extra.append((loss.name, divergence, loss.form, beta))
    return dataclasses.replace(cfg, losses=(), betas=(), extra_runs=tuple(extra))


def run_names(cfg: ExperimentConfig) -> list[str]:
    """The run folders of ``cfg`` under ``--out``: ``sft`` (when SFT runs), then one per run of
    ``cfg.runs()``."""
    names = ["sft"] if cfg.sft.n_examples else []
    return names + [run_name(loss.label, beta) for loss, beta in cfg.runs()]


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


@command
def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        data_parallel()  # accelerate launch: each process's device is set before any model
        device = resolve_device(args.device)
        restart = fresh_runs(cfg, args.fresh_run)
        if args.publish and args.smoke:
            raise ValueError("--publish writes the committed results: not with --smoke")
        if args.trunk_cache and cfg.model.train_layers is None:
            raise ValueError(
                f"--trunk-cache: preset {cfg.name} trains the whole model and caches no trunk; "
                f"it applies to a partially fine-tuned preset ({_partial_presets()})"
            )
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
    published = REPO_ROOT / "results" / cfg.name, figures_dir()
    results_dir = Path(args.results or (published[0] if args.publish else out_dir / "results"))
    figure_path = (
        Path(args.figure)
        if args.figure
        else (published[1] if args.publish else out_dir) / f"figure1_{cfg.name}.png"
    )
    dp = data_parallel()  # under accelerate launch only the main process writes the folder
    with run_lock(out_dir) if dp is None or dp.is_main else nullcontext():
        if restart and (dp is None or dp.is_main):
            start_runs_over(out_dir, restart)
            print(f"starting over: {', '.join(restart)}")
        if dp is not None:
            dp.barrier()
        t0 = time.perf_counter()
        sft_final, results, timings = run_experiment(
            cfg,
            out_dir,
            device,
            resume=not args.fresh,
            progress=not args.no_progress,
            cache_dir=args.trunk_cache,
        )
    wall_s = time.perf_counter() - t0
    if dp is not None and not dp.is_main:
        return results  # the main process writes the figure and the tables
    table = _write_outputs(
        cfg, results, sft_final, timings, out_dir, results_dir, figure_path, command, wall_s
    )
    print(
        f"\n{table}\n\nwall time {wall_s / 60:.1f} min; figure {figure_path}; table "
        f"{results_dir / 'summary.md'}"
    )
    return results


if __name__ == "__main__":
    main()
