"""The experiment driver of the language-model pipeline: data, the reference policy, the runs.

``prepare_data`` loads, splits, subsamples and tokenizes the data of an ``ExperimentConfig``;
``prepare_reference`` builds the model, SFTs it and computes the reference log-probs once;
``run_experiment`` trains one preference run per (loss, beta) of the config from that reference.
``python -m upo_ref.reproduce`` is the command-line front end; ``upo_ref.overlap`` and
``upo_ref.auxiliary.lm`` start from the same data and reference.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..utils.paths import hh_dir
from .config import ExperimentConfig
from .data import (
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
from .logprobs import head_is_linear_readout
from .models import build_model, default_device, load_tokenizer
from .partial import trainable_parameters
from .synthetic import SyntheticTask
from .train import PreferencePhase, SFTPhase, reference_logps, train
from .trunk_cache import CachedPreferencePhase, cache_trunk, model_fingerprint

__all__ = [
    "ExperimentData",
    "prepare_data",
    "load_experiment_data",
    "Reference",
    "prepare_reference",
    "RunResult",
    "run_experiment",
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
    wall_s: float | None = None

    @property
    def name(self) -> str:
        """The run's folder name, e.g. ``js-iupo_beta0.1``, ``js-iupo-kkt_beta0.1``."""
        label = self.label.lower().replace(" (", "-").replace(")", "").replace(" ", "-")
        return f"{label}_beta{self.beta:g}"


@dataclass
class Reference:
    """The reference policy pi_ref (the SFT model, or the model as built when SFT is skipped) and what every
    preference run started from it shares.

    ``reference``: log pi_ref(y_w|x), log pi_ref(y_l|x) per split, for ``PreferencePhase``; ``common``: the
    phase keyword arguments (``pad_id``, ``average``, ``response_only``); ``identity``: what a checkpoint of
    a run must have been made with to be resumed (model, data, SFT phase, ``average_logps``).
    ``pairs``: the train and eval pairs of the preference runs (for a partially fine-tuned model,
    ``trunk_cache.CachedPair``s, with ``phase`` = ``CachedPreferencePhase``); ``timings``: seconds
    spent on the trunk cache (``trunk_s``) and the reference log-probs (``reference_s``).
    """

    model: torch.nn.Module
    reference: dict[str, tuple[torch.Tensor, torch.Tensor]]
    common: dict
    identity: dict
    sft_final: dict[str, float]
    pairs: dict[str, list] = field(default_factory=dict)
    phase: type = PreferencePhase
    timings: dict[str, float] = field(default_factory=dict)


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
    cache_dir: str | Path | None = None,
) -> Reference:
    """Steps 2-3 of the main job: build the model, SFT it (checkpoints under ``out_dir/sft``), and
    compute pi_ref's log-probs of the train and eval pairs once. With ``cfg.model.train_layers`` the
    model is split instead and its trunk's states cached in ``cache_dir`` (default
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
    common = dict(
        pad_id=data.pad_id,
        average=cfg.average_logps,
        response_only=response_only,
        precision=cfg.precision,
    )
    # What a checkpoint must have been made with to be resumed: SFT depends on the model, the data and
    # its own phase; a preference run also on the preference phase, the loss and beta.
    e = cfg.to_dict()
    identity = {k: e[k] for k in ("model", "data", "sft", "average_logps", "precision")}
    pairs = {"train": data.pref_train, "eval": data.pref_eval}
    phase, timings = PreferencePhase, {}
    batch = cfg.pref.eval_batch_size

    sft_final: dict[str, float] = {}
    if cfg.model.train_layers is not None:
        identity["weights"] = model_fingerprint(model)  # the model file, not only its name
        identity["cache_dtype"] = cfg.cache_dtype
        t0 = time.perf_counter()
        model, pairs = cache_trunk(
            model,
            cfg.model.train_layers,
            pairs,
            Path(cache_dir) if cache_dir else out_dir / "trunk_cache",
            data.pad_id,
            batch,
            device,
            cfg.precision,
            cfg.cache_dtype,
        )
        phase, timings["trunk_s"] = CachedPreferencePhase, time.perf_counter() - t0
        print(
            f"trunk states of {len(pairs['train'])} + {len(pairs['eval'])} pairs cached "
            f"({timings['trunk_s']:.0f}s); training the top {cfg.model.train_layers} layers, "
            f"{trainable_parameters(model) / 1e6:.2f}M parameters"
        )
    elif cfg.sft.n_examples:
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
    collate = phase(None, 0.0, {}, **common).collate
    reference = {
        split: reference_logps(
            model,
            ps,
            batch,
            data.pad_id,
            device,
            cfg.average_logps,
            response_only,
            collate,
            cfg.precision,
        )
        for split, ps in pairs.items()
    }
    timings["reference_s"] = time.perf_counter() - t0
    print(
        f"reference log-probs of {len(pairs['train'])} + {len(pairs['eval'])} pairs computed once "
        f"({timings['reference_s']:.0f}s)"
    )
    return Reference(model, reference, common, identity, sft_final, pairs, phase, timings)


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
    e = cfg.to_dict()
    results = []
    for loss_fn, beta in cfg.runs():
        policy = copy.deepcopy(ref.model)
        phase = ref.phase(loss_fn, beta, ref.reference, **ref.common, starts_at_reference=True)
        result = RunResult(loss_fn.label, beta, {}, Path(), len(ref.pairs["eval"]))
        run_dir = out_dir / result.name
        t0 = time.perf_counter()
        result.final = train(
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
            identity={**ref.identity, "pref": e["pref"], "loss": loss_fn.label, "beta": beta},
        )
        result.metrics_path = run_dir / "metrics.jsonl"
        result.wall_s = time.perf_counter() - t0
        results.append(result)
        del policy
    return ref.sft_final, results, ref.timings
