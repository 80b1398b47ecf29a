"""The experiment driver of the language-model pipeline: data, the reference policy, the runs.

``prepare_data`` loads, splits, subsamples and tokenizes the data of an ``ExperimentConfig``;
``prepare_reference`` builds the model, SFTs it and computes the reference log-probs once;
``run_experiment`` trains every preference run of the config (``ExperimentConfig.runs``) from that
reference. A partially fine-tuned model (``ModelConfig.train_layers``) is split instead of SFT'd,
and its frozen trunk's states are cached (``trunk_cache``); its runs train the top from the cache.
``python -m upo_ref.reproduce`` is the command-line front end; ``upo_ref.overlap`` and
``upo_ref.auxiliary.lm`` start from the same data and reference.
"""

from __future__ import annotations

import copy
import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..utils.paths import hh_dir
from .config import ExperimentConfig
from .data import LoadReport, download_hh, load_hh, load_shp, load_trl, shp_files
from .logprobs import head_is_linear_readout
from .models import build_model, default_device, load_tokenizer
from .partial import trainable_parameters
from .split import sft_examples, split_by_prompt_hash
from .synthetic import SyntheticTask
from .tokenize import CompactVocab, TokenizedPair, tokenize_pairs, tokenize_sft
from .train import METRICS, PreferencePhase, SFTPhase, reference_logps, train
from .trunk_cache import CachedPreferencePhase, cache_trunk, collate_cached, model_fingerprint

__all__ = [
    "ExperimentData",
    "prepare_data",
    "load_experiment_data",
    "LogpSettings",
    "Reference",
    "prepare_reference",
    "run_name",
    "RunResult",
    "run_experiment",
]

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


def run_name(label: str, beta: float) -> str:
    """The folder of the run of loss ``label`` at ``beta`` under an experiment's output folder,
    e.g. ``js-iupo_beta0.1``, ``js-iupo-kkt_beta0.1`` (for the label ``JS-IUPO (kkt)``)."""
    label = label.lower().replace(" (", "-").replace(")", "").replace(" ", "-")
    return f"{label}_beta{beta:g}"


@dataclass(frozen=True)
class RunResult:
    """One preference run: its loss label, beta, final eval metrics, where its metrics are, how
    many eval pairs the metrics average over, and its wall-clock seconds."""

    label: str
    beta: float
    final: dict[str, float]
    metrics_path: Path
    n_eval: int | None = None
    wall_s: float | None = None

    @property
    def name(self) -> str:
        return run_name(self.label, self.beta)


@dataclass(frozen=True)
class LogpSettings:
    """How every phase started from one reference computes a sequence's log pi(y|x): the padding id,
    the per-token mean instead of the sum (``average``), logits on response tokens only
    (``response_only``), and the forward passes' ``precision`` (``phases.autocast``).
    ``as_kwargs()`` gives them as ``SFTPhase`` / ``PreferencePhase`` take them."""

    pad_id: int
    average: bool
    response_only: bool
    precision: str = "auto"

    def as_kwargs(self) -> dict:
        return {
            "pad_id": self.pad_id,
            "average": self.average,
            "response_only": self.response_only,
            "precision": self.precision,
        }


@dataclass
class Reference:
    """The reference policy pi_ref (the SFT model, or the model as built when SFT is skipped) and
    what every preference run started from it shares.

    ``reference``: log pi_ref(y_w|x), log pi_ref(y_l|x) per split, for ``PreferencePhase``;
    ``logps``: how log-probs are computed (:class:`LogpSettings`); ``identity``: what a checkpoint
    of a run must have been made with to be resumed (model, data, SFT phase, ``average_logps``,
    ``precision``). ``pairs``: the train and eval pairs of the preference runs (for a partially
    fine-tuned model, ``trunk_cache.CachedPair``s, with ``phase`` = ``CachedPreferencePhase``);
    ``timings``: seconds spent on the trunk cache (``trunk_s``) and the reference log-probs
    (``reference_s``).
    """

    model: torch.nn.Module
    reference: dict[str, tuple[torch.Tensor, torch.Tensor]]
    logps: LogpSettings
    identity: dict
    sft_final: dict[str, float]
    pairs: dict[str, list] = field(default_factory=dict)
    phase: type = PreferencePhase
    timings: dict[str, float] = field(default_factory=dict)


