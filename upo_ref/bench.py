"""Benchmarks. ``python -m upo_ref.bench losses``: forward+backward time of every loss and divergence.

Each timing is the median of ``--repeats`` runs (after warm-up) of: four leaf tensors of
``--pairs`` float32 log-probs -> per-example loss -> ``.mean().backward()``, on the CPU. The input
checks every loss performs are included, as they are in training. The last column is the ratio to
``dpo_loss``; the target is <= 3 for every loss.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from .divergences import DIVERGENCE_NAMES, get_divergence
from .losses import PreferenceLoss


@dataclass
class LossTiming:
    label: str
    seconds: float
    ratio_to_dpo: float


def loss_zoo() -> list[PreferenceLoss]:
    """DPO, IPO, and f-DPO and IUPO (both forms) for every divergence (alpha = 0.5)."""
    zoo = [PreferenceLoss("dpo"), PreferenceLoss("ipo")]
    for name in DIVERGENCE_NAMES:
        div = get_divergence(name, alpha=0.5 if name == "alpha" else None)
        zoo += [PreferenceLoss("fdpo", div), PreferenceLoss("iupo", div), PreferenceLoss("iupo", div, "kkt")]
    return zoo


def time_losses(pairs: int = 65536, repeats: int = 50, beta: float = 0.1, seed: int = 0) -> list[LossTiming]:
    """Median forward+backward seconds per loss on float32 log-probs of ``pairs`` pairs."""
    g = torch.Generator().manual_seed(seed)
    # Summed log-probs: reference chosen in [-300, 0], rejected within +-20 nats of it (so that the
    # paper-form IUPO of forward KL / alpha, f'(e^{pc - pr}) ~ e^{|pc - pr|}, stays inside float32),
    # policy within +-5 nats of the reference.
    ref_chosen = -300 * torch.rand(pairs, generator=g)
    ref = torch.stack([ref_chosen, ref_chosen + 40 * torch.rand(pairs, generator=g) - 20])
    pol = ref + 10 * torch.rand(2, pairs, generator=g) - 5
    timings = []
    for loss in loss_zoo():
        runs = []
        for i in range(repeats + 5):
            leaves = [x.clone().requires_grad_(True) for x in (pol[0], pol[1], ref[0], ref[1])]
            start = time.perf_counter()
            loss(*leaves, beta).mean().backward()
            if i >= 5:  # warm-up
                runs.append(time.perf_counter() - start)
        timings.append((loss.label, statistics.median(runs)))
    dpo = timings[0][1]
    return [LossTiming(label, s, s / dpo) for label, s in timings]


def _losses_main(args) -> None:
    rows = time_losses(args.pairs, args.repeats)
    print(f"forward+backward, {args.pairs} pairs, float32, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'loss':<28}{'ms':>10}{'x DPO':>8}")
    for row in rows:
        print(f"{row.label:<28}{row.seconds * 1e3:>10.3f}{row.ratio_to_dpo:>8.2f}")
    worst = max(rows, key=lambda r: r.ratio_to_dpo)
    print(f"slowest relative to DPO: {worst.label} at {worst.ratio_to_dpo:.2f}x (target <= 3x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m upo_ref.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("losses", help="forward+backward time of every loss and divergence")
    p.add_argument("--pairs", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=50)
    p.set_defaults(func=_losses_main)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
