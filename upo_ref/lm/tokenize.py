r"""Tokenization, truncation, a compact vocabulary and collation of preference pairs.

The recipe is the one of the DPO reference code (eric-mitchell/direct-preference-optimization,
``preference_datasets.py``), which the paper's GPT-2 experiments build on (the text side, prompt
and responses, is ``data``'s):

* **EOS** is appended to each response, so a model learns where an answer ends;
* **labels** are the input ids with the prompt masked out (``IGNORE_INDEX``): only response tokens
  enter log pi(y | x);
* **truncation**: if prompt + longer response exceeds ``max_length`` tokens, the prompt is cut to
  ``max_prompt_length`` tokens (HH keeps its *end*, the turn being answered; SHP keeps its start);
  if that is still too long, both responses are cut to ``max_length - max_prompt_length`` tokens
  (and then lose their EOS, as in the reference code).

Shapes: a collated batch of B pairs holds ``input_ids``, ``attention_mask`` and ``labels`` of shape
(2B, T): rows 0..B-1 are the chosen sequences (x, y_w), rows B..2B-1 the rejected (x, y_l), padded
on the right to the longest of the 2B sequences, so one forward pass serves both.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import DataError, LoadReport, PreferencePair
from .logprobs import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "IDENTICAL_AFTER_TRUNCATION",
    "TRUNCATION_MODES",
    "TokenizedPair",
    "truncate",
    "tokenize_pairs",
    "tokenize_sft",
    "CompactVocab",
    "fingerprint",
    "collate_sequences",
    "collate_pairs",
]

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of (x, y_w, y_l) after truncation; responses carry their EOS unless cut."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


def truncate(
    prompt: Sequence[int],
    responses: Sequence[Sequence[int]],
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The reference code's truncation (``tokenize_batch_element``), for any number of responses.

    Let L = len(prompt) + the longest response. If L > max_length the prompt keeps its last
    (``"keep_end"``) or first (``"keep_start"``) ``max_prompt_length`` tokens; if that is still too
    long, every response keeps its first ``max_length - max_prompt_length`` tokens. Afterwards
    len(prompt) + len(response) <= max_length for every response.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}"
        )
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            "need 0 < max_prompt_length < max_length (room for a response), got "
            f"{max_prompt_length}, {max_length}"
        )
    prompt, responses = tuple(prompt), [tuple(r) for r in responses]
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        prompt = (
            prompt[-max_prompt_length:]
            if truncation_mode == "keep_end"
            else prompt[:max_prompt_length]
        )
    if len(prompt) + longest > max_length:
        responses = [r[: max_length - max_prompt_length] for r in responses]
    return prompt, responses


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _check_tokens(ids: Sequence[int], eos_id: int, what: str, origin: str) -> None:
    if eos_id in ids:
        raise DataError(
            f"{origin}: the {what} contains the EOS token {eos_id} before the end; clean the text"
        )


IDENTICAL_AFTER_TRUNCATION = "chosen and rejected responses identical after truncation"


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    report: LoadReport | None = None,
    keep_identical: bool = False,
) -> list[TokenizedPair]:
    """Tokenize prompt and responses separately (no special tokens), append EOS, truncate.

    A pair whose two responses are the same tokens after truncation (cut to the same first
    ``max_length - max_prompt_length`` tokens) can never be ranked correctly and adds a constant to
    IPO's and IUPO's losses: it is dropped and listed in ``report`` (reason
    ``IDENTICAL_AFTER_TRUNCATION``), or kept with ``keep_identical=True``. With neither, such a pair
    is a DataError naming its origin.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS")
    prompts = _token_ids(tokenizer, [p.prompt for p in pairs])
    chosen = _token_ids(tokenizer, [p.chosen for p in pairs])
    rejected = _token_ids(tokenizer, [p.rejected for p in pairs])
    out = []
    for p, x, yw, yl in zip(pairs, prompts, chosen, rejected, strict=True):
        for ids, what in ((x, "prompt"), (yw, "chosen response"), (yl, "rejected response")):
            _check_tokens(ids, eos, what, p.origin)
        if not x:
            raise DataError(
                f"{p.origin}: the prompt is empty; the first response token would have no context"
            )
        x, (yw, yl) = truncate(
            x, [yw + [eos], yl + [eos]], max_length, max_prompt_length, truncation_mode
        )
        if yw == yl and not keep_identical:
            if report is None:
                raise DataError(
                    f"{p.origin}: {IDENTICAL_AFTER_TRUNCATION} (max_length {max_length}); pass a "
                    f"LoadReport to drop and list such pairs, or keep_identical=True to keep them"
                )
            report.drop(IDENTICAL_AFTER_TRUNCATION, p.origin)
            continue
        out.append(TokenizedPair(x, yw, yl))
    if report is not None:
        report.n_rows += len(pairs)
        report.n_pairs += len(out)
    return out


