r"""Training: an SFT phase and a preference phase, one short loop, checkpoints that resume exactly.

The loop (:func:`train`) knows nothing about losses. A *phase* turns a batch into per-example
losses (B,) and metrics (B,) each:

* :class:`SFTPhase`: the loss is -log pi(y|x) of the SFT target (summed over its tokens, as in the
  DPO reference code; ``average=True`` for the per-token mean);
* :class:`PreferencePhase`: computes log pi(y_w|x), log pi(y_l|x) in one concatenated forward pass,
  looks up log pi_ref(y_w|x), log pi_ref(y_l|x) (computed once, before training, by
  :func:`reference_logps`), and calls ``loss_fn(pc, pr, rc, rr, beta) -> (B,)``, a
  ``losses.PreferenceLoss`` or any callable of that signature. A loss that also needs per-pair
  data (e.g. auxiliary-objective UPO: a preference loss plus gamma times an advantage-weighted
  log-likelihood of each response, with auxiliary rewards R(x, y_w), R(x, y_l) and values V(x))
  sets the attribute ``takes_batch = True``; it is then called with ``batch=`` as well, in which
  the phase has put the pairs' entries of every per-pair tensor of ``extras`` (looked up by
  index, exactly like the reference log-probs). Such a loss may also have a method
  ``metrics(pc, pr, rc, rr, beta, batch=batch) -> {name: (B,)}``: its per-example metrics (e.g. the
  two terms of a combined loss) are logged with the phase's own.

The loop: examples are drawn in a fixed order (epoch e is a permutation of the training set seeded
by (seed, e)), so the position in the stream, ``examples_seen``, fixes everything that comes next.
Each step: linear-warmup learning rate, gradient accumulation over microbatches, gradient norm
clipped at ``max_grad_norm``, one optimiser step. Evaluation (mean of every metric over the whole
eval set) runs at 0, after every step that crosses a multiple of ``eval_every`` examples, and at
the end; after each, a checkpoint (model, optimiser, examples_seen, step, RNG state) replaces the
previous one. Metrics go to a JSON-lines file, one object per line with ``split``
("train"/"eval") and ``examples_seen``.

Resuming from a checkpoint restores all of that state and cuts the metrics file back to the
checkpoint, so an interrupted-and-resumed run writes the same metrics as an uninterrupted one
(bit for bit on a CPU; keys under ``time/`` are wall-clock and differ). The folder's files
(``runfiles``): a lock held while training (a second run on the folder refuses, naming the first),
metrics appended one fsync'ed line at a time (a partial last line from a crash is dropped on
resume, with a warning), a checkpoint replaced atomically. A checkpoint resumes only into the run it
was made by: its identity holds the phase config, the fingerprints of the training and eval data
(``tokenize.fingerprint``), and what the caller adds; a mismatch names the fields that differ.
Every resume error names the file and the fix (start that run over).

A non-finite loss or gradient norm stops the run *before* the optimiser step, with
:class:`NonFiniteLossError`; the checkpoint on disk is the last good one. The log-probs are checked
where they enter the loss (the public losses and ``preference_metrics`` check their inputs), the
loss once per microbatch here. Precision: the model's weights must be float32 (a bf16/fp16 model is
refused, not silently trained in half precision); on CUDA, forward passes run under bf16 autocast,
and the log-softmax, log-probs and losses are computed in float32.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..divergences import Divergence
from ..losses import preference_metrics
from .config import PhaseConfig
from .logprobs import IGNORE_INDEX, concatenated_logps, sequence_logps
from .runfiles import (
    CHECKPOINT,
    METRICS,
    RunFolderError,
    append_record,
    check_no_orphan_metrics,
    read_metrics,
    resume_state,
    run_lock,
    save_state,
    write_metrics,
)
from .tokenize import TokenizedPair, collate_pairs, collate_sequences, fingerprint

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "NonFiniteLossError",
    "RunFolderError",
    "SFTPhase",
    "PreferencePhase",
    "ReferenceLogps",
    "reference_logps",
    "example_indices",
    "evaluate",
    "train",
    "read_metrics",
]


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/inf loss or gradient norm and stopped before updating the model."""


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (float32 throughout)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _check_float32(model) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise ValueError(
            f"the model's weights are {sorted(map(str, dtypes))}; the trainer needs float32 "
            "weights (half-precision weights would be updated, and log-probs computed, in that "
            "precision). Load the model in float32 (models.build_model does); on CUDA forward "
            "passes run under bf16 autocast with the log-softmax in float32"
        )


def _check_finite(what: str, *tensors: Tensor) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteLossError(f"non-finite {what} ({t.detach().flatten()[:4].tolist()} ...)")


# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------


