"""Benchmarks.

``python -m upo_ref.bench losses``: forward+backward time of every loss and divergence. Each
timing is the median of ``--repeats`` runs (after warm-up) of: four leaf tensors of ``--pairs``
float32 log-probs -> per-example loss -> ``.mean().backward()``, on the CPU. The input checks every
loss performs are included, as they are in training. The whole zoo is timed ``--rounds`` times;
each round gives every loss a ratio to ``dpo_loss``'s time in that round, and the last column is
the median of those ratios; the target is <= 3 for every loss.

``python -m upo_ref.bench trl``: one DPO training step of upo_ref's trainer, of TRL's
``DPOTrainer`` and of TRL with upo_ref's loss, same model, pairs and precision, in the same run
(``upo_ref.integrations.trl_bench``); it prints TRL's time over each.

``python -m upo_ref.bench grid [--preset smol]``: how long a partially fine-tuned preset's grid
takes on this machine, from a fresh clone: the trunk (in the preset's precision and in float32),
the reference log-probs, training and evaluation, each timed per pair on the first ``--pairs``
eval pairs with the preset's model, batches and precisions, and extrapolated to the preset's
pair counts, runs and eval schedule (:func:`grid_seconds`). The bf16 trunk is fast on a CPU with
bf16 matmul kernels (AMX, AVX512-BF16) and slow on one without (``utils.cpu``).

``python -m upo_ref.bench step``: one preference-training step of a GPT-2-architecture model
(124M by default, random init: speed does not depend on the weights), done two ways in the same
run (see :func:`step_fn`): the way upo_ref trains (reference log-probs precomputed, chosen and
rejected in one concatenated forward pass, the LM head on response tokens only, bf16 autocast and a
fused AdamW on CUDA) and the naive way (float32, two separate forwards, the reference model run
every step, full logits). It prints pairs/s, tokens/s, the model FLOP utilisation (MFU) against the
GPU's bf16 peak, and the fast/naive ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass

import torch

from .divergences import DIVERGENCE_NAMES, get_divergence
from .losses import PreferenceLoss


@dataclass
class LossTiming:
    """One loss's median seconds in each round, its ratio to DPO's in each, and their median."""

    label: str
    seconds: list[float]
    ratios: list[float]

    @property
    def ratio_to_dpo(self) -> float:
        return statistics.median(self.ratios)


def loss_zoo() -> list[PreferenceLoss]:
    """DPO, IPO, and f-DPO and IUPO (both forms) for every divergence (alpha = 0.5)."""
    zoo = [PreferenceLoss("dpo"), PreferenceLoss("ipo")]
    for name in DIVERGENCE_NAMES:
        div = get_divergence(name, alpha=0.5 if name == "alpha" else None)
        zoo += [
            PreferenceLoss("fdpo", div),
            PreferenceLoss("iupo", div),
            PreferenceLoss("iupo", div, "kkt"),
        ]
    return zoo


def bench_inputs(pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) log-probs, each (2, pairs) float32: row 0 chosen, row 1 rejected.

    Summed log-probs: reference chosen in [-300, 0], rejected within +-20 nats of it (so that the
    paper-form IUPO of forward KL / alpha, f'(e^{pc - pr}) ~ e^{|pc - pr|}, stays inside float32),
    policy within +-5 nats of the reference.
    """
    g = torch.Generator().manual_seed(seed)
    ref_chosen = -300 * torch.rand(pairs, generator=g)
    ref = torch.stack([ref_chosen, ref_chosen + 40 * torch.rand(pairs, generator=g) - 20])
    pol = ref + 10 * torch.rand(2, pairs, generator=g) - 5
    return pol, ref


def _median_seconds(loss: PreferenceLoss, pol, ref, beta: float, repeats: int) -> float:
    runs = []
    for i in range(repeats + 5):
        leaves = [x.clone().requires_grad_(True) for x in (pol[0], pol[1], ref[0], ref[1])]
        start = time.perf_counter()
        loss(*leaves, beta).mean().backward()
        if i >= 5:  # warm-up
            runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def time_losses(
    pairs: int = 65536, repeats: int = 50, rounds: int = 3, beta: float = 0.1, seed: int = 0
) -> list[LossTiming]:
    """Every loss of :func:`loss_zoo` timed in ``rounds`` rounds; in each round, each loss's median
    forward+backward seconds over ``repeats`` runs and its ratio to DPO's median of that round.

    The ratio of a round compares timings taken a few seconds apart, so a change of machine load
    between rounds cancels out of it; :attr:`LossTiming.ratio_to_dpo` is the median over rounds.
    """
    if rounds < 1 or repeats < 1 or pairs < 1:
        raise ValueError(
            f"pairs, repeats and rounds must be >= 1, got {pairs}, {repeats}, {rounds}"
        )
    pol, ref = bench_inputs(pairs, seed)
    zoo = loss_zoo()
    seconds = [[] for _ in zoo]  # seconds[loss][round]
    for _ in range(rounds):
        for j, loss in enumerate(zoo):
            seconds[j].append(_median_seconds(loss, pol, ref, beta, repeats))
    dpo = seconds[0]
    return [
        LossTiming(loss.label, s, [x / d for x, d in zip(s, dpo, strict=True)])
        for loss, s in zip(zoo, seconds, strict=True)
    ]


