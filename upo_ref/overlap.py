r"""What does a falling train loss mean? The SFT-overlap check of a finished main-job run.

The paper's recipe, and the main job's, SFTs pi_ref on the chosen responses of the *training*
prompts and then trains on preference pairs of that same split. A training pair's chosen response
has therefore been fitted once already; an eval pair's has not. A policy that merely goes on
raising the likelihood of responses it has memorised ranks y_w above y_l on training pairs it has
never seen as pairs, and not on eval pairs: its train loss falls with nothing learnt about
preferences.

``python -m upo_ref.overlap [--preset quick] [--data-seed N] [--out runs/quick] [--trunk-cache
DIR]`` loads a finished run's SFT model (pi_ref) and each preference run's final checkpoint (of
``reproduce --preset P [--data-seed N]``, the same options) and reports, on three groups of pairs,

* ``trained``: the pairs preference training used,
* ``unused``: training-split pairs it did *not* use (their chosen responses were SFT targets too),
* ``eval``: the held-out pairs (no response of theirs was trained on),

the implicit-reward accuracy and margin of each policy (``metrics.preference_metrics``: what the
trainer logs) and pi_ref's own ranking, P(log pi_ref(y_w|x) > log pi_ref(y_l|x)). If the policies
rank ``unused`` pairs as well as ``trained`` ones and ``eval`` pairs at chance, what training
picked up is the SFT overlap, not the preferences. Below the table: the unused pairs pooled against
the eval pairs (an unpaired difference: they are different pairs), and how many pairs of each group
have a trained pair's prompt. The split sends each prompt to one side, so no eval pair has; the
draw of the trained pairs from the training split can leave one prompt's pairs on both sides of
``trained`` and ``unused``.

When SFT draws only a sample of the training prompts (``DataConfig.n_sft_examples``, as in
``smol-sft``), ``unused`` is split in two: ``unused-sft``, whose chosen responses were SFT targets,
and ``unused-other``, whose were not. Neither was trained on as pairs, so a gap between them is the
SFT overlap alone. A partially fine-tuned preset is scored as it was trained: the top of its model
on the trunk's cached states (``--trunk-cache``, default the run's own), in the preset's thread
count, so that the states of its trained and eval pairs are the run's.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .lm.command import command, whole_number, with_data_seed
from .lm.config import ExperimentConfig
from .lm.data import LoadReport
from .lm.experiment import load_experiment_data, run_name
from .lm.experiment_data import TRUNCATION, _first, _first_and_rest, _text_pairs
from .lm.logprobs import head_is_linear_readout
from .lm.models import build_model
from .lm.presets import PRESETS, get_preset, smoke
from .lm.split import sft_examples
from .lm.tokenize import tokenize_pairs
from .lm.train import CHECKPOINT, reference_logps
from .lm.trunk_cache import cache_trunk, collate_cached
from .metrics import preference_metrics
from .utils.paths import REPO_ROOT
from .utils.stats import binomial_se

__all__ = [
    "GroupStats",
    "sft_target_flags",
    "overlap_check",
    "unused_against_eval",
    "format_overlap",
    "main",
]

GROUPS = ("trained", "unused", "eval")


@dataclass
class GroupStats:
    """One model on one group of pairs: its accuracy (a tie counts half, as the trainer logs it),
    its mean implicit-reward margin beta * h, and the number of pairs. ``shares_prompt``: how many
    of the group's pairs have the prompt (its token ids, as truncated) of a trained pair."""

    model: str
    group: str
    n: int
    accuracy: float
    margin: float
    shares_prompt: int = 0