@dataclass
class SFTPhase:
    """Supervised fine-tuning on (x, y) = (prompt, chosen) of each example: loss -log pi(y|x), (B,)
    per batch."""

    pad_id: int
    average: bool = False
    response_only: bool = True
    name: str = "sft"

    def collate(
        self, examples: Sequence[TokenizedPair], indices: Sequence[int]
    ) -> dict[str, Tensor]:
        batch = collate_sequences(
            [(e.prompt, e.chosen) for e in examples], self.pad_id
        )  # (B, T) each
        batch["index"] = torch.tensor(list(indices), dtype=torch.long)  # (B,)
        return batch

    def losses(
        self, model, batch: dict[str, Tensor], split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logps = sequence_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            self.average,
            self.response_only,
        )  # (B,)
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)  # (B,)
        return -logps, {"logps/chosen": logps.detach(), "nll_per_token": -logps.detach() / n_tokens}

    def check_data(self, split: str, examples: Sequence[TokenizedPair]) -> None:
        """Nothing to check: SFT needs no per-example data beyond the examples."""


@dataclass
class PreferencePhase:
    """Preference optimisation with ``loss_fn(pc, pr, rc, rr, beta) -> (B,)`` against fixed pi_ref.

    ``reference[split]`` = (log pi_ref(y_w|x), log pi_ref(y_l|x)), each (N,) over that split's
    pairs, from :func:`reference_logps`. ``extras[split][name]``: further per-pair tensors (N,) that
    a loss with ``takes_batch = True`` finds in ``batch[name]`` (B,); its ``metrics`` method, if it
    has one, adds per-example metrics (names must not clash with the phase's). ``divergence``: the f
    of the ``scores/*`` metrics (defaults to the loss's own, reverse KL for DPO/IPO).
    """

    loss_fn: Callable[..., Tensor]
    beta: float
    reference: dict[str, tuple[Tensor, Tensor]]
    pad_id: int
    average: bool = False
    response_only: bool = True
    divergence: Divergence | str | None = None
    extras: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    name: str = "preference"

    def collate(self, pairs: Sequence[TokenizedPair], indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_pairs(pairs, indices, self.pad_id)  # (2B, T) each, index (B,)

    def losses(
        self, model, batch: dict[str, Tensor], split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        pc, pr = concatenated_logps(model, batch, self.average, self.response_only)  # (B,), (B,)
        ref_chosen, ref_rejected = self.reference[split]
        index = batch["index"].cpu()  # (B,)
        rc, rr = ref_chosen[index].to(pc.device), ref_rejected[index].to(pc.device)  # (B,), (B,)
        takes_batch = getattr(self.loss_fn, "takes_batch", False)
        if takes_batch:
            batch = {
                **batch,
                **{k: v[index].to(pc.device) for k, v in self.extras.get(split, {}).items()},
            }
            losses = self.loss_fn(pc, pr, rc, rr, self.beta, batch=batch)
        else:
            losses = self.loss_fn(pc, pr, rc, rr, self.beta)  # (B,)
        divergence = (
            self.divergence
            if self.divergence is not None
            else getattr(self.loss_fn, "divergence", None)
        )
        metrics = preference_metrics(pc.detach(), pr.detach(), rc, rr, self.beta, divergence)
        metrics["logps/chosen"], metrics["logps/rejected"] = pc.detach(), pr.detach()
        if takes_batch and hasattr(self.loss_fn, "metrics"):
            with torch.no_grad():
                own = self.loss_fn.metrics(
                    pc.detach(), pr.detach(), rc, rr, self.beta, batch=batch
                )  # {name: (B,)}
            clash = sorted(set(own) & set(metrics))
            if clash:
                raise ValueError(
                    f"the loss's metrics {clash} clash with the preference phase's; rename them"
                )
            metrics.update(own)
        return losses, metrics

    def check_data(self, split: str, pairs: Sequence[TokenizedPair]) -> None:
        """The pairs of ``split`` must be those its reference log-probs were computed for: the same
        number, and, for a :class:`ReferenceLogps`, the same fingerprint."""
        if split not in self.reference:
            raise ValueError(
                f"no reference log-probs for the {split!r} split; give reference={{{split!r}: "
                f"reference_logps(model, <its pairs>, ...)}}"
            )
        ref = self.reference[split]
        fix = f"compute them with reference_logps(pi_ref, <the {split} pairs>, ...)"
        if len(ref[0]) != len(pairs):
            raise ValueError(
                f"the {split} set has {len(pairs)} pairs but its reference log-probs were computed "
                f"for {len(ref[0])}; {fix}"
            )
        expected = getattr(ref, "pairs", None)
        if expected is not None and expected != fingerprint(pairs):
            raise ValueError(
                f"the {split} set is not the one its reference log-probs were computed for (same "
                f"size, {len(pairs)}, other pairs); {fix}"
            )


class ReferenceLogps(tuple):
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)), each (N,), and ``pairs``, the fingerprint
    (``tokenize.fingerprint``) of the N pairs they were computed for, which
    :meth:`PreferencePhase.check_data` holds a split's pairs against."""

    def __new__(cls, chosen: Tensor, rejected: Tensor, pairs: str):
        self = super().__new__(cls, (chosen, rejected))
        self.pairs = pairs
        return self


