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
(bit for bit on a CPU; keys under ``time/`` are wall-clock and differ). A non-finite log-prob, loss
or gradient norm stops the run *before* the optimiser step, with :class:`NonFiniteLossError`; the
checkpoint on disk is the last good one. On CUDA, forward passes run under bf16 autocast (log-probs
and losses in float32); a phase whose ``precision`` is ``"bfloat16"`` asks for it on the CPU too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections import defaultdict
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
from .data import IGNORE_INDEX, TokenizedPair, collate_pairs, collate_sequences
from .logprobs import concatenated_logps, sequence_logps

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "FINAL_EVAL",
    "NonFiniteLossError",
    "SFTPhase",
    "PreferencePhase",
    "reference_logps",
    "example_indices",
    "evaluate",
    "train",
    "read_metrics",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL_EVAL = "final_eval.json"  # every eval example's metrics under the final policy


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/inf log-prob, loss or gradient norm and stopped before updating the model."""


PRECISIONS = ("auto", "float32", "bfloat16")


def autocast(device: torch.device, precision: str = "auto"):
    """The forward passes' precision. ``"auto"``: bf16 autocast on CUDA, float32 on the CPU;
    ``"bfloat16"``: bf16 autocast on any device (on a CPU with AMX, ~4x the float32 matmul rate);
    ``"float32"``: no autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _check_finite(what: str, *tensors: Tensor) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteLossError(f"non-finite {what} ({t.detach().flatten()[:4].tolist()} ...)")


# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------


@dataclass
class SFTPhase:
    """Supervised fine-tuning on (x, y) = (prompt, chosen) of each example: loss -log pi(y|x). (B,)"""

    pad_id: int
    average: bool = False
    response_only: bool = True
    precision: str = "auto"
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
        _check_finite("log-probs of the SFT targets", logps)
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)  # (B,)
        return -logps, {"logps/chosen": logps.detach(), "nll_per_token": -logps.detach() / n_tokens}


