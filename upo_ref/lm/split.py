"""The train/eval split of preference pairs by a hash of the prompt, and the SFT targets.

The local HH files are the official *test* split only; ``split_by_prompt_hash`` divides them (or
any list of pairs) into train and eval so that no prompt is on both sides, the same way on every
machine. ``sft_examples`` picks one SFT target per distinct prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .data import PreferencePair

__all__ = ["prompt_hash_fraction", "split_by_prompt_hash", "sft_examples"]


def prompt_hash_fraction(prompt: str) -> float:
    """A number in [0, 1) fixed by the prompt text: the first 8 hex digits of its SHA-256 / 16^8."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) / 16**8


def split_by_prompt_hash(
    pairs: Sequence[PreferencePair], eval_fraction: float
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval): a pair goes to eval iff ``prompt_hash_fraction(prompt) < eval_fraction``.

    The split depends on nothing but the prompt's text (no seed, no file order), so it is the same
    on every machine and every run, and pairs sharing a prompt always land on the same side: no
    prompt is trained on and evaluated on. The eval side holds about ``eval_fraction`` of the pairs.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    train, held_out = [], []
    for p in pairs:
        (held_out if prompt_hash_fraction(p.prompt) < eval_fraction else train).append(p)
    if not train or not held_out:
        raise ValueError(
            f"the prompt-hash split of {len(pairs)} pairs at eval_fraction={eval_fraction} left "
            f"{len(train)} train and {len(held_out)} eval pairs; both sides need at least one"
        )
    return train, held_out


def sft_examples(pairs: Sequence[PreferencePair]) -> list[tuple[str, str]]:
    """(prompt, target) per distinct prompt, in order of first appearance.

    The target is the chosen response of the prompt's first pair (HH, as in the reference code),
    or, where pairs carry scores (SHP), the highest-scored response among all its pairs.
    """
    best: dict[str, tuple[float, str]] = {}
    for p in pairs:
        if p.scores is None:
            best.setdefault(p.prompt, (0.0, p.chosen))
            continue
        for score, response in zip(p.scores, (p.chosen, p.rejected), strict=True):
            if p.prompt not in best or score > best[p.prompt][0]:
                best[p.prompt] = (score, response)
    return [(prompt, target) for prompt, (_, target) in best.items()]