def _losses_main(args) -> None:
    rows = time_losses(args.pairs, args.repeats, args.rounds)
    print(
        f"forward+backward, {args.pairs} pairs, float32, CPU, {torch.get_num_threads()} threads; "
        f"{args.rounds} rounds, each the median of {args.repeats} runs per loss"
    )
    print(f"{'loss':<28}{'ms (median round)':>18}{'x DPO per round':>24}{'x DPO median':>14}")
    for row in rows:
        per_round = " ".join(f"{r:.2f}" for r in row.ratios)
        ms = statistics.median(row.seconds) * 1e3
        print(f"{row.label:<28}{ms:>18.3f}{per_round:>24}{row.ratio_to_dpo:>14.2f}")
    worst = max(rows, key=lambda r: r.ratio_to_dpo)
    print(
        f"slowest relative to DPO: {worst.label} at {worst.ratio_to_dpo:.2f}x, the median of "
        f"{args.rounds} per-round ratios (target <= 3x)"
    )


# --- one preference-training step ---------------------------------------------------------------
# Dense bf16 tensor-core peaks (TFLOP/s) by device name, from the vendors' data sheets; override
# with --peak-tflops. MFU is only as meaningful as this number.
BF16_PEAK_TFLOPS = {
    "H100 80GB HBM3": 989.4,
    "H100 SXM": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "A100": 312.0,
}


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The bf16 dense peak of a CUDA device by its name, None if unknown (or on the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def step_flops(
    n_layer: int, n_embd: int, vocab: int, batch: int, length: int, response: int
) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), counting what the step
    needs: the transformer body on all 2 * batch * length tokens (6 N_body per token plus the
    attention scores and values, 12 n_layer n_embd length per token, as in PaLM's MFU) and the
    LM head (2 n_embd vocab per token, x3) on the 2 * batch * response scored tokens only."""
    n_body = 12 * n_layer * n_embd**2  # attention (4 d^2) + MLP (8 d^2) weights per layer
    tokens = 2 * batch * length
    body = tokens * (6 * n_body + 12 * n_layer * n_embd * length)
    head = 2 * batch * response * 6 * n_embd * vocab
    return float(body + head)


@dataclass
class StepTiming:
    how: str
    seconds: float
    pairs_per_s: float
    tokens_per_s: float
    mfu: float | None


def step_fn(
    model, ref_model, batch: dict, ref_logps: tuple, loss_fn, beta: float, device, naive: bool
):
    """A closure running one preference step, fast or naive; returns the loss (a 0-dim tensor).

    ``batch`` is a ``data.collate_pairs`` batch of 2B rows (chosen first, then rejected).
    """
    from .lm.logprobs import concatenated_logps, sequence_logps
    from .lm.train import autocast

    opt_kwargs = {"lr": 1e-5}
    if device.type == "cuda" and not naive:
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW(model.parameters(), **opt_kwargs)
    B = batch["input_ids"].shape[0] // 2
    halves = [{k: v[:B] for k, v in batch.items()}, {k: v[B:] for k, v in batch.items()}]

    def fast():
        with autocast(device):
            pc, pr = concatenated_logps(model, batch)  # one forward, head on response tokens only
        loss = loss_fn(pc, pr, *ref_logps, beta).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def slow():
        pc, pr = (
            sequence_logps(
                model, h["input_ids"], h["attention_mask"], h["labels"], response_only=False
            )
            for h in halves
        )  # two forwards, full (B, T, V) logits
        with torch.no_grad():
            rc, rr = (
                sequence_logps(
                    ref_model, h["input_ids"], h["attention_mask"], h["labels"], response_only=False
                )
                for h in halves
            )  # the reference model, every step
        loss = loss_fn(pc, pr, rc, rr, beta).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return slow if naive else fast


@torch.no_grad()
def reference_logps_of(ref_model, batch: dict) -> tuple:
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)) of a pair batch, each (B,), from one no-grad
    forward."""
    from .lm.logprobs import concatenated_logps

    return concatenated_logps(ref_model, batch)


def random_pair_batch(batch: int, length: int, prompt: int, vocab: int, seed: int = 0) -> dict:
    """2 * batch rows of random token ids, each a prompt of ``prompt`` tokens and a response filling
    the rest (the worst case: no padding), in ``collate_pairs``'s layout."""
    from .lm.logprobs import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * batch, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def time_steps(
    n_layer=12,
    n_head=12,
    n_embd=768,
    vocab=50257,
    batch=64,
    length=512,
    prompt=256,
    steps=10,
    warmup=3,
    device=None,
    peak_tflops=None,
    beta=0.1,
    naive=True,
) -> list[StepTiming]:
    """Time the fast step (and the naive one, when ``naive``) on the same model and batch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .losses import PreferenceLoss

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab,
        n_positions=length,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(device)
    ref_model = GPT2LMHeadModel(cfg).to(device).eval()
    batch_t = {k: v.to(device) for k, v in random_pair_batch(batch, length, prompt, vocab).items()}
    ref_logps = reference_logps_of(ref_model, batch_t)  # precomputed once, as in training
    loss_fn = PreferenceLoss("iupo", "jensen_shannon")
    flops = step_flops(n_layer, n_embd, vocab, batch, length, length - prompt)
    peak = peak_tflops if peak_tflops is not None else bf16_peak_tflops(device)
    out = []
    for how in ("fast", "naive") if naive else ("fast",):
        fn = step_fn(
            model, ref_model, batch_t, ref_logps, loss_fn, beta, device, naive=how == "naive"
        )
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / steps
        mfu = flops / seconds / (peak * 1e12) if peak else None
        out.append(StepTiming(how, seconds, batch / seconds, 2 * batch * length / seconds, mfu))
    return out


def _step_main(args) -> None:
    device = torch.device(args.device) if args.device else None
    rows = time_steps(
        args.n_layer,
        args.n_head,
        args.n_embd,
        args.vocab,
        args.batch,
        args.length,
        args.prompt,
        args.steps,
        args.warmup,
        device,
        args.peak_tflops,
        naive=not args.no_naive,
    )
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"preference step: GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} vocab={args.vocab}, "
        f"batch {args.batch} pairs x {args.length} tokens (prompt {args.prompt}), JS-IUPO, {name}, "
        f"mean of {args.steps} steps"
    )
    print(f"{'how':<8}{'s/step':>10}{'pairs/s':>10}{'tokens/s':>12}{'MFU':>8}")
    for r in rows:
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        print(f"{r.how:<8}{r.seconds:>10.4f}{r.pairs_per_s:>10.1f}{r.tokens_per_s:>12.0f}{mfu:>8}")
    if len(rows) == 2:
        print(f"fast / naive throughput: {rows[1].seconds / rows[0].seconds:.2f}x")


def _add_step_args(q) -> None:
    """The model, batch and timing options of the ``step`` and ``trl`` subcommands."""
    q.add_argument("--n-layer", type=int, default=12)
    q.add_argument("--n-head", type=int, default=12)
    q.add_argument("--n-embd", type=int, default=768)
    q.add_argument("--vocab", type=int, default=50257)
    q.add_argument("--batch", type=int, default=64, help="preference pairs per step")
    q.add_argument(
        "--length", type=int, default=512, help="tokens per sequence (prompt + response)"
    )
    q.add_argument(
        "--prompt", type=int, default=256, help="prompt tokens per sequence (not scored)"
    )
    q.add_argument("--steps", type=int, default=10)
    q.add_argument("--warmup", type=int, default=3)
    q.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")


# --- the time of a partially fine-tuned preset's grid -------------------------------------------


def evals_per_run(cfg) -> int:
    """Eval passes of one preference run of ``cfg`` (a ``PhaseConfig``) after step 0, which reads
    pi_ref's log-probs and needs none: one after each step the training loop evaluates after
    (``PhaseConfig.evaluates_after``, the rule it follows)."""
    b = cfg.batch_size
    return sum(cfg.evaluates_after(s) for s in range(b, cfg.n_examples + 1, b))


def grid_seconds(
    cfg, n_train: int, n_eval: int, trunk_s: float, forward_s: float, step_s: float
) -> dict[str, float]:
    """Seconds of each part of the grid of ``cfg`` (an ``ExperimentConfig`` without SFT) from
    seconds per pair: ``trunk_s`` (the trunk's states of its two sequences), ``forward_s`` (the
    top's forward pass, as in the reference log-probs and every eval pass), ``step_s`` (a training
    step's share). The parts are those of the summary's time split; ``per_run_*`` are one run's."""
    runs = len(cfg.runs())
    per_run_training = step_s * cfg.pref.n_examples
    per_run_evaluation = forward_s * n_eval * evals_per_run(cfg.pref)
    return {
        "trunk_s": trunk_s * (n_train + n_eval),
        "reference_s": forward_s * (n_train + n_eval),
        "training_s": per_run_training * runs,
        "evaluation_s": per_run_evaluation * runs,
        "per_run_training_s": per_run_training,
        "per_run_evaluation_s": per_run_evaluation,
    }


def check_grid_preset(cfg) -> None:
    """ValueError unless ``cfg`` is a partially fine-tuned preset without SFT (what
    :func:`grid_seconds` estimates)."""
    if cfg.model.train_layers is None:
        raise ValueError(
            f"bench grid times a partially fine-tuned preset (smol, smol-average); {cfg.name} "
            f"trains its whole model"
        )
    if cfg.sft.n_examples:
        raise ValueError(
            f"bench grid does not time an SFT phase; preset {cfg.name} has one (time smol, whose "
            f"trunk, reference and preference runs it shares)"
        )


def time_grid_parts(cfg, n_pairs: int, precisions: list[str], device: torch.device) -> dict:
    """Seconds per pair of each part of the grid of ``cfg``, timed on its first ``n_pairs`` eval
    pairs with its own model, batch sizes and precisions: the trunk (both sequences, in each of
    ``precisions``), the top's forward pass (``phases.reference_logps``, the eval passes' path)
    and a training step (``train._train_step`` with the first run's loss, batches of the
    preset's size). Returns those and the preset's train and eval pair counts."""
    from .lm.experiment import load_experiment_data
    from .lm.models import build_model
    from .lm.partial import split_model
    from .lm.phases import reference_logps
    from .lm.train import _make_optimizer, _train_step
    from .lm.trunk_cache import (
        CACHE_DTYPES,
        CachedPreferencePhase,
        collate_cached,
        pair_sequences,
        trunk_states,
        with_states,
    )

    check_grid_preset(cfg)
    _, data = load_experiment_data(cfg)
    if not cfg.pref.batch_size <= n_pairs <= len(data.pref_eval):
        raise ValueError(
            f"--pairs must be between the batch size, {cfg.pref.batch_size}, and the eval set's "
            f"{len(data.pref_eval)} pairs; got {n_pairs}"
        )
    model = build_model(cfg.model, data.vocab_size, cfg.data.max_length, eos_id=data.pad_id)
    trunk, top = split_model(model, cfg.model.train_layers)
    trunk.to(device)
    pairs = data.pref_eval[:n_pairs]
    sequences = pair_sequences(pairs)
    batch, pad, dtype = cfg.pref.eval_batch_size, data.pad_id, CACHE_DTYPES[cfg.cache_dtype]
    trunk_s = {}
    for precision in precisions:
        t0 = time.perf_counter()
        states = trunk_states(trunk, sequences, pad, batch, device, precision, dtype)
        trunk_s[precision] = (time.perf_counter() - t0) / n_pairs
    cached = with_states(pairs, states)
    top.to(device)
    collate = functools.partial(collate_cached, pad_id=pad)
    t0 = time.perf_counter()
    ref = reference_logps(
        top, cached, batch, pad, device, cfg.average_logps, True, collate, cfg.precision
    )
    forward_s = (time.perf_counter() - t0) / n_pairs
    loss_fn, beta = cfg.runs()[0]
    phase = CachedPreferencePhase(
        loss_fn, beta, {"train": ref}, pad, cfg.average_logps, precision=cfg.precision
    )
    optimizer, b = _make_optimizer(top, cfg.pref), cfg.pref.batch_size
    t0 = time.perf_counter()
    steps = n_pairs // b
    for step in range(steps):
        idx = list(range(step * b, (step + 1) * b))
        _train_step(top, phase, [cached[i] for i in idx], idx, cfg.pref, optimizer, step, device)
    step_s = (time.perf_counter() - t0) / (steps * b)
    tokens = sum(len(s) for s in sequences) / len(sequences)
    return {
        "trunk_s": trunk_s,
        "forward_s": forward_s,
        "step_s": step_s,
        "n_train": len(data.pref_train),
        "n_eval": len(data.pref_eval),
        "tokens": tokens,
    }


def _grid_main(args) -> None:
    from .lm.config import PRECISIONS
    from .lm.presets import get_preset
    from .utils.cpu import bf16_matmul_kernels

    cfg = get_preset(args.preset)  # time_grid_parts checks that it can time it
    if args.precision is not None:  # the top's; the trunk keeps its own
        if args.precision not in PRECISIONS:
            raise ValueError(f"--precision {args.precision!r}: must be one of {PRECISIONS}")
        r = dataclasses.replace
        cfg = r(cfg, precision=args.precision, trunk_precision=cfg.trunk_pass_precision)
    own = cfg.trunk_pass_precision
    precisions = list(dict.fromkeys([own, *(args.trunk_precisions or ["float32"])]))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"--trunk-precisions {unknown}: each must be one of {PRECISIONS}")
    device = torch.device(args.device or "cpu")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        parts = time_grid_parts(cfg, args.pairs, precisions, device)
    finally:
        torch.set_num_threads(threads)
    n_train, n_eval = parts["n_train"], parts["n_eval"]
    est = {
        p: grid_seconds(
            cfg, n_train, n_eval, parts["trunk_s"][p], parts["forward_s"], parts["step_s"]
        )
        for p in precisions
    }
    e = est[own]
    rows = [
        ("reference", parts["forward_s"], e["reference_s"], None),
        ("training", parts["step_s"], e["training_s"], e["per_run_training_s"]),
        ("evaluation", parts["forward_s"], e["evaluation_s"], e["per_run_evaluation_s"]),
    ]
    rows += [(f"trunk ({p})", parts["trunk_s"][p], est[p]["trunk_s"], None) for p in precisions]
    kernels = "yes" if bf16_matmul_kernels() else "no"
    print(
        f"preset {cfg.name} on {device} ({torch.backends.cpu.get_cpu_capability()}, "
        f"{cfg.threads or threads} threads; oneDNN bf16 matmul kernels: {kernels}), timed on "
        f"{args.pairs} eval pairs ({parts['tokens']:.1f} tokens per sequence on average; the "
        f"top in {cfg.precision}), "
        f"extrapolated to {n_train} train + {n_eval} eval pairs and {len(cfg.runs())} runs:"
    )
    print(f"{'part':<24}{'s per pair':>12}{'min, the grid':>16}{'min, one run':>14}")
    for name, per_pair, grid, run in rows:
        one = f"{run / 60:>14.1f}" if run is not None else ""
        print(f"{name:<24}{per_pair:>12.4f}{grid / 60:>16.1f}{one}")
    rest = e["reference_s"] + e["training_s"] + e["evaluation_s"]
    for p in precisions:
        total = (rest + est[p]["trunk_s"]) / 60
        print(f"the whole grid from a fresh clone, the trunk in {p}: {total:.1f} min")


def _trl_main(args) -> None:
    from .integrations.trl_bench import main as trl_main  # needs trl (requirements.txt)

    trl_main(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m upo_ref.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("losses", help="forward+backward time of every loss and divergence")
    p.add_argument("--pairs", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=50, help="timed runs per loss per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the whole zoo (ratio median)")
    p.set_defaults(func=_losses_main)
    q = sub.add_parser("step", help="one preference-training step, upo_ref's way and the naive way")
    _add_step_args(q)
    q.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 peak for MFU (default: by device name)",
    )
    q.add_argument("--no-naive", action="store_true", help="time only the fast step")
    q.set_defaults(func=_step_main)
    t = sub.add_parser("trl", help="one DPO step of upo_ref's trainer and of TRL's DPOTrainer")
    _add_step_args(t)
    t.add_argument("--rounds", type=int, default=3, help="the three ways take turns this often")
    t.set_defaults(func=_trl_main)
    g = sub.add_parser("grid", help="the time of a partially fine-tuned preset's grid, estimated")
    g.add_argument("--preset", default="smol", help="smol or smol-average (default smol)")
    g.add_argument("--pairs", type=int, default=64, help="eval pairs timed (default 64)")
    g.add_argument(
        "--trunk-precisions",
        type=lambda text: text.split(","),
        help="comma-separated precisions to time the trunk in besides the preset's (default "
        "float32)",
    )
    g.add_argument(
        "--precision",
        help="the top's precision instead of the preset's (reproduce --precision), e.g. bfloat16",
    )
    g.add_argument("--device", default=None, help="cpu (default) or cuda")
    g.set_defaults(func=_grid_main)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
