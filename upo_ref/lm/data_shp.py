r"""SHP (Stanford Human Preferences) pairs, read as the DPO reference code reads them, every row
checked (:mod:`upo_ref.lm.data` for the conventions)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .data import (
    ASSISTANT_TAG,
    HUMAN_TAG,
    DataError,
    LoadReport,
    PreferencePair,
    _keep,
    _require_str,
    read_jsonl,
)

__all__ = ["SHP_FIELDS", "SHP_MIN_SCORE_RATIO", "shp_files", "load_shp"]

SHP_FIELDS = ("history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B")
SHP_MIN_SCORE_RATIO = 2.0  # the reference code keeps a pair only if max(sA/sB, sB/sA) >= 2


def shp_files(shp_dir: str | Path, split: str) -> list[Path]:
    """The official hub layout: ``<shp_dir>/<subreddit>/<split>.json`` (JSON lines), sorted."""
    files = sorted(Path(shp_dir).glob(f"*/{split}.json"))
    if not files:
        raise FileNotFoundError(
            f"no SHP files {shp_dir}/*/{split}.json; download stanfordnlp/SHP from the hub there"
        )
    return files


def load_shp(
    files: Iterable[str | Path],
    min_score_ratio: float = SHP_MIN_SCORE_RATIO,
    keep_identical: bool = False,
) -> tuple[list[PreferencePair], LoadReport]:
    r"""Pairs of SHP files in the official format (fields ``SHP_FIELDS``; ``labels`` 1 = A
    preferred).

    Prompt ``"\n\nHuman: " + history + "\n\nAssistant:"``, responses ``" " + human_ref_*``, as in
    the reference code, which also keeps only pairs whose score ratio max(sA/sB, sB/sA) is at least
    2: the others are dropped *and counted* in the report. Scores must be positive (a ratio of a
    non-positive score means nothing; the reference code would divide by zero). A pair of identical
    responses is dropped and listed, or kept with ``keep_identical=True``.
    """
    pairs, report = [], LoadReport("SHP")
    for path in files:
        for line_no, row in read_jsonl(path):
            origin = f"{path}:{line_no}"
            report.n_rows += 1
            missing = [k for k in SHP_FIELDS if k not in row]
            if missing:
                raise DataError(
                    f"{origin}: missing field(s) {missing}; an SHP row has {list(SHP_FIELDS)}"
                )
            _require_str(row, ("history", "human_ref_A", "human_ref_B"), origin)
            if row["labels"] not in (0, 1) or isinstance(row["labels"], bool):
                raise DataError(f"{origin}: labels must be 0 or 1, got {row['labels']!r}")
            s_a, s_b = row["score_A"], row["score_B"]
            if not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0
                for s in (s_a, s_b)
            ):
                raise DataError(
                    f"{origin}: score_A and score_B must be positive numbers, got {s_a!r}, {s_b!r}"
                )
            if max(s_a / s_b, s_b / s_a) < min_score_ratio:
                report.drop(f"score ratio < {min_score_ratio:g}", origin)
                continue
            prompt = HUMAN_TAG + " " + row["history"] + ASSISTANT_TAG
            a, b = " " + row["human_ref_A"], " " + row["human_ref_B"]
            if row["labels"] == 1:
                pair = PreferencePair(prompt, a, b, origin, (float(s_a), float(s_b)))
            else:
                pair = PreferencePair(prompt, b, a, origin, (float(s_b), float(s_a)))
            if _keep(pair, report, keep_identical):
                pairs.append(pair)
    report.n_pairs = len(pairs)
    return pairs, report
