r"""``python -m upo_ref.bench trl``: one preference-training step, upo_ref's trainer against TRL's.

The same random-init GPT-2, the same pairs (random ids, a prompt of ``prompt`` tokens and a response
filling the sequence to ``length``, ending with EOS: no padding), the same batch of ``batch``
pairs, in the same run, timed three ways:

* ``upo_ref``: upo_ref's trainer step (``upo_ref.lm.train``): collate, one concatenated forward,
  the LM head on response tokens only, DPO, backward, clip, AdamW step;
* ``TRL``: TRL's ``DPOTrainer`` (``loss_type="sigmoid"``, DPO) in its own training loop;
* ``TRL+upo_ref``: :class:`~upo_ref.integrations.trl.UPOTrainer`, TRL's loop with upo_ref's DPO.

Equal on every side: the reference log-probs are precomputed (upo_ref's way; TRL's
``precompute_ref_log_probs=True``), so no step runs the reference model; AdamW (torch's, lr 1e-5,
no warm-up), the gradient norm clipped at 10; float32 on the CPU and bf16 autocast on CUDA (TRL's
default is bf16 also on the CPU); no gradient checkpointing (TRL's default is on). A TRL step is
the time between two of its ``on_step_end`` callbacks (the batch is loaded and collated inside); an
upo_ref step is one call of its trainer's step function, which collates too. Each row is the mean
of ``steps`` steps after ``warmup`` in each of ``rounds`` rounds (the three ways take turns, so
that the load of a shared machine hits them alike), +- the standard error over steps; the ratio
TRL / upo_ref is the mean over rounds of the per-round ratios, +- their standard error.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from ..lm.config import TINY_GPT2, ModelConfig, PhaseConfig
from ..lm.models import build_model
from ..lm.tokenize import TokenizedPair
from ..lm.train import PreferencePhase, _make_optimizer, _train_step, reference_logps
from ..losses import PreferenceLoss
from ..utils.stats import mean_se

__all__ = ["TrlStepTiming", "random_pairs", "time_trl_steps", "summarise"]

LR, MAX_GRAD_NORM, BETA = 1e-5, 10.0, 0.1


@dataclass
class TrlStepTiming:
    how: str
    seconds: float
    se: float
    ratio: float
    ratio_se: float


def random_pairs(
    n: int, length: int, prompt: int, vocab: int, seed: int = 0
) -> list[TokenizedPair]:
    """n pairs of random ids in 0 .. vocab-2, each response ending with EOS = vocab - 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (n, 3, length), generator=g).tolist()
    eos = (vocab - 1,)
    return [
        TokenizedPair(
            tuple(x[:prompt]),
            tuple(w[: length - prompt - 1]) + eos,
            tuple(r[: length - prompt - 1]) + eos,
        )
        for x, w, r in ids
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _upo_ref_seconds(model, pairs, vocab, batch, warmup, device) -> list[float]:
    cfg = PhaseConfig(
        n_examples=len(pairs),
        batch_size=batch,
        eval_every=len(pairs),
        lr=LR,
        optimizer="adamw",
        warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM,
    )
    model.to(device)
    reference = reference_logps(model, pairs, batch, vocab - 1, device)  # pi_ref = initial policy
    phase = PreferencePhase(PreferenceLoss("dpo"), BETA, {"train": reference}, pad_id=vocab - 1)
    model.train()
    optimizer = _make_optimizer(model, cfg)
    seconds = []
    for step in range(len(pairs) // batch):
        indices = list(range(step * batch, (step + 1) * batch))
        _sync(device)
        start = time.perf_counter()
        _train_step(
            model, phase, [pairs[i] for i in indices], indices, cfg, optimizer, step, device
        )
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds[warmup:]


def _trl_seconds(model, pairs, vocab, batch, warmup, device, out_dir, loss=None) -> list[float]:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from .synthetic_text import pairs_dataset, word_tokenizer
    from .trl import UPOTrainer

    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            marks.append(time.perf_counter())

    words = [f"w{i}" for i in range(vocab)]
    args = DPOConfig(
        output_dir=str(out_dir),
        report_to=[],
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda",
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        per_device_train_batch_size=batch,
        max_steps=len(pairs) // batch,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.01,  # torch's AdamW default, which upo_ref's trainer uses
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        logging_steps=len(pairs),
        save_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    kwargs = dict(
        args=args,
        train_dataset=pairs_dataset(words, pairs),
        processing_class=word_tokenizer(words),
        callbacks=[StepTimer()],
    )
    trainer = (
        DPOTrainer(model, **kwargs) if loss is None else UPOTrainer(model, **kwargs, loss=loss)
    )
    trainer.remove_callback(PrinterCallback)  # its log lines are not this command's output
    _sync(device)
    marks.append(time.perf_counter())  # the first step's start: training begins at once
    trainer.train()
    return [b - a for a, b in zip(marks, marks[1:], strict=False)][warmup:]


def time_trl_steps(
    *, n_layer, n_head, n_embd, vocab, batch, length, prompt, steps, warmup, device=None, rounds=3
) -> dict[str, list[list[float]]]:
    """Seconds of each timed step, ``{how: [round][step]}``, for upo_ref's trainer step, TRL's and
    TRL+upo_ref's, on copies of one model and the same pairs. The three run one after the other
    in each of ``rounds`` rounds, so that a change of machine load hits all three alike."""
    import tempfile

    if warmup < 1:
        raise ValueError("warmup must be >= 1: TRL's first step includes its loop's setup")
    if not 0 < prompt < length - 1:
        raise ValueError(
            f"need 0 < prompt < length - 1 (a response of >= 2 tokens), got {prompt}, {length}"
        )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(ModelConfig(TINY_GPT2, n_layer, n_head, n_embd), vocab, length)
    pairs = random_pairs((warmup + steps) * batch, length, prompt, vocab)
    out: dict[str, list[list[float]]] = {"upo_ref": [], "TRL": [], "TRL+upo_ref": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            out["upo_ref"].append(
                _upo_ref_seconds(copy.deepcopy(model), pairs, vocab, batch, warmup, device)
            )
            for how, loss in (("TRL", None), ("TRL+upo_ref", PreferenceLoss("dpo"))):
                out[how].append(
                    _trl_seconds(
                        copy.deepcopy(model), pairs, vocab, batch, warmup, device, tmp, loss
                    )
                )
    return out


def summarise(seconds: dict[str, list[list[float]]]) -> list[TrlStepTiming]:
    """Per way: mean seconds per step +- standard error over all its timed steps; and
    ``ratio``, TRL's time over this way's, the mean over rounds +- its standard error (paired by
    round; nan with one round)."""
    trl_rounds = torch.tensor([sum(r) / len(r) for r in seconds["TRL"]], dtype=torch.float64)
    rows = []
    for how, rounds in seconds.items():
        mean, se = mean_se(torch.tensor([s for r in rounds for s in r], dtype=torch.float64))
        per_round = torch.tensor([sum(r) / len(r) for r in rounds], dtype=torch.float64)
        ratios = trl_rounds / per_round
        ratio, ratio_se = mean_se(ratios) if len(ratios) > 1 else (float(ratios[0]), math.nan)
        rows.append(TrlStepTiming(how, mean, se, ratio, ratio_se))
    return rows


def main(args) -> None:
    """The ``trl`` subcommand of ``python -m upo_ref.bench``."""
    import os

    import datasets

    # This command's output only: no progress bars of datasets or of TRL's reference pass.
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"
    device = torch.device(args.device) if args.device else None
    options = ("n_layer", "n_head", "n_embd", "vocab", "batch", "length", "prompt", "steps")
    seconds = time_trl_steps(
        **{k: getattr(args, k) for k in options},
        warmup=args.warmup,
        device=device,
        rounds=args.rounds,
    )
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    name += f", {torch.get_num_threads()} CPU threads"
    precision = "bf16 autocast" if dev.type == "cuda" else "float32"
    print(
        f"DPO step: GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} vocab={args.vocab}, batch "
        f"{args.batch} pairs x {args.length} tokens (prompt {args.prompt}), {precision}, {name}; "
        f"{args.rounds} rounds of {args.steps} steps after {args.warmup}, +- standard errors"
    )
    print(f"{'how':<14}{'s/step':>10}{'+-':>9}{'TRL / this':>12}{'+-':>7}")
    rows = summarise(seconds)
    for r in rows:
        print(f"{r.how:<14}{r.seconds:>10.4f}{r.se:>9.4f}{r.ratio:>12.2f}{r.ratio_se:>7.2f}")
    print(f"upo_ref speed relative to TRL's DPOTrainer: {rows[0].ratio:.2f}x (target >= 1.0)")