def load_experiment_data(cfg: ExperimentConfig, keep_unused: int | None = 0):
    """(tokenizer, data) of ``cfg`` (no tokenizer for the synthetic task), with the loaders' reports
    printed."""
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
    cache_dir: str | Path | None = None,
) -> Reference:
    """Steps 2-3 of the main job: build the model, SFT it (checkpoints under ``out_dir/sft``), and
    compute pi_ref's log-probs of the train and eval pairs once. With ``cfg.model.train_layers``
    the model is split instead and its trunk's states cached in ``cache_dir`` (default
    ``out_dir/trunk_cache``)."""
    out_dir = Path(out_dir)
    model = build_model(cfg.model, data.vocab_size, cfg.data.max_length, eos_id=data.pad_id)
    response_only = head_is_linear_readout(model, data.vocab_size)
    model.to(
        device
    )  # also when SFT is skipped: the reference log-probs come from the model as built
    print(
        f"model {cfg.model.name_or_path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, device {device}, logits on response tokens only: {response_only}"
    )
    logps = LogpSettings(data.pad_id, cfg.average_logps, response_only, cfg.precision)
    # What a checkpoint must have been made with to be resumed: SFT depends on the model, the data
    # and its own phase; a preference run also on the preference phase, the loss and beta.
    e = cfg.to_dict()
    identity = {k: e[k] for k in ("model", "data", "sft", "average_logps", "precision")}
    pairs = {"train": data.pref_train, "eval": data.pref_eval}
    phase, timings = PreferencePhase, {}

    sft_final: dict[str, float] = {}
    if cfg.model.train_layers is not None:
        identity["weights"] = model_fingerprint(model)  # the model file, not only its name
        identity["cache_dtype"] = cfg.cache_dtype
        cache_dir = Path(cache_dir) if cache_dir else out_dir / "trunk_cache"
        model, pairs, timings["trunk_s"] = _split_and_cache(
            cfg, model, pairs, cache_dir, data.pad_id, device
        )
        phase = CachedPreferencePhase
    elif cfg.sft.n_examples:
        sft_final = train(
            model,
            SFTPhase(**logps.as_kwargs()),
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
    partial = cfg.model.train_layers is not None
    collate = functools.partial(collate_cached, pad_id=data.pad_id) if partial else None
    batch, kw = cfg.pref.eval_batch_size, dict(collate=collate, precision=cfg.precision)
    reference = {
        split: reference_logps(
            model, ps, batch, data.pad_id, device, cfg.average_logps, response_only, **kw
        )
        for split, ps in pairs.items()
    }
    timings["reference_s"] = time.perf_counter() - t0
    print(
        f"reference log-probs of {len(pairs['train'])} + {len(pairs['eval'])} pairs computed "
        f"once ({timings['reference_s']:.0f}s)"
    )
    return Reference(model, reference, logps, identity, sft_final, pairs, phase, timings)


def _split_and_cache(cfg: ExperimentConfig, model, pairs: dict, cache_dir: Path, pad_id, device):
    """(the top of ``model``, ``pairs`` with the trunk's cached states, the seconds it took)."""
    t0 = time.perf_counter()
    top, cached = cache_trunk(
        model,
        cfg.model.train_layers,
        pairs,
        cache_dir,
        pad_id,
        cfg.pref.eval_batch_size,
        device,
        cfg.precision,
        cfg.cache_dtype,
    )
    seconds = time.perf_counter() - t0
    print(
        f"trunk states of {len(cached['train'])} + {len(cached['eval'])} pairs cached "
        f"({seconds:.0f}s); training the top {cfg.model.train_layers} layers, "
        f"{trainable_parameters(top) / 1e6:.2f}M parameters"
    )
    return top, cached, seconds


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    device: torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
) -> tuple[dict[str, float], list[RunResult], dict[str, float]]:
    """SFT once, then every run of ``cfg.runs()``; returns (final SFT eval metrics, the runs'
    results, the seconds spent on the trunk cache and the reference log-probs)."""
    out_dir = Path(out_dir)
    device = device if device is not None else default_device()
    _, data = load_experiment_data(cfg)
    ref = prepare_reference(cfg, data, out_dir, device, resume, progress)
    pref_config = cfg.to_dict()["pref"]
    results = []
    for loss_fn, beta in cfg.runs():
        policy = copy.deepcopy(ref.model)
        phase = ref.phase(
            loss_fn, beta, ref.reference, **ref.logps.as_kwargs(), starts_at_reference=True
        )
        run_dir = out_dir / run_name(loss_fn.label, beta)
        t0 = time.perf_counter()
        final = train(
            policy,
            phase,
            ref.pairs["train"],
            ref.pairs["eval"],
            cfg.pref,
            run_dir,
            device,
            resume,
            progress,
            desc=f"{loss_fn.label} beta={beta:g}",
            identity={**ref.identity, "pref": pref_config, "loss": loss_fn.label, "beta": beta},
        )
        wall_s = time.perf_counter() - t0
        n_eval = len(ref.pairs["eval"])
        results.append(RunResult(loss_fn.label, beta, final, run_dir / METRICS, n_eval, wall_s))
        del policy
    return ref.sft_final, results, ref.timings