def _checked_state(path: Path, cfg: ExperimentConfig) -> dict:
    """A checkpoint of the main job, after checking it was made with ``cfg``'s model and data (the
    check reads the identity the trainer stores in every checkpoint)."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run `python -m upo_ref.reproduce` for this preset and --out first"
        )
    # Memory-mapped: checking the identity reads none of the tensors, which load_state_dict reads.
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    e = cfg.to_dict()
    made_with = {k: state["identity"].get(k) for k in ("model", "data")}
    if made_with != {k: e[k] for k in ("model", "data")}:
        raise ValueError(
            f"{path} was made with another model or data config than preset {cfg.name!r}:\n  "
            f"checkpoint: {made_with}\n  preset:     "
            f"{ ({k: e[k] for k in ('model', 'data')}) }\npass the --preset (and --smoke) that "
            "wrote this --out, and its --data-seed"
        )
    return state


def _check_overlap_inputs(cfg: ExperimentConfig, n_unused: int | None) -> None:
    if not cfg.sft.n_examples:
        raise ValueError(f"preset {cfg.name!r} has no SFT phase: there is no overlap to check")
    if cfg.data.n_train_pairs is None:
        raise ValueError(
            f"preset {cfg.name!r} uses every training pair for preference training "
            "(n_train_pairs=None): no 'unused' group"
        )
    if n_unused is not None and n_unused < 1:
        raise ValueError(
            f"n_unused must be a positive number of pairs or None (all), got {n_unused}"
        )


def sft_target_flags(cfg: ExperimentConfig, tokenizer, n_unused: int | None) -> list[bool]:
    """For each unused pair that ``prepare_data(cfg, tokenizer, keep_unused=n_unused)`` returns,
    in its order: whether its chosen response is an SFT target (its prompt and chosen texts are an
    SFT example of ``sft_train``). Told by the texts, drawn as ``prepare_data`` draws them:
    truncation makes a pair's prompt tokens depend on its longer response, so its tokens cannot
    tell. The pairs tokenization drops are dropped here too."""
    d, flags = cfg.data, []
    for name in d.datasets:
        train, _ = _text_pairs(cfg, name, [])
        used, unused = _first_and_rest(train, d.n_train_pairs, d.shuffle_seed, f"{name} pairs")
        source = train
        if d.sft_disjoint:
            drawn = {p.prompt for p in used}
            source = [p for p in train if p.prompt not in drawn]
        sft = _first(sft_examples(source), d.n_sft_examples, d.shuffle_seed, f"{name} SFT")
        kept, report, targets = unused[:n_unused], LoadReport(name), set(sft)
        tokenize_pairs(
            kept,
            tokenizer,
            d.max_length,
            d.max_prompt_length,
            TRUNCATION[name],
            report=report,
            keep_identical=d.keep_identical,
        )
        dropped = {o for origins in report.dropped.values() for o in origins}
        flags += [(p.prompt, p.chosen) in targets for p in kept if p.origin not in dropped]
    return flags


def _groups(cfg: ExperimentConfig, data, flags: list[bool] | None) -> dict[str, list]:
    """The groups of pairs, by name. ``flags`` (:func:`sft_target_flags`), given when SFT drew a
    sample of the training prompts (``n_sft_examples``), split the unused pairs by whether their
    chosen response was an SFT target: ``unused-sft`` and ``unused-other`` differ in that alone
    (neither was trained on as pairs)."""
    if flags is None:
        return {"trained": data.pref_train, "unused": data.pref_unused, "eval": data.pref_eval}
    if len(flags) != len(data.pref_unused):  # the two draws of the same pairs disagree
        raise RuntimeError(
            f"{len(flags)} SFT-target flags for {len(data.pref_unused)} unused pairs"
        )
    return {
        "trained": data.pref_train,
        "unused-sft": [p for p, f in zip(data.pref_unused, flags, strict=True) if f],
        "unused-other": [p for p, f in zip(data.pref_unused, flags, strict=True) if not f],
        "eval": data.pref_eval,
    }


def overlap_check(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    n_unused: int | None = None,
    cache_dir: str | Path | None = None,
) -> list[GroupStats]:
    """The check on the finished run of ``cfg`` under ``out_dir`` (CPU); see the module docstring.
    ``n_unused``: how many of the unused training pairs to score (None: all). A partially
    fine-tuned preset scores the top of its model on the trunk's cached states, from
    ``cache_dir`` (default ``out_dir/trunk_cache``, where the run left the states of its trained
    and eval pairs; the unused pairs' are computed and added).

    Rows: pi_ref first (``margin`` is then its mean log pi_ref(y_w) - log pi_ref(y_l) and
    ``accuracy`` its ranking), then every (loss, beta) run, each on every group (``GROUPS``, or
    with the unused pairs split by SFT target when SFT drew a sample of the training prompts).
    """
    out_dir = Path(out_dir)
    _check_overlap_inputs(cfg, n_unused)
    checkpoints = [out_dir / "sft" / CHECKPOINT] + [
        out_dir / run_name(loss_fn.label, beta) / CHECKPOINT for loss_fn, beta in cfg.runs()
    ]
    for path in checkpoints:  # refused before any pass over the data, not after it
        _checked_state(path, cfg)
    tokenizer, data = load_experiment_data(cfg, keep_unused=n_unused)
    if not data.pref_unused:
        raise ValueError(
            f"preset {cfg.name!r} uses every training pair for preference training: no 'unused' "
            "group"
        )
    flags = None if cfg.data.n_sft_examples is None else sft_target_flags(cfg, tokenizer, n_unused)
    groups = {g: pairs for g, pairs in _groups(cfg, data, flags).items() if pairs}
    trained_prompts = {p.prompt for p in groups["trained"]}
    shared = {g: sum(p.prompt in trained_prompts for p in pairs) for g, pairs in groups.items()}
    device, batch = torch.device("cpu"), cfg.pref.eval_batch_size
    model = build_model(cfg.model, data.vocab_size, cfg.data.max_length, eos_id=data.pad_id)
    response_only = head_is_linear_readout(model, data.vocab_size)
    collate = None
    if cfg.model.train_layers is not None:  # the top of the model, on cached trunk states
        cache_dir = Path(cache_dir) if cache_dir else out_dir / "trunk_cache"
        model, groups = cache_trunk(
            model,
            cfg.model.train_layers,
            groups,
            cache_dir,
            data.pad_id,
            batch,
            device,
            precision=cfg.trunk_pass_precision,
            cache_dtype=cfg.cache_dtype,
        )
        collate = functools.partial(collate_cached, pad_id=data.pad_id)

    def logps(pairs):
        # The trainer's batches and precision (train.reference_logps forms the same ones as
        # train.evaluate).
        return reference_logps(
            model,
            pairs,
            batch,
            data.pad_id,
            device,
            cfg.average_logps,
            response_only,
            collate=collate,
            precision=cfg.precision,
        )

    model.load_state_dict(_checked_state(checkpoints[0], cfg)["model"])
    ref = {g: logps(pairs) for g, pairs in groups.items()}
    rows = []
    for g, (rc, rr) in ref.items():
        diff = rc - rr  # (N,)
        rows.append(
            GroupStats(
                "pi_ref",
                g,
                len(diff),
                float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean()),  # ties half
                float(diff.double().mean()),
                shared[g],
            )
        )
    for (loss_fn, beta), path in zip(cfg.runs(), checkpoints[1:], strict=True):
        model.load_state_dict(_checked_state(path, cfg)["model"])
        for g, pairs in groups.items():
            m = preference_metrics(*logps(pairs), *ref[g], beta)
            rows.append(
                GroupStats(
                    f"{loss_fn.label} beta={beta:g}",
                    g,
                    len(pairs),
                    float(m["rewards/accuracies"].double().mean()),
                    float(m["rewards/margins"].double().mean()),
                    shared[g],
                )
            )
    return rows


def unused_against_eval(rows: list[GroupStats]) -> list[tuple[str, int, float, float, float]]:
    """Per model: (model, n, accuracy, difference, SE) of its unused groups pooled (``unused``,
    or ``unused-sft`` and ``unused-other`` together: n pairs, accuracy their pair-weighted mean)
    against its eval pairs. The two are different pairs, so the difference's standard error is
    unpaired, sqrt(SE_unused^2 + SE_eval^2)."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        unused = [r for r in rows if r.model == model and r.group.startswith("unused")]
        (ev,) = [r for r in rows if r.model == model and r.group == "eval"]
        n = sum(r.n for r in unused)
        acc = sum(r.accuracy * r.n for r in unused) / n
        se = math.hypot(binomial_se(acc, n), binomial_se(ev.accuracy, ev.n))
        out.append((model, n, acc, acc - ev.accuracy, se))
    return out


def format_overlap(rows: list[GroupStats]) -> str:
    """Markdown: one row per model, accuracy (+- one binomial standard error) and margin per group;
    then the unused pairs pooled against the eval pairs (:func:`unused_against_eval`) and how many
    pairs of each group have a trained pair's prompt."""
    n = {r.group: r.n for r in rows}
    groups = list(n)
    head = " | ".join(f"{g} acc. ({n[g]} pairs) | {g} margin" for g in groups)
    lines = [f"| model | {head} |", "| --- |" + " ---: |" * (2 * len(groups))]
    for model in dict.fromkeys(r.model for r in rows):
        by = {r.group: r for r in rows if r.model == model}
        cells = []
        for g in groups:
            a = by[g].accuracy
            cells += [f"{a:.3f} +- {binomial_se(a, by[g].n):.3f}", f"{by[g].margin:+.4f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "pi_ref's row: accuracy is P(log pi_ref(y_w|x) > log pi_ref(y_l|x)), margin its mean "
        "log-ratio (nats); the runs' rows: the trainer's implicit-reward accuracy and beta * h.",
        "",
        "| model | unused, all: acc. | unused - eval | unpaired SE | difference / SE |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for model, n_unused, acc, diff, se in unused_against_eval(rows):
        ratio = f"{diff / se:+.2f}" if se > 0 else "n/a"  # both accuracies 0 or 1
        lines.append(
            f"| {model} | {acc:.4f} ({n_unused} pairs) | {diff:+.4f} | {se:.4f} | {ratio} |"
        )
    first = {r.group: r for r in rows if r.model == rows[0].model}
    shares = ", ".join(
        f"{g} {r.shares_prompt} of {r.n}" for g, r in first.items() if g != "trained"
    )
    lines += ["", f"Pairs with the prompt tokens of a trained pair: {shares}."]
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> list[GroupStats]:
    p = argparse.ArgumentParser(
        prog="python -m upo_ref.overlap", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--preset", default="quick", help=f"one of {', '.join(PRESETS)} (default quick)")
    p.add_argument(
        "--smoke", action="store_true", help="the preset's smoke version (as reproduce --smoke)"
    )
    p.add_argument(
        "--data-seed",
        type=whole_number(0),
        metavar="N",
        help="the --data-seed the run was made with (reproduce's option; default the preset's)",
    )
    p.add_argument(
        "--out", help="the run folder reproduce wrote (default runs/<preset>, or -seed<N>)"
    )
    p.add_argument(
        "--n-unused", type=int, help="score only this many unused training pairs (default all)"
    )
    p.add_argument(
        "--trunk-cache",
        help="a partially fine-tuned preset's trunk cache (default <out>/trunk_cache, the run's)",
    )
    p.add_argument(
        "--results",
        help="where to write overlap.md (default: results/<preset>, or --out with --smoke)",
    )
    args = p.parse_args(argv)
    cfg = with_data_seed(get_preset(args.preset), args.data_seed)
    cfg = smoke(cfg) if args.smoke else cfg
    out_dir = Path(args.out) if args.out else REPO_ROOT / "runs" / cfg.name
    threads = torch.get_num_threads()
    if cfg.threads:  # the preset's, as reproduce sets them: the trunk cache's key holds them
        torch.set_num_threads(cfg.threads)
    try:
        rows = overlap_check(cfg, out_dir, args.n_unused, args.trunk_cache)
    finally:
        torch.set_num_threads(threads)
    table = format_overlap(rows)
    results = (
        Path(args.results)
        if args.results
        else (out_dir if args.smoke else REPO_ROOT / "results" / cfg.name)
    )
    results.mkdir(parents=True, exist_ok=True)
    command = "python -m upo_ref.overlap" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    (results / "overlap.md").write_text(
        f"# SFT-overlap check of preset `{cfg.name}`\n\nCommand: `{command}`\n\n{table}\n",
        encoding="utf-8",
    )
    print(f"{table}\n\nwritten to {results / 'overlap.md'}")
    return rows


if __name__ == "__main__":
    main()
