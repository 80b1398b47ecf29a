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
the checkpoints there; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import PRESETS, ExperimentConfig, get_preset, smoke
from .data import (
    HH_LOCAL_SUBSETS,
    CompactVocab,
    TokenizedPair,
    download_hh,
    load_hh,
    load_shp,
    sft_examples,
    shp_files,
    split_by_prompt_hash,
    tokenize_pairs,
    tokenize_sft,
)
from .figure1 import figure1
from .logprobs import head_is_linear_readout
from .losses import PreferenceLoss
from .models import build_model, default_device, load_tokenizer
from .paths import REPO_ROOT, figures_dir, hh_dir
from .stats import binomial_se
from .synthetic import SyntheticTask
from .train import PreferencePhase, SFTPhase, read_metrics, reference_logps, train

__all__ = [
    "ExperimentData",
    "prepare_data",
    "load_experiment_data",
    "Reference",
    "prepare_reference",
    "RunResult",
    "run_experiment",
    "format_table",
    "config_from_args",
    "main",
]

TRUNCATION = {"hh": "keep_end", "shp": "keep_start"}  # HH keeps the turn being answered


@dataclass
class ExperimentData:
    """Tokenized SFT and preference sets, the vocabulary, and the loaders' reports.

    ``pref_unused``: the training split's pairs that were *not* drawn for preference training (when
    ``n_train_pairs`` leaves some); their chosen responses are SFT targets all the same. Nothing
    trains on them as pairs: ``upo_ref.overlap`` uses them to ask what a falling train loss means.
    """

    sft_train: list[TokenizedPair]
    sft_eval: list[TokenizedPair]
    pref_train: list[TokenizedPair]
    pref_eval: list[TokenizedPair]
    vocab_size: int
    pad_id: int
    reports: list[str] = field(default_factory=list)
    pref_unused: list[TokenizedPair] = field(default_factory=list)


def _first(items: list, n: int | None, seed: int, what: str) -> list:
    """The first n items after a seeded shuffle (all of them, shuffled, when n is None)."""
    return _first_and_rest(items, n, seed, what)[0]


def _first_and_rest(items: list, n: int | None, seed: int, what: str) -> tuple[list, list]:
    """(the first n items after a seeded shuffle, the others in shuffled order)."""
    if n is not None and n > len(items):
        raise ValueError(f"asked for {n} {what} but the split has only {len(items)}")
    items = list(items)
    random.Random(seed).shuffle(items)
    return (items, []) if n is None else (items[:n], items[n:])


def _hh_pairs(cfg: ExperimentConfig, reports: list[str]):
    d = cfg.data
    root = Path(d.hh_dir) if d.hh_dir else hh_dir()
    if d.hh_split == "hash":
        pairs, report = load_hh(root, "test", d.hh_subsets, drop_mismatched=True)
        train, held_out = split_by_prompt_hash(pairs, d.eval_fraction)
        reports += [
            str(report),
            f"HH split by prompt hash (eval_fraction {d.eval_fraction}): "
            f"{len(train)} train / {len(held_out)} eval pairs",
        ]
        return train, held_out
    splits = []
    for split in ("train", "test"):
        if not all((root / s / f"{split}.jsonl.gz").is_file() for s in d.hh_subsets):
            print(f"downloading the official HH {split} files into {root} ...", flush=True)
            download_hh(root, split, d.hh_subsets)
        pairs, report = load_hh(root, split, d.hh_subsets, drop_mismatched=True)
        reports.append(str(report))
        splits.append(pairs)
    return splits[0], splits[1]


