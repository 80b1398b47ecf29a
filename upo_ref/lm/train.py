r"""Training: an SFT phase and a preference phase, one short loop, checkpoints that resume exactly.

The loop (:func:`train`) knows nothing about losses: a *phase* (``phases``: SFT or preference)
turns a batch into per-example losses (B,) and metrics (B,) each.

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
where they enter the loss (the public losses and ``metrics.preference_metrics`` check their inputs),
the loss once per step here. Precision: the model's weights must be float32 (a bf16/fp16 model is
refused, not silently trained in half precision); on CUDA, forward passes run under bf16 autocast (a
phase whose ``precision`` is ``"bfloat16"`` asks for it on the CPU too; ``"bfloat16-matmul"``
rounds only the CPU matmuls' inputs to bf16, in the forward and the backward pass:
``phases.matmul_precision``), and the log-softmax, log-probs and losses are computed in float32.
The final evaluation also writes every eval example's metrics to ``final_eval.json`` (for paired
comparisons of runs on the same eval set).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import PhaseConfig
from .distributed import DataParallel, data_parallel
from .phases import (
    NonFiniteLossError,
    PreferencePhase,
    ReferenceLogps,
    SFTPhase,
    autocast,
    check_float32,
    matmul_precision,
    reference_logps,
    to_device,
)
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
from .tokenize import TokenizedPair, fingerprint

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "FINAL_EVAL",
    "NonFiniteLossError",
    "RunFolderError",
    "SFTPhase",
    "PreferencePhase",
    "ReferenceLogps",
    "autocast",
    "reference_logps",
    "example_indices",
    "evaluate",
    "train",
    "read_metrics",
    "subnormals_flushed",
    "flush_subnormals",
]


FINAL_EVAL = "final_eval.json"  # every eval example's metrics under the final policy

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
    model,
    phase,
    eval_set: Sequence[TokenizedPair],
    batch_size: int,
    device: torch.device,
    per_example: bool = False,
):
    """Mean loss and mean of every metric over the whole eval set, in consecutive batches.

    ``per_example=True`` returns (means, {name: (N,) float64 tensor of every example's value})
    instead: what paired comparisons of two runs on the same eval set need (``utils.stats``)."""
    if not eval_set:
        raise ValueError("the eval set is empty")
    phase.check_data("eval", eval_set)
    return _evaluate(model, phase, eval_set, batch_size, device, per_example)


@torch.no_grad()
def _evaluate(model, phase, eval_set, batch_size: int, device: torch.device, per_example=False):
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    values: dict[str, list[Tensor]] = {}
    for start in range(0, len(eval_set), batch_size):
        idx = range(start, min(start + batch_size, len(eval_set)))
        batch = to_device(
            phase.collate([eval_set[i] for i in idx], idx), device
        )  # (b or 2b, T) each
        with autocast(device, getattr(phase, "precision", "auto")):
            losses, metrics = phase.losses(model, batch, "eval")  # (b,), {name: (b,)}
        _add_sums(sums, {"loss": losses, **metrics})
        if per_example:
            for k, v in {"loss": losses, **metrics}.items():
                values.setdefault(k, []).append(v.detach().double())  # (b,)
    model.train(was_training)
    totals = torch.stack(list(sums.values())).tolist()  # the one host sync
    means = {k: v / len(eval_set) for k, v in zip(sums, totals, strict=True)}
    if not math.isfinite(means["loss"]):
        raise NonFiniteLossError(f"non-finite eval loss ({means['loss']})")
    if per_example:
        return means, {k: torch.cat(v).cpu() for k, v in values.items()}  # (N,) each
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
    model,
    phase,
    examples,
    indices,
    cfg: PhaseConfig,
    optimizer,
    step: int,
    device,
    dp: DataParallel | None = None,
) -> dict[str, float]:
    """One optimiser step on one batch; returns its mean metrics, loss, lr and gradient norm.

    Under a launch of several processes (``dp``) this process computes its share of the batch;
    see ``upo_ref.lm.distributed``."""
    lr = cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1))
    for group in optimizer.param_groups:
        group["lr"] = lr
    B, n = len(examples), 1 if dp is None else dp.n_processes
    if dp is not None:
        examples, indices = dp.shard(examples), dp.shard(indices)
    micro = cfg.microbatch_size or len(examples)
    sums: dict[str, Tensor] = {}
    for start in range(0, len(examples), micro):
        batch = to_device(
            phase.collate(examples[start : start + micro], indices[start : start + micro]), device
        )  # (b or 2b, T) each, index (b,)
        precision = getattr(phase, "precision", "auto")
        with autocast(device, precision), dp.failing_together() if dp else nullcontext():
            losses, metrics = (dp.forward if dp else phase.losses)(model, batch, "train")
        # The gradients of the microbatches add up to those of the batch mean (DDP averages the
        # n processes' gradients, hence the factor n).
        with matmul_precision(device, precision):  # the backward's matmuls as the forward's
            (losses.sum() * n / B).backward()
        _add_sums(sums, {"loss": losses, **metrics})
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)  # ()
    totals = torch.stack(list(sums.values()))  # (K,)
    if dp is not None:
        totals = dp.total(totals)  # summed over the processes; grad_norm is equal on all
    *totals, norm = torch.cat([totals, grad_norm.double()[None]]).tolist()  # the one sync
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

    Writes ``out_dir/metrics.jsonl``, ``out_dir/checkpoint.pt`` and, at the final evaluation,
    ``out_dir/final_eval.json`` (every eval example's metrics), and holds ``out_dir/run.lock``
    meanwhile. With ``resume`` and a checkpoint in ``out_dir``, continues from it (a finished run
    returns at once); ``resume=False`` starts over. ``identity``: what else must match for a
    checkpoint to be resumed (the phase config and the data's fingerprints are always included).
    """
    out_dir = Path(out_dir)
    device = device if device is not None else torch.device("cpu")
    if not eval_set:
        raise ValueError("the eval set is empty")
    check_float32(model)
    phase.check_data("train", train_set)
    phase.check_data("eval", eval_set)
    data = {"train": fingerprint(train_set), "eval": fingerprint(eval_set)}
    identity = {"phase": phase.name, "cfg": asdict(cfg), "data": data, **(identity or {})}
    dp = data_parallel()  # None unless launched as several processes (accelerate launch)
    if dp is not None:
        device = dp.check_device(device)
    lock = run_lock(out_dir) if dp is None or dp.is_main else nullcontext()
    with lock, subnormals_flushed(device):
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
            dp,
        )


@contextmanager
def subnormals_flushed(device: torch.device):
    """On the CPU, flush subnormal floats to zero while training (``torch.set_flush_denormal``),
    then switch that off again (torch's default), unless :func:`flush_subnormals` had switched it on
    for the whole process: then it stays on.

    Losses whose gradient decays exponentially in a log-ratio (JS-IUPO's paper form:
    sigma(-a) for a = log pi(y_w)/pi(y_l), hundreds of nats on summed log-probs) send gradients
    below float32's smallest normal number, 1.2e-38, back through the model, and x86 CPUs compute
    on subnormals about a hundred times slower. Flushed, those contributions are exactly 0 instead
    of below 1.2e-38. The flag is per thread: torch's worker threads inherit it only when they are
    started after it is set, which is why the commands (``reproduce``, ``overlap``, ``evaluate``)
    call :func:`flush_subnormals` first thing. GPUs keep their own setting."""
    if device.type != "cpu" or _process_flushes or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


_process_flushes = False  # set by flush_subnormals: on for the whole of a command


def flush_subnormals(on: bool = True) -> bool:
    """Flush subnormal floats to zero in this process from now on (``on=False``: stop), in every
    torch thread started after the call (see :func:`subnormals_flushed`); a command calls it before
    any tensor work and with False at its end. False where the CPU cannot."""
    global _process_flushes
    done = torch.set_flush_denormal(on)
    _process_flushes = on and done
    return done


def _evaluate_and_save(
    model, phase, eval_set, cfg, out_dir, optimizer, identity, main, dp, device, examples_seen, step
) -> dict:
    """Evaluate on the whole eval set, log the record, checkpoint; the final evaluation also writes
    every eval pair's metrics (``FINAL_EVAL``). Under a launch every process evaluates (the models
    are equal) and only the main one writes. Step 0 of a phase that starts at pi_ref is evaluated
    from its reference log-probs."""
    t0 = time.perf_counter()
    at_reference = examples_seen == 0 and getattr(phase, "starts_at_reference", False)
    eval_phase = dataclasses.replace(phase, policy_is_reference=True) if at_reference else phase
    metrics, every = _evaluate(model, eval_phase, eval_set, cfg.eval_batch_size, device, True)
    record = {"split": "eval", "examples_seen": examples_seen, "step": step, **metrics}
    if main:
        append_record(out_dir / METRICS, {**record, "time/eval_s": time.perf_counter() - t0})
        if examples_seen == cfg.n_examples:  # the final policy, pair by pair
            final = {k: v.tolist() for k, v in every.items()}
            (out_dir / FINAL_EVAL).write_text(json.dumps(final) + "\n", encoding="utf-8")
        save_state(out_dir / CHECKPOINT, model, optimizer, examples_seen, step, identity)
    if dp is not None:
        dp.barrier()
    return record


def _start_or_resume(out_dir, model, optimizer, identity, device, resume, main, dp, seed, evaluate):
    """(examples_seen, step, last eval record) of a run about to train: resumed from its checkpoint,
    or started afresh (an empty metrics file, the evaluation at step 0)."""
    resuming = resume and (out_dir / CHECKPOINT).exists()
    if dp is not None:
        dp.barrier()  # every process has looked before the main one writes
    if not resuming:
        if resume and main:
            check_no_orphan_metrics(out_dir)
        if main:
            write_metrics(out_dir / METRICS, [])
        torch.manual_seed(seed)  # dropout, if any
        return 0, 0, evaluate(0, 0)
    # The main process cuts the metrics file back first; then the others find it cut and leave it
    # as it is (write_metrics does not rewrite an equal file).
    for turn in (True, False) if dp is not None else (True,):
        if main == turn:
            state = resume_state(out_dir, model, optimizer, identity, device)
        if dp is not None:
            dp.barrier()
    return state


def _train_in_folder(
    model, phase, train_set, eval_set, cfg, out_dir, device, resume, progress, desc, identity, dp
) -> dict[str, float]:
    """The loop of :func:`train`, run while holding the folder's lock: start or resume, then step,
    log, evaluate and checkpoint until ``cfg.n_examples``."""
    model.to(device)
    model.train()
    if dp is not None:
        dp.wrap(model, phase)
    main = dp is None or dp.is_main  # only the main process writes the folder's files
    optimizer = _make_optimizer(model, cfg)
    ckpt_path, metrics_path = out_dir / CHECKPOINT, out_dir / METRICS

    where = (out_dir, optimizer, identity, main, dp, device)  # what _evaluate_and_save writes to
    evaluate_and_save = functools.partial(_evaluate_and_save, model, phase, eval_set, cfg, *where)

    examples_seen, step, last_eval = _start_or_resume(
        out_dir, model, optimizer, identity, device, resume, main, dp, cfg.seed, evaluate_and_save
    )
    name = desc or phase.name
    shown = progress and main
    bar = tqdm(total=cfg.n_examples, initial=examples_seen, unit="ex", desc=name, disable=not shown)
    try:
        while examples_seen < cfg.n_examples:
            indices = example_indices(len(train_set), cfg.seed, examples_seen, cfg.batch_size)
            t0 = time.perf_counter()
            try:
                examples = [train_set[i] for i in indices]
                metrics = _train_step(
                    model, phase, examples, indices, cfg, optimizer, step, device, dp
                )
            except (NonFiniteLossError, ValueError) as err:
                raise type(err)(
                    f"{name}: {err} at step {step} (examples_seen {examples_seen}); stopped "
                    f"before the update. The last good checkpoint is {ckpt_path} (from the last "
                    "evaluation); lower the learning rate or look at the batch's examples "
                    f"{indices}"
                ) from None
            examples_seen += cfg.batch_size
            step += 1
            seconds = time.perf_counter() - t0
            record = {"split": "train", "examples_seen": examples_seen, "step": step, **metrics}
            timing = {"time/examples_per_s": cfg.batch_size / seconds, "time/step_s": seconds}
            if main:
                append_record(metrics_path, {**record, **timing})
            bar.update(cfg.batch_size)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            if cfg.evaluates_after(examples_seen):
                last_eval = evaluate_and_save(examples_seen, step)
                key = "rewards/accuracies" if "rewards/accuracies" in last_eval else "loss"
                short = f"eval_{key.split('/')[-1]}"
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", **{short: f"{last_eval[key]:.3g}"})
    finally:
        bar.close()
    skip = ("split", "examples_seen", "step")
    return {k: v for k, v in last_eval.items() if k not in skip and not k.startswith("time/")}
