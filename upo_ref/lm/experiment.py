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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ExperimentConfig
from .experiment_data import (  # re-exported: the data half of the driver lives there
    TRUNCATION,
    ExperimentData,
    prepare_data,
)
from .logprobs import head_is_linear_readout
from .models import build_model, default_device, load_tokenizer
from .partial import trainable_parameters
from .train import METRICS, PreferencePhase, SFTPhase, reference_logps, train
from .trunk_cache import (
    CachedPreferencePhase,
    CachedSFTPhase,
    cache_trunk,
    collate_cached,
    model_fingerprint,
)

__all__ = [
    "TRUNCATION",
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
    phase, sft_phase, timings = PreferencePhase, SFTPhase, {}
    sft_sets = (data.sft_train, data.sft_eval)
    if cfg.model.train_layers is not None:
        identity["weights"] = model_fingerprint(model)  # the model file, not only its name
        identity["cache_dtype"] = cfg.cache_dtype
        identity["trunk_precision"] = cfg.trunk_pass_precision
        cache_dir = Path(cache_dir) if cache_dir else out_dir / "trunk_cache"
        targets = {"sft_train": data.sft_train, "sft_eval": data.sft_eval}
        model, cached, timings["trunk_s"] = _split_and_cache(
            cfg, model, pairs, targets if cfg.sft.n_examples else {}, cache_dir, data.pad_id, device
        )
        pairs = {split: cached[split] for split in pairs}
        if cfg.sft.n_examples:
            sft_sets = (cached["sft_train"], cached["sft_eval"])
        phase, sft_phase = CachedPreferencePhase, CachedSFTPhase

    sft_final: dict[str, float] = {}
    if cfg.sft.n_examples:
        t0 = time.perf_counter()
        sft_final = train(
            model,
            sft_phase(**logps.as_kwargs()),
            *sft_sets,
            cfg.sft,
            out_dir / "sft",
            device,
            resume,
            progress,
            desc="SFT",
            identity=identity,
        )
        timings["sft_s"] = time.perf_counter() - t0

    reference, timings["reference_s"] = _reference_logps(cfg, model, pairs, logps, device)
    return Reference(model, reference, logps, identity, sft_final, pairs, phase, timings)


def _reference_logps(cfg: ExperimentConfig, model, pairs: dict, logps: LogpSettings, device):
    """({split: pi_ref's log-probs of its pairs}, the seconds it took), in the batches and the
    precision of the preference phase (cached trunk states for a partially fine-tuned model)."""
    t0 = time.perf_counter()
    partial = cfg.model.train_layers is not None
    collate = functools.partial(collate_cached, pad_id=logps.pad_id) if partial else None
    batch, kw = cfg.pref.eval_batch_size, dict(collate=collate, precision=logps.precision)
    reference = {
        split: reference_logps(
            model, ps, batch, logps.pad_id, device, logps.average, logps.response_only, **kw
        )
        for split, ps in pairs.items()
    }
    seconds = time.perf_counter() - t0
    print(
        f"reference log-probs of {len(pairs['train'])} + {len(pairs['eval'])} pairs computed "
        f"once ({seconds:.0f}s)"
    )
    return reference, seconds


def _split_and_cache(
    cfg: ExperimentConfig, model, pairs: dict, targets: dict, cache_dir: Path, pad_id, device
):
    """(the top of ``model``, ``pairs`` and the SFT sets ``targets`` with the trunk's cached
    states, by name, the seconds it took)."""
    t0 = time.perf_counter()
    top, cached = cache_trunk(
        model,
        cfg.model.train_layers,
        pairs,
        cache_dir,
        pad_id,
        cfg.pref.eval_batch_size,
        device,
        targets=targets,
        precision=cfg.trunk_pass_precision,
        cache_dtype=cfg.cache_dtype,
    )
    seconds = time.perf_counter() - t0
    sft = ""
    if targets:
        sft = f" and {len(cached['sft_train'])} + {len(cached['sft_eval'])} SFT examples"
    print(
        f"trunk states of {len(cached['train'])} + {len(cached['eval'])} pairs{sft} cached "
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
    cache_dir: str | Path | None = None,
) -> tuple[dict[str, float], list[RunResult], dict[str, float]]:
    """SFT once, then every run of ``cfg.runs()``; returns (final SFT eval metrics, the runs'
    results, the seconds spent on the trunk cache and the reference log-probs). ``cache_dir``:
    where a partially fine-tuned model's trunk cache lives (``prepare_reference``)."""
    out_dir = Path(out_dir)
    device = device if device is not None else default_device()
    _, data = load_experiment_data(cfg)
    ref = prepare_reference(cfg, data, out_dir, device, resume, progress, cache_dir)
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
