"""Pairs in TRL's standard preference format (``prompt``, ``chosen``, ``rejected``), every row
checked (:mod:`upo_ref.lm.data` for the conventions)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .data import DataError, LoadReport, PreferencePair, _keep, read_jsonl

__all__ = ["TRL_FIELDS", "load_trl"]

TRL_FIELDS = ("prompt", "chosen", "rejected")


def load_trl(
    source: str | Path | Iterable[dict], keep_identical: bool = False
) -> tuple[list[PreferencePair], LoadReport]:
    """Pairs in TRL's standard preference format with an explicit prompt: one
    ``{"prompt": x, "chosen": y_w, "rejected": y_l}`` (strings) per row.

    ``source`` is a JSON-lines file (plain or ``.gz``; origins ``file:line``) or any iterable of
    dicts, such as a ``datasets.Dataset`` (origins ``row i``, counted from 0). A row missing a field
    or holding a non-string (TRL's conversational format, lists of messages: apply the chat
    template first) is a DataError naming its origin; other fields are ignored. Responses are taken
    as they are: unlike HH, nothing is split off them. A pair of identical responses is dropped and
    listed, or kept with ``keep_identical=True``.
    """
    if isinstance(source, (str, Path)):
        rows = ((f"{source}:{n}", row) for n, row in read_jsonl(source))
        report = LoadReport(f"TRL-format {source}")
    else:
        rows = ((f"row {i}", row) for i, row in enumerate(source))
        report = LoadReport("TRL-format rows")
    pairs = []
    for origin, row in rows:
        report.n_rows += 1
        if not isinstance(row, dict):
            raise DataError(f"{origin}: expected a dict with {list(TRL_FIELDS)}, got {row!r:.80}")
        missing = [k for k in TRL_FIELDS if k not in row]
        if missing:
            raise DataError(
                f"{origin}: missing field(s) {missing}; a TRL preference row has "
                f"{list(TRL_FIELDS)} (the implicit-prompt format, prompt inside chosen, is not "
                "read)"
            )
        for k in TRL_FIELDS:
            if not isinstance(row[k], str):
                raise DataError(
                    f"{origin}: field {k!r} must be a string, got {type(row[k]).__name__}; for "
                    f"TRL's conversational format apply the tokenizer's chat template first"
                )
        pair = PreferencePair(row["prompt"], row["chosen"], row["rejected"], origin)
        if _keep(pair, report, keep_identical):
            pairs.append(pair)
    if report.n_rows == 0:
        raise DataError(f"{report.source}: no rows; a preference data set needs at least one")
    report.n_pairs = len(pairs)
    return pairs, report