@dataclass
class PreferencePhase:
    """Preference optimisation with ``loss_fn(pc, pr, rc, rr, beta) -> (B,)`` against fixed pi_ref.

    ``reference[split]`` = (log pi_ref(y_w|x), log pi_ref(y_l|x)), each (N,) over that split's pairs,
    from :func:`reference_logps`. ``extras[split][name]``: further per-pair tensors (N,) that a loss
    with ``takes_batch = True`` finds in ``batch[name]`` (B,); its ``metrics`` method, if it has one,
    adds per-example metrics (names must not clash with the phase's). ``divergence``: the f of the
    ``scores/*`` metrics (defaults to the loss's own, reverse KL for DPO/IPO).
    ``starts_at_reference``: the policy trained with this phase *is* pi_ref at step 0 (a copy of the
    model the reference log-probs were computed from, in :func:`evaluate`'s batches and the same
    precision), so :func:`train` evaluates step 0 from the reference log-probs
    (``policy_is_reference``) instead of running the model again: the same numbers, one eval pass
    fewer (``tests/test_partial.py`` checks that they agree).
    """

    loss_fn: Callable[..., Tensor]
    beta: float
    reference: dict[str, tuple[Tensor, Tensor]]
    pad_id: int
    average: bool = False
    response_only: bool = True
    divergence: Divergence | str | None = None
    extras: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    precision: str = "auto"
    starts_at_reference: bool = False
    policy_is_reference: bool = False
    name: str = "preference"

    def collate(self, pairs: Sequence[TokenizedPair], indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_pairs(pairs, indices, self.pad_id)  # (2B, T) each, index (B,)

    def losses(
        self, model, batch: dict[str, Tensor], split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        ref_chosen, ref_rejected = self.reference[split]
        index = batch["index"].cpu()
        if self.policy_is_reference:
            pc, pr = ref_chosen[index], ref_rejected[index]
        else:
            pc, pr = concatenated_logps(
                model, batch, self.average, self.response_only
            )  # (B,), (B,)
        _check_finite("policy log-probs", pc, pr)
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


@torch.no_grad()
def reference_logps(
    model,
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    average: bool = False,
    response_only: bool = True,
    collate: Callable | None = None,
    precision: str = "auto",
) -> tuple[Tensor, Tensor]:
    """log pi_ref(y_w|x) and log pi_ref(y_l|x) of every pair, each (N,), float32 on the CPU.

    Computed once, before preference training, with the model in eval mode, in consecutive batches
    of ``batch_size`` (the same batches :func:`evaluate` forms, so that at step 0, where pi = pi_ref,
    the eval margins are exactly 0). ``collate(pairs, indices)`` forms a batch (default
    ``collate_pairs``; pass the phase's own, e.g. ``CachedPreferencePhase.collate``) and
    ``precision`` is the phase's (:func:`autocast`).
    """
    collate = collate or (lambda ps, idx: collate_pairs(ps, idx, pad_id))
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        idx = range(start, min(start + batch_size, len(pairs)))
        batch = _to(collate([pairs[i] for i in idx], idx), device)
        with autocast(device, precision):
            pc, pr = concatenated_logps(model, batch, average, response_only)  # (b,), (b,)
        chosen.append(pc.float().cpu())
        rejected.append(pr.float().cpu())
    model.train(was_training)
    out = torch.cat(chosen), torch.cat(rejected)
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


@torch.no_grad()
def evaluate(
    model,
    phase,
    eval_set: Sequence[TokenizedPair],
    batch_size: int,
    device: torch.device,
    per_example: bool = False,
):
    """Mean loss and mean of every metric over the whole eval set, in consecutive batches.

    ``per_example=True`` returns (means, {name: (N,) tensor of every example's value}) instead:
    what paired comparisons of two runs on the same eval set need (``utils.stats``)."""
    if not eval_set:
        raise ValueError("the eval set is empty")
    was_training = model.training
    model.eval()
    values: dict[str, list[Tensor]] = defaultdict(list)
    for start in range(0, len(eval_set), batch_size):
        idx = range(start, min(start + batch_size, len(eval_set)))
        batch = _to(phase.collate([eval_set[i] for i in idx], idx), device)
        with autocast(device, getattr(phase, "precision", "auto")):
            losses, metrics = phase.losses(model, batch, "eval")
        _check_finite("eval loss", losses)
        for k, v in {"loss": losses, **metrics}.items():
            values[k].append(v.detach().double().cpu())
    model.train(was_training)
    every = {k: torch.cat(v) for k, v in values.items()}
    means = {k: float(v.sum()) / len(eval_set) for k, v in every.items()}
    return (means, every) if per_example else means


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
    sums: dict[str, float] = defaultdict(float)
    for start in range(0, B, micro):
        batch = _to(
            phase.collate(examples[start : start + micro], indices[start : start + micro]), device
        )
        with autocast(device, getattr(phase, "precision", "auto")):
            losses, metrics = phase.losses(model, batch, "train")  # (b,), {name: (b,)}
        _check_finite("loss", losses)
        (
            losses.sum() / B
        ).backward()  # gradients of the microbatches add up to those of the batch mean
        sums["loss"] += float(losses.detach().sum())
        for k, v in metrics.items():
            sums[k] += float(v.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    if not math.isfinite(float(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite gradient norm ({float(grad_norm)})")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**{k: v / B for k, v in sums.items()}, "lr": lr, "grad_norm": float(grad_norm)}


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSON-lines file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _save_checkpoint(
    path: Path, model, optimizer, examples_seen: int, step: int, identity: dict
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "examples_seen": examples_seen,
        "step": step,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "identity": identity,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact


def _resume(
    path: Path, metrics_path: Path, model, optimizer, identity: dict, device
) -> tuple[int, int]:
    state = torch.load(path, map_location=device, weights_only=False)
    if state["identity"] != identity:
        raise ValueError(
            f"{path} was written by a different run configuration:\n  checkpoint: {state['identity']}\n"
            f"  this run:   {identity}\nuse a fresh output folder, or resume=False to start over"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    n = state["examples_seen"]
    kept = (
        [r for r in read_metrics(metrics_path) if r["examples_seen"] <= n]
        if metrics_path.exists()
        else []
    )
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return n, state["step"]


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

    Writes ``out_dir/metrics.jsonl``, ``out_dir/checkpoint.pt`` and, at the final evaluation,
    ``out_dir/final_eval.json`` (every eval example's metrics, for paired statistics). With
    ``resume`` and a checkpoint in ``out_dir``, continues from it (a finished run returns at once).
    ``identity``: what must match for a checkpoint to be resumed (the phase config is always
    included).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device if device is not None else torch.device("cpu")
    model.to(device)
    model.train()
    optimizer = _make_optimizer(model, cfg)
    identity = {"phase": phase.name, "cfg": asdict(cfg), **(identity or {})}
    ckpt_path, metrics_path = out_dir / CHECKPOINT, out_dir / METRICS

    if resume and ckpt_path.exists():
        examples_seen, step = _resume(ckpt_path, metrics_path, model, optimizer, identity, device)
    else:
        examples_seen, step = 0, 0
        metrics_path.write_text("", encoding="utf-8")
        torch.manual_seed(cfg.seed)  # dropout, if any

    def log(record: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def evaluate_and_save() -> dict[str, float]:
        t0 = time.perf_counter()
        at_reference = examples_seen == 0 and getattr(phase, "starts_at_reference", False)
        eval_phase = dataclasses.replace(phase, policy_is_reference=True) if at_reference else phase
        metrics, every = evaluate(
            model, eval_phase, eval_set, cfg.eval_batch_size, device, per_example=True
        )
        seconds = time.perf_counter() - t0
        record = {"split": "eval", "examples_seen": examples_seen, "step": step, **metrics}
        log({**record, "time/eval_s": seconds})
        if examples_seen == cfg.n_examples:  # the final policy, pair by pair, for paired statistics
            final = {k: v.tolist() for k, v in every.items()}
            (out_dir / FINAL_EVAL).write_text(json.dumps(final) + "\n", encoding="utf-8")
        _save_checkpoint(ckpt_path, model, optimizer, examples_seen, step, identity)
        return metrics

    if examples_seen == 0:
        last_eval = evaluate_and_save()
    else:
        last_eval = [r for r in read_metrics(metrics_path) if r["split"] == "eval"][-1]

    bar = tqdm(
        total=cfg.n_examples,
        initial=examples_seen,
        unit="ex",
        desc=desc or phase.name,
        disable=not progress,
    )
    try:
        while examples_seen < cfg.n_examples:
            indices = example_indices(len(train_set), cfg.seed, examples_seen, cfg.batch_size)
            t0 = time.perf_counter()
            try:
                metrics = _train_step(
                    model,
                    phase,
                    [train_set[i] for i in indices],
                    indices,
                    cfg,
                    optimizer,
                    step,
                    device,
                )
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{desc or phase.name}: {err} at step {step} (examples_seen {examples_seen}); stopped before the "
                    f"update. The last good checkpoint is {ckpt_path} (from the last evaluation); lower the learning "
                    f"rate or look at the batch's examples {indices}"
                ) from None
            examples_seen += cfg.batch_size
            step += 1
            seconds = time.perf_counter() - t0
            log(
                {
                    "split": "train",
                    "examples_seen": examples_seen,
                    "step": step,
                    **metrics,
                    "time/examples_per_s": cfg.batch_size / seconds,
                    "time/step_s": seconds,
                }
            )
            bar.update(cfg.batch_size)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            crossed = (
                examples_seen // cfg.eval_every > (examples_seen - cfg.batch_size) // cfg.eval_every
            )
            if crossed or examples_seen == cfg.n_examples:
                last_eval = evaluate_and_save()
                key = "rewards/accuracies" if "rewards/accuracies" in last_eval else "loss"
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4g}",
                    **{f"eval_{key.split('/')[-1]}": f"{last_eval[key]:.3g}"},
                )
    finally:
        bar.close()
    skip = ("split", "examples_seen", "step")
    return {k: v for k, v in last_eval.items() if k not in skip and not k.startswith("time/")}