@torch.no_grad()
def reference_logps(
    model,
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    average: bool = False,
    response_only: bool = True,
) -> tuple[Tensor, Tensor]:
    """log pi_ref(y_w|x) and log pi_ref(y_l|x) of every pair, each (N,), float32 on the CPU, as a
    :class:`ReferenceLogps` that remembers which pairs they belong to.

    Computed once, before preference training, with the model in eval mode, in consecutive batches
    of ``batch_size`` (the same batches :func:`evaluate` forms, so that at step 0, where pi =
    pi_ref, the eval margins are exactly 0).
    """
    _check_float32(model)
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        idx = range(start, min(start + batch_size, len(pairs)))
        batch = _to(collate_pairs([pairs[i] for i in idx], idx, pad_id), device)
        with autocast(device):
            pc, pr = concatenated_logps(model, batch, average, response_only)  # (b,), (b,)
        chosen.append(pc.float().cpu())
        rejected.append(pr.float().cpu())
    model.train(was_training)
    out = ReferenceLogps(torch.cat(chosen), torch.cat(rejected), fingerprint(pairs))  # (N,) each
    _check_finite("reference log-probs", *out)
    return out


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([seed, epoch]).permutation(n).tolist())


def example_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions start .. start+count-1 of the training stream over a dataset of n examples.

    The stream is epoch 0, epoch 1, ... where epoch e is a permutation of range(n) fixed by
    (seed, e): a pure function of the position, which is all a checkpoint needs to store.
    """
    if n < 1:
        raise ValueError("the training set is empty")
    return [_epoch_permutation(n, seed, pos // n)[pos % n] for pos in range(start, start + count)]


def evaluate(
    model, phase, eval_set: Sequence[TokenizedPair], batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean loss and mean of every metric over the whole eval set, in consecutive batches."""
    if not eval_set:
        raise ValueError("the eval set is empty")
    phase.check_data("eval", eval_set)
    return _evaluate(model, phase, eval_set, batch_size, device)


@torch.no_grad()
def _evaluate(model, phase, eval_set, batch_size: int, device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    for start in range(0, len(eval_set), batch_size):
        idx = range(start, min(start + batch_size, len(eval_set)))
        batch = _to(phase.collate([eval_set[i] for i in idx], idx), device)  # (b or 2b, T) each
        with autocast(device):
            losses, metrics = phase.losses(model, batch, "eval")  # (b,), {name: (b,)}
        _add_sums(sums, {"loss": losses, **metrics})
    model.train(was_training)
    totals = torch.stack(list(sums.values())).tolist()  # the one host sync
    means = {k: v / len(eval_set) for k, v in zip(sums, totals, strict=True)}
    if not math.isfinite(means["loss"]):
        raise NonFiniteLossError(f"non-finite eval loss ({means['loss']})")
    return means


def _add_sums(sums: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    """sums[k] += values[k].sum() in float64, on the device: no host sync until the caller's one.
    (float64, so the totals equal those of Python floats added one batch at a time.)"""
    for k, v in values.items():
        total = v.detach().sum().double()  # ()
        sums[k] = sums[k] + total if k in sums else total


def _make_optimizer(model, cfg: PhaseConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr)  # the DPO reference code's choice
    return torch.optim.AdamW(params, lr=cfg.lr)


def _train_step(
    model, phase, examples, indices, cfg: PhaseConfig, optimizer, step: int, device
) -> dict[str, float]:
    """One optimiser step on one batch; returns its mean metrics, loss, lr and gradient norm."""
    lr = cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1))
    for group in optimizer.param_groups:
        group["lr"] = lr
    B, micro = len(examples), cfg.microbatch_size or len(examples)
    sums: dict[str, Tensor] = {}
    for start in range(0, B, micro):
        batch = _to(
            phase.collate(examples[start : start + micro], indices[start : start + micro]), device
        )  # (b or 2b, T) each, index (b,)
        with autocast(device):
            losses, metrics = phase.losses(model, batch, "train")  # (b,), {name: (b,)}
        # The gradients of the microbatches add up to those of the batch mean.
        (losses.sum() / B).backward()
        _add_sums(sums, {"loss": losses, **metrics})
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)  # ()
    *totals, norm = torch.stack([*sums.values(), grad_norm.double()]).tolist()  # the one sync
    means = {k: v / B for k, v in zip(sums, totals, strict=True)}
    for what, value in (("loss", means["loss"]), ("gradient norm", norm)):
        if not math.isfinite(value):  # a NaN loss in any microbatch makes its sum NaN
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite {what} ({value})")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**means, "lr": lr, "grad_norm": norm}