def tokenize_sft(
    examples: Sequence[tuple[str, str]],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
) -> list[TokenizedPair]:
    """SFT examples as TokenizedPair with rejected = chosen = the target (the reference code does
    the same); SFT uses only (prompt, chosen)."""
    pairs = [PreferencePair(x, y, y, f"sft example {i}") for i, (x, y) in enumerate(examples)]
    return tokenize_pairs(
        pairs, tokenizer, max_length, max_prompt_length, truncation_mode, keep_identical=True
    )


class CompactVocab:
    """A small vocabulary for a model trained from scratch: the ``size - 2`` most frequent tokens of
    the training data, EOS, and one UNK id for every other token.

    Why: a random-init model on a CPU spends most of its time in the output softmax, one row of
    ``len(vocab)`` logits per response token; GPT-2's 50,257 ids make that ~12x costlier than 4,096
    ids, and the rare ones are never learnt by such a model anyway. Built from the *training* split
    only (``build``), it maps every split (``remap``); a token it has not kept becomes UNK, so
    log pi(y|x) is the probability of the response with its rare tokens merged into one symbol.

    Ids: 0 .. size-3 are the kept tokens in order of decreasing count (equal counts: lower original
    id first); ``eos_id`` = size-2 is EOS (kept whatever its count: it ends every response and is
    the padding id); ``unk_id`` = size-1. ``ids`` maps original id -> compact id for the kept
    tokens.
    """

    def __init__(self, ids: dict[int, int], size: int):
        self.ids, self.size = dict(ids), size
        self.eos_id, self.unk_id = size - 2, size - 1

    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]], size: int, eos_id: int) -> CompactVocab:
        """Count the tokens of ``sequences`` (original ids) and keep the ``size - 2`` most frequent
        besides ``eos_id``."""
        if size < 3:
            raise ValueError(
                f"a compact vocabulary needs room for a token, EOS and UNK: size >= 3, got {size}"
            )
        counts: dict[int, int] = {}
        for seq in sequences:
            for t in seq:
                counts[t] = counts.get(t, 0) + 1
        counts.pop(eos_id, None)
        kept = sorted(counts, key=lambda t: (-counts[t], t))[: size - 2]
        return cls({**{t: i for i, t in enumerate(kept)}, eos_id: size - 2}, size)

    def encode(self, ids: Sequence[int]) -> tuple[int, ...]:
        """Original ids -> compact ids (UNK for a token not kept)."""
        return tuple(self.ids.get(t, self.unk_id) for t in ids)

    def remap(self, pairs: Sequence[TokenizedPair]) -> list[TokenizedPair]:
        """Every pair with its prompt and responses encoded; lengths are unchanged."""
        return [
            TokenizedPair(self.encode(p.prompt), self.encode(p.chosen), self.encode(p.rejected))
            for p in pairs
        ]

    @staticmethod
    def coverage(pairs: Sequence[TokenizedPair], unk_id: int) -> float:
        """Fraction of the response tokens of encoded ``pairs`` that are not UNK."""
        tokens = [t for p in pairs for t in p.chosen + p.rejected]
        return sum(t != unk_id for t in tokens) / max(len(tokens), 1)


def fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """The SHA-256 (hex) of the token ids of ``pairs``, in order: what a checkpoint and a set of
    reference log-probs record of the data they were made with. Each sequence enters with its
    length, so no two different lists of pairs share a byte stream."""
    h = hashlib.sha256()
    for p in pairs:
        for seq in (p.prompt, p.chosen, p.rejected):
            h.update(array("q", (len(seq), *seq)).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Collation
# ------------------------------------------------------------------------------------------------


def collate_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> dict[str, Tensor]:
    """(prompt, response) id lists -> ``input_ids``, ``attention_mask``, ``labels``, each (N, T).

    input = prompt + response, right-padded with ``pad_id`` to the longest T; labels = input with
    prompt and padding set to IGNORE_INDEX; attention_mask = 1 on real tokens, 0 on padding.
    """
    if not sequences:
        raise ValueError("cannot collate an empty batch")
    T = max(len(x) + len(y) for x, y in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)  # (N, T)
    labels = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)  # (N, T)
    for i, (x, y) in enumerate(sequences):
        n = len(x) + len(y)
        input_ids[i, :n] = torch.tensor(list(x) + list(y), dtype=torch.long)
        labels[i, len(x) : n] = torch.tensor(list(y), dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int
) -> dict[str, Tensor]:
    """B pairs -> one concatenated batch: rows 0..B-1 (x, y_w), rows B..2B-1 (x, y_l), each (2B, T),
    plus ``index`` (B,), the pairs' positions in their dataset (to look up pi_ref's log-probs)."""
    batch = collate_sequences(
        [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs], pad_id
    )
    batch["index"] = torch.tensor(list(indices), dtype=torch.long)  # (B,)
    return batch