def prepare_data(
    cfg: ExperimentConfig, tokenizer=None, keep_unused: int | None = 0
) -> ExperimentData:
    """Load, split, subsample and tokenize the data of ``cfg`` (``tokenizer`` is unused for synthetic).

    ``keep_unused``: also tokenize the first that many of the training pairs not drawn for preference
    training, None for all of them (``ExperimentData.pref_unused``; they change nothing else, the
    vocabulary included)."""
    d, reports = cfg.data, []
    if d.datasets == ("synthetic",):
        if d.n_train_pairs is None or d.n_eval_pairs is None:
            raise ValueError(
                "the synthetic task draws as many pairs as asked: set n_train_pairs and n_eval_pairs"
            )
        task = SyntheticTask(seed=d.shuffle_seed)
        train, held_out = (
            task.pairs(d.n_train_pairs, stream=0),
            task.pairs(d.n_eval_pairs, stream=1),
        )
        reports.append(
            f"synthetic task: {len(train)} train / {len(held_out)} eval pairs, vocab {task.vocab_size}"
        )
        return ExperimentData(
            train, held_out, train, held_out, task.vocab_size, task.eos_id, reports
        )

    out = {"sft_train": [], "sft_eval": [], "pref_train": [], "pref_eval": [], "pref_unused": []}
    for name in d.datasets:
        if name == "hh":
            train, held_out = _hh_pairs(cfg, reports)
        else:
            if d.shp_dir is None:
                raise ValueError(
                    "dataset 'shp' needs shp_dir (--shp-dir), a folder of <subreddit>/{train,test}.json"
                )
            train, r1 = load_shp(shp_files(d.shp_dir, "train"))
            held_out, r2 = load_shp(shp_files(d.shp_dir, "test"))
            reports += [str(r1), str(r2)]
        lengths = dict(
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length,
            truncation_mode=TRUNCATION[name],
        )
        seed = d.shuffle_seed
        used, unused = _first_and_rest(train, d.n_train_pairs, seed, f"{name} train pairs")
        out["pref_train"] += tokenize_pairs(used, tokenizer, **lengths)
        if keep_unused != 0:
            out["pref_unused"] += tokenize_pairs(unused[:keep_unused], tokenizer, **lengths)
        out["pref_eval"] += tokenize_pairs(
            _first(held_out, d.n_eval_pairs, seed, f"{name} eval pairs"), tokenizer, **lengths
        )
        if (
            d.sft_disjoint
        ):  # the control: no SFT target is the chosen response of a preference-training pair
            drawn = {p.prompt for p in used}
            sft_source = [p for p in train if p.prompt not in drawn]
            reports.append(
                f"{name} SFT disjoint from preference training: SFT draws from the {len(sft_source)} of "
                f"{len(train)} training pairs whose prompt no preference-training pair has"
            )
        else:
            sft_source = train
        sft_train = _first(sft_examples(sft_source), d.n_sft_examples, seed, f"{name} SFT examples")
        out["sft_train"] += tokenize_sft(sft_train, tokenizer, **lengths)
        out["sft_eval"] += tokenize_sft(
            _first(sft_examples(held_out), d.n_eval_pairs, seed, f"{name} SFT eval"),
            tokenizer,
            **lengths,
        )
    if d.compact_vocab is None:
        return ExperimentData(
            **out, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, reports=reports
        )
    # From the training data only (preference pairs, SFT prompts and targets), after truncation.
    sequences = [s for p in out["pref_train"] for s in (p.prompt, p.chosen, p.rejected)]
    sequences += [s for p in out["sft_train"] for s in (p.prompt, p.chosen)]
    vocab = CompactVocab.build(sequences, d.compact_vocab, tokenizer.eos_token_id)
    out = {k: vocab.remap(v) for k, v in out.items()}
    cover = {k: CompactVocab.coverage(out[k], vocab.unk_id) for k in ("pref_train", "pref_eval")}
    reports.append(
        f"compact vocabulary of {vocab.size} ids (the {vocab.size - 2} most frequent training tokens, EOS, "
        f"UNK): {cover['pref_train']:.1%} of the train and {cover['pref_eval']:.1%} of the eval response "
        f"tokens are not UNK"
    )
    return ExperimentData(**out, vocab_size=vocab.size, pad_id=vocab.eos_id, reports=reports)


@dataclass
class RunResult:
    """One preference run: its loss label, beta, final eval metrics, where its metrics are, and how
    many eval pairs the metrics average over."""

    label: str
    beta: float
    final: dict[str, float]
    metrics_path: Path
    n_eval: int | None = None

    @property
    def name(self) -> str:
        return f"{self.label.lower()}_beta{self.beta:g}"


@dataclass
class Reference:
    """The reference policy pi_ref (the SFT model, or the model as built when SFT is skipped) and what every
    preference run started from it shares.

    ``reference``: log pi_ref(y_w|x), log pi_ref(y_l|x) per split, for ``PreferencePhase``; ``common``: the
    phase keyword arguments (``pad_id``, ``average``, ``response_only``); ``identity``: what a checkpoint of
    a run must have been made with to be resumed (model, data, SFT phase, ``average_logps``).
    """

    model: torch.nn.Module
    reference: dict[str, tuple[torch.Tensor, torch.Tensor]]
    common: dict
    identity: dict
    sft_final: dict[str, float]


def load_experiment_data(cfg: ExperimentConfig, keep_unused: int | None = 0):
    """(tokenizer, data) of ``cfg`` (no tokenizer for the synthetic task), with the loaders' reports printed."""
    tokenizer = None if cfg.data.datasets == ("synthetic",) else load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer, keep_unused)
    for line in data.reports:
        print(line)
    print(
        f"SFT: {len(data.sft_train)} train / {len(data.sft_eval)} eval examples; preference: "
        f"{len(data.pref_train)} train / {len(data.pref_eval)} eval pairs"
    )
    return tokenizer, data


