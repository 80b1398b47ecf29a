"""The data of an experiment: ``prepare_data`` loads, splits, subsamples and tokenizes the
preference and SFT sets of an ``ExperimentConfig`` (HH, SHP, TRL-format files, or the synthetic
task), with the loaders' reports. ``lm.experiment`` builds the reference and the runs on them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.paths import hh_dir
from .config import ExperimentConfig
from .data import LoadReport, download_hh, load_hh
from .data_shp import load_shp, shp_files
from .data_trl import load_trl
from .split import sft_examples, split_by_prompt_hash
from .synthetic import SyntheticTask
from .tokenize import CompactVocab, TokenizedPair, tokenize_pairs, tokenize_sft

__all__ = ["TRUNCATION", "ExperimentData", "prepare_data"]

TRUNCATION = {"hh": "keep_end", "shp": "keep_start", "trl": "keep_end"}  # keep the turn answered


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
        pairs, report = load_hh(root, "test", d.hh_subsets, True, d.keep_identical)
        train, held_out = split_by_prompt_hash(pairs, d.eval_fraction)
        reports += [
            str(report),
            f"HH split by prompt hash (eval_fraction {d.eval_fraction}): {len(train)} train / "
            f"{len(held_out)} eval pairs",
        ]
        return train, held_out
    splits = []
    for split in ("train", "test"):
        if not all((root / s / f"{split}.jsonl.gz").is_file() for s in d.hh_subsets):
            print(f"downloading the official HH {split} files into {root} ...", flush=True)
            download_hh(root, split, d.hh_subsets)
        pairs, report = load_hh(root, split, d.hh_subsets, True, d.keep_identical)
        reports.append(str(report))
        splits.append(pairs)
    return splits[0], splits[1]


def _trl_pairs(cfg: ExperimentConfig, reports: list[str]):
    d = cfg.data
    pairs, report = load_trl(d.trl_train, d.keep_identical)
    reports.append(str(report))
    if d.trl_eval is not None:
        held_out, eval_report = load_trl(d.trl_eval, d.keep_identical)
        reports.append(str(eval_report))
        return pairs, held_out
    train, held_out = split_by_prompt_hash(pairs, d.eval_fraction)
    reports.append(f"{d.trl_train} split by prompt hash: {len(train)} train / {len(held_out)} eval")
    return train, held_out


def _synthetic_data(d, reports: list[str]) -> ExperimentData:
    if d.n_train_pairs is None or d.n_eval_pairs is None:
        raise ValueError(
            "the synthetic task draws as many pairs as asked: set n_train_pairs and n_eval_pairs"
        )
    task = SyntheticTask(seed=d.shuffle_seed)
    train, held_out = task.pairs(d.n_train_pairs, stream=0), task.pairs(d.n_eval_pairs, stream=1)
    reports.append(
        f"synthetic task: {len(train)} train / {len(held_out)} eval pairs, vocab {task.vocab_size}"
    )
    return ExperimentData(train, held_out, train, held_out, task.vocab_size, task.eos_id, reports)


def _text_pairs(cfg: ExperimentConfig, name: str, reports: list[str]):
    """(train, held-out) pairs of dataset ``name`` ('hh', 'trl' or 'shp'); appends the loaders'
    reports."""
    if name == "hh":
        return _hh_pairs(cfg, reports)
    if name == "trl":
        return _trl_pairs(cfg, reports)
    d = cfg.data
    if d.shp_dir is None:
        raise ValueError(
            "dataset 'shp' needs shp_dir (--shp-dir), a folder of <subreddit>/{train,test}.json"
        )
    train, r1 = load_shp(shp_files(d.shp_dir, "train"), keep_identical=d.keep_identical)
    held_out, r2 = load_shp(shp_files(d.shp_dir, "test"), keep_identical=d.keep_identical)
    reports += [str(r1), str(r2)]
    return train, held_out


def _tokenize_dataset(
    cfg: ExperimentConfig, name: str, tokenizer, keep_unused, out: dict, reports: list[str]
) -> None:
    """Draw, tokenize and append dataset ``name``'s preference and SFT sets to ``out``."""
    d, seed = cfg.data, cfg.data.shuffle_seed
    train, held_out = _text_pairs(cfg, name, reports)
    lengths = dict(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation_mode=TRUNCATION[name],
    )
    tokenized = LoadReport(f"{name} pairs tokenized (max_length {d.max_length})")
    pair_args = dict(**lengths, report=tokenized, keep_identical=d.keep_identical)
    used, unused = _first_and_rest(train, d.n_train_pairs, seed, f"{name} train pairs")
    out["pref_train"] += tokenize_pairs(used, tokenizer, **pair_args)
    if keep_unused != 0:
        out["pref_unused"] += tokenize_pairs(unused[:keep_unused], tokenizer, **pair_args)
    out["pref_eval"] += tokenize_pairs(
        _first(held_out, d.n_eval_pairs, seed, f"{name} eval pairs"), tokenizer, **pair_args
    )
    sft_source = train
    if d.sft_disjoint:  # the control: no SFT target is the chosen response of a preference pair
        drawn = {p.prompt for p in used}
        sft_source = [p for p in train if p.prompt not in drawn]
        reports.append(
            f"{name} SFT disjoint from preference training: SFT draws from the "
            f"{len(sft_source)} of {len(train)} training pairs whose prompt no "
            "preference-training pair has"
        )
    sft_train = _first(sft_examples(sft_source), d.n_sft_examples, seed, f"{name} SFT examples")
    out["sft_train"] += tokenize_sft(sft_train, tokenizer, **lengths)
    sft_eval = _first(sft_examples(held_out), d.n_eval_pairs, seed, f"{name} SFT eval")
    out["sft_eval"] += tokenize_sft(sft_eval, tokenizer, **lengths)
    if tokenized.dropped:
        reports.append(str(tokenized))


def prepare_data(
    cfg: ExperimentConfig, tokenizer=None, keep_unused: int | None = 0
) -> ExperimentData:
    """Load, split, subsample and tokenize the data of ``cfg`` (``tokenizer`` is unused for
    synthetic).

    ``keep_unused``: also tokenize the first that many of the training pairs not drawn for
    preference training, None for all of them (``ExperimentData.pref_unused``; they change nothing
    else, the vocabulary included)."""
    d, reports = cfg.data, []
    if d.datasets == ("synthetic",):
        return _synthetic_data(d, reports)
    out = {"sft_train": [], "sft_eval": [], "pref_train": [], "pref_eval": [], "pref_unused": []}
    for name in d.datasets:
        _tokenize_dataset(cfg, name, tokenizer, keep_unused, out, reports)
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
        f"compact vocabulary of {vocab.size} ids (the {vocab.size - 2} most frequent training "
        f"tokens, EOS, UNK): {cover['pref_train']:.1%} of the train and {cover['pref_eval']:.1%} "
        "of the eval response tokens are not UNK"
    )
    return ExperimentData(**out, vocab_size=vocab.size, pad_id=vocab.eos_id, reports=reports)