def train(
    model,
    phase,
    train_set: Sequence[TokenizedPair],
    eval_set: Sequence[TokenizedPair],
    cfg: PhaseConfig,
    out_dir: str | Path,
    device: torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
    desc: str | None = None,
    identity: dict | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for ``cfg.n_examples`` examples; return the final eval metrics.

    Writes ``out_dir/metrics.jsonl`` and ``out_dir/checkpoint.pt`` and holds ``out_dir/run.lock``
    meanwhile. With ``resume`` and a checkpoint in ``out_dir``, continues from it (a finished run
    returns at once); ``resume=False`` starts over. ``identity``: what else must match for a
    checkpoint to be resumed (the phase config and the data's fingerprints are always included).
    """
    out_dir = Path(out_dir)
    device = device if device is not None else torch.device("cpu")
    if not eval_set:
        raise ValueError("the eval set is empty")
    _check_float32(model)
    phase.check_data("train", train_set)
    phase.check_data("eval", eval_set)
    data = {"train": fingerprint(train_set), "eval": fingerprint(eval_set)}
    identity = {"phase": phase.name, "cfg": asdict(cfg), "data": data, **(identity or {})}
    with run_lock(out_dir):
        return _train_in_folder(
            model,
            phase,
            train_set,
            eval_set,
            cfg,
            out_dir,
            device,
            resume,
            progress,
            desc,
            identity,
        )


def _train_in_folder(
    model, phase, train_set, eval_set, cfg, out_dir, device, resume, progress, desc, identity
) -> dict[str, float]:
    """The loop of :func:`train`, run while holding the folder's lock (one function, read in one go:
    start or resume, then step, log, evaluate and checkpoint until ``cfg.n_examples``)."""
    model.to(device)
    model.train()
    optimizer = _make_optimizer(model, cfg)
    ckpt_path, metrics_path = out_dir / CHECKPOINT, out_dir / METRICS

    def evaluate_and_save() -> dict:
        metrics = _evaluate(model, phase, eval_set, cfg.eval_batch_size, device)
        record = {"split": "eval", "examples_seen": examples_seen, "step": step, **metrics}
        append_record(metrics_path, record)
        save_state(ckpt_path, model, optimizer, examples_seen, step, identity)
        return record

    if resume and ckpt_path.exists():
        examples_seen, step, last_eval = resume_state(out_dir, model, optimizer, identity, device)
    else:
        if resume:
            check_no_orphan_metrics(out_dir)
        examples_seen, step = 0, 0
        write_metrics(metrics_path, [])
        torch.manual_seed(cfg.seed)  # dropout, if any
        last_eval = evaluate_and_save()

    name = desc or phase.name
    bar = tqdm(
        total=cfg.n_examples, initial=examples_seen, unit="ex", desc=name, disable=not progress
    )
    try:
        while examples_seen < cfg.n_examples:
            indices = example_indices(len(train_set), cfg.seed, examples_seen, cfg.batch_size)
            t0 = time.perf_counter()
            try:
                examples = [train_set[i] for i in indices]
                metrics = _train_step(model, phase, examples, indices, cfg, optimizer, step, device)
            except (NonFiniteLossError, ValueError) as err:
                raise type(err)(
                    f"{name}: {err} at step {step} (examples_seen {examples_seen}); stopped "
                    f"before the update. The last good checkpoint is {ckpt_path} (from the last "
                    "evaluation); lower the learning rate or look at the batch's examples "
                    f"{indices}"
                ) from None
            examples_seen += cfg.batch_size
            step += 1
            rate = cfg.batch_size / (time.perf_counter() - t0)
            record = {"split": "train", "examples_seen": examples_seen, "step": step, **metrics}
            append_record(metrics_path, {**record, "time/examples_per_s": rate})
            bar.update(cfg.batch_size)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            crossed = (
                examples_seen // cfg.eval_every > (examples_seen - cfg.batch_size) // cfg.eval_every
            )
            if crossed or examples_seen == cfg.n_examples:
                last_eval = evaluate_and_save()
                key = "rewards/accuracies" if "rewards/accuracies" in last_eval else "loss"
                short = f"eval_{key.split('/')[-1]}"
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", **{short: f"{last_eval[key]:.3g}"})
    finally:
        bar.close()
    return {k: v for k, v in last_eval.items() if k not in ("split", "examples_seen", "step")}