def prepare_reference(
    cfg: ExperimentConfig,
    data: ExperimentData,
    out_dir: str | Path,
    device: torch.device,
    resume: bool = True,
    progress: bool = True,
) -> Reference:
    """Steps 2-3 of the main job: build the model, SFT it (checkpoints under ``out_dir/sft``), and compute
    pi_ref's log-probs of the train and eval pairs once."""
    out_dir = Path(out_dir)
    model = build_model(cfg.model, data.vocab_size, cfg.data.max_length, eos_id=data.pad_id)
    response_only = head_is_linear_readout(model, data.vocab_size)
    model.to(
        device
    )  # also when SFT is skipped and the reference log-probs come from the model as built
    print(
        f"model {cfg.model.name_or_path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"device {device}, logits on response tokens only: {response_only}"
    )
    common = dict(pad_id=data.pad_id, average=cfg.average_logps, response_only=response_only)
    # What a checkpoint must have been made with to be resumed: SFT depends on the model, the data and
    # its own phase; a preference run also on the preference phase, the loss and beta.
    e = cfg.to_dict()
    identity = {k: e[k] for k in ("model", "data", "sft", "average_logps")}

    sft_final: dict[str, float] = {}
    if cfg.sft.n_examples:
        sft_final = train(
            model,
            SFTPhase(**common),
            data.sft_train,
            data.sft_eval,
            cfg.sft,
            out_dir / "sft",
            device,
            resume,
            progress,
            desc="SFT",
            identity=identity,
        )

    t0 = time.perf_counter()
    batch = cfg.pref.eval_batch_size
    reference = {
        "train": reference_logps(
            model, data.pref_train, batch, data.pad_id, device, cfg.average_logps, response_only
        ),
        "eval": reference_logps(
            model, data.pref_eval, batch, data.pad_id, device, cfg.average_logps, response_only
        ),
    }
    print(
        f"reference log-probs of {len(data.pref_train)} + {len(data.pref_eval)} pairs computed once "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    return Reference(model, reference, common, identity, sft_final)


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    device: torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
) -> tuple[dict[str, float], list[RunResult]]:
    """SFT once, then every (loss, beta) run; returns (final SFT eval metrics, the runs' results)."""
    out_dir = Path(out_dir)
    device = device if device is not None else default_device()
    _, data = load_experiment_data(cfg)
    ref = prepare_reference(cfg, data, out_dir, device, resume, progress)
    model, reference, common, identity, sft_final = (
        ref.model,
        ref.reference,
        ref.common,
        ref.identity,
        ref.sft_final,
    )
    e = cfg.to_dict()

    results = []
    for name, divergence in cfg.losses:
        loss_fn = PreferenceLoss(name, divergence)
        for beta in cfg.betas:
            policy = copy.deepcopy(model)
            phase = PreferencePhase(loss_fn, beta, reference, **common)
            result = RunResult(loss_fn.label, beta, {}, Path(), len(data.pref_eval))
            run_dir = out_dir / result.name
            result.final = train(
                policy,
                phase,
                data.pref_train,
                data.pref_eval,
                cfg.pref,
                run_dir,
                device,
                resume,
                progress,
                desc=f"{loss_fn.label} beta={beta:g}",
                identity={**identity, "pref": e["pref"], "loss": loss_fn.label, "beta": beta},
            )
            result.metrics_path = run_dir / "metrics.jsonl"
            results.append(result)
            del policy
    return sft_final, results


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
    table = format_table(results, sft_final, n_evals.pop() if len(n_evals) == 1 else None)
    runs = {(r.label, r.beta): read_metrics(r.metrics_path) for r in results}
    labels = " vs ".join(dict.fromkeys(r.label for r in results))
    d, p = cfg.data, cfg.pref
    title = (
        f"{labels}, preset {cfg.name}: {cfg.model.name_or_path} on {'+'.join(d.datasets)}, "
        f"{d.n_train_pairs or 'all'} train pairs, {p.n_examples} examples per run, {d.n_eval_pairs or 'all'} eval pairs"
    )
    figure1(runs, figure_path, title=title)
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
        f"# Results of preset `{cfg.name}`\n\nCommand: `{command}`  \nWall time: {wall_s / 60:.1f} min  \n"
        f"Figure: `{_relative(figure_path)}`\n\nFinal evaluation (after {cfg.pref.n_examples} preference "
        f"examples per run):\n\n{table}\n",
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
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the preset's)")
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
    return smoke(cfg) if args.smoke else cfg


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
    inside = out_dir if args.smoke else None
    results_dir = (
        Path(args.results)
        if args.results
        else (inside / "results" if inside else REPO_ROOT / "results" / cfg.name)
    )
    figure_path = (
        Path(args.figure) if args.figure else (inside or figures_dir()) / f"figure1_{cfg.name}.png"
    )
    device = torch.device(args.device) if args.device else default_device()

    t0 = time.perf_counter()
    sft_final, results = run_experiment(
        cfg, out_dir, device, resume=not args.fresh, progress=not args.no_progress
    )
    wall_s = time.perf_counter() - t0
    table = _write_outputs(
        cfg, results, sft_final, out_dir, results_dir, figure_path, command, wall_s
    )
    print(
        f"\n{table}\n\nwall time {wall_s / 60:.1f} min; figure {figure_path}; table {results_dir / 'summary.md'}"
    )
    return results


if __name__ == "__main__":
    main()
