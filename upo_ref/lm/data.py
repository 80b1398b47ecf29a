r"""Preference data as text: the HH-RLHF loader, and what every loader shares (``data_shp``,
``data_trl``): the pair, the load report, the checked reading of JSON-lines files.

The text recipe is the one of the DPO reference code (eric-mitchell/direct-preference-optimization,
``preference_datasets.py``): the **prompt** x of an HH dialogue is the text up to and including the
last ``"\n\nAssistant:"`` of the chosen text, and the responses y_w (chosen) and y_l (rejected) are
what follows it. Tokenization and truncation are ``tokenize``'s.

Where this module differs from the reference code, it is louder, never looser: every failure of
reading a file (a malformed JSON line, a truncated or corrupt gzip, a plain file named ``.gz``,
invalid UTF-8, an empty file, a missing field) raises :class:`DataError` naming the file and line;
a row dropped by a documented filter (SHP's score ratio, an HH row whose rejected text does not
start with the chosen's prompt, a pair whose two responses are the same text) is counted in a
:class:`LoadReport` with its file and line, never dropped silently.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import HH_LOCAL_SUBSETS, HH_SUBSETS

__all__ = [
    "ASSISTANT_TAG",
    "HH_SUBSETS",
    "HH_LOCAL_SUBSETS",
    "HH_URL",
    "IDENTICAL",
    "MISMATCH",
    "DataError",
    "PreferencePair",
    "LoadReport",
    "read_jsonl",
    "split_prompt",
    "load_hh_file",
    "load_hh",
    "download_hh",
]

ASSISTANT_TAG = "\n\nAssistant:"
HUMAN_TAG = "\n\nHuman:"
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
# Such a pair can never count as correct and adds a constant to IPO's and IUPO's losses.
IDENTICAL = "chosen and rejected responses are identical"
MISMATCH = "rejected text does not start with the chosen text's prompt"


class DataError(ValueError):
    """A row of a data file that cannot be read as a preference pair; the message names file and
    line."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference (x, y_w, y_l) as text. ``chosen``/``rejected`` are the responses only.

    ``origin`` is ``"<file>:<line>"`` for error messages and reports; ``scores`` are SHP's
    (score of y_w, score of y_l), None for HH.
    """

    prompt: str
    chosen: str
    rejected: str
    origin: str = ""
    scores: tuple[float, float] | None = None


@dataclass
class LoadReport:
    """What a loader did with every row: ``n_rows`` read, ``n_pairs`` kept, and per reason the
    origins (``file:line``) of the rows it dropped. ``n_rows == n_pairs + sum of dropped``."""

    source: str
    n_rows: int = 0
    n_pairs: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, origin: str) -> None:
        self.dropped.setdefault(reason, []).append(origin)

    def merge(self, other: LoadReport) -> None:
        self.n_rows += other.n_rows
        self.n_pairs += other.n_pairs
        for reason, origins in other.dropped.items():
            self.dropped.setdefault(reason, []).extend(origins)

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.n_rows} rows read, {self.n_pairs} pairs kept"]
        for reason, origins in self.dropped.items():
            shown = ", ".join(origins[:8]) + (
                f", ... ({len(origins) - 8} more)" if len(origins) > 8 else ""
            )
            lines.append(f"  dropped {len(origins)} ({reason}): {shown}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each line of a JSON-lines file, plain or ``.gz``.

    Every failure is a DataError naming the file and the line being read: a line that is not a JSON
    object (a blank line too: the official files have none, so one means a damaged file), invalid
    UTF-8, a truncated or corrupt gzip stream, a plain file named ``.gz``, and a file with no rows.
    Lines are split as bytes and decoded one by one, so a UTF-8 error names its own line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                yield line_no, _parse_line(raw, f"{path}:{line_no}")
    except gzip.BadGzipFile as err:
        if line_no == 0 and "Not a gzipped file" in str(err):
            raise DataError(
                f"{path}: not a gzip file, though its name ends in .gz; compress it (gzip) or drop "
                f"the .gz from its name"
            ) from None
        raise DataError(
            f"{path}:{line_no + 1}: corrupt gzip data ({err}); download or copy the file again"
        ) from None
    except (EOFError, zlib.error) as err:
        raise DataError(
            f"{path}:{line_no + 1}: the gzip stream is truncated or corrupt ({err}); download or "
            f"copy the file again"
        ) from None
    if line_no == 0:
        raise DataError(f"{path}: the file is empty (no rows); a data file needs at least one row")


def _parse_line(raw: bytes, origin: str) -> dict:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{origin}: not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
            f"re-encode the file as UTF-8"
        ) from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{origin}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{origin}: expected a JSON object, got {type(row).__name__}")
    return row


def _require_str(row: dict, keys: Sequence[str], origin: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{origin}: missing field(s) {missing}; the row has {sorted(row)}")
    for k in keys:
        if not isinstance(row[k], str):
            raise DataError(f"{origin}: field {k!r} must be a string, got {type(row[k]).__name__}")


def split_prompt(text: str, origin: str = "") -> tuple[str, str]:
    r"""(prompt, response) of an HH dialogue: the prompt runs up to and including the last
    ``"\n\nAssistant:"``; the response is the rest (it usually starts with a space)."""
    cut = text.rfind(ASSISTANT_TAG)
    if cut == -1:
        raise DataError(
            f"{origin}: the text has no {ASSISTANT_TAG!r}, so there is no prompt to split off: "
            f"{text[:80]!r}"
        )
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


def _keep(pair: PreferencePair, report: LoadReport, keep_identical: bool) -> bool:
    """False (and the pair listed in the report) for a pair whose responses are the same text."""
    if pair.chosen == pair.rejected and not keep_identical:
        report.drop(IDENTICAL, pair.origin)
        return False
    return True


# ------------------------------------------------------------------------------------------------
# HH-RLHF
# ------------------------------------------------------------------------------------------------


def load_hh_file(
    path: str | Path, drop_mismatched: bool = False, keep_identical: bool = False
) -> tuple[list[PreferencePair], LoadReport]:
    """Pairs of one official HH file (``{"chosen": ..., "rejected": ...}`` per line).

    The prompt is split off the chosen text; the rejected text must start with the same prompt.
    In the local files 7 of 7,415 rows break this (e.g. the chosen response itself contains
    ``"\\n\\nAssistant:"``); the reference code silently slices them at the wrong place. Here such a
    row raises DataError, or with ``drop_mismatched=True`` is dropped and listed in the report.
    A pair whose two responses are the same text (34 of the local rows) is dropped and listed, or
    kept with ``keep_identical=True``.
    """
    path = Path(path)
    pairs, report = [], LoadReport(str(path))
    for line_no, row in read_jsonl(path):
        origin = f"{path}:{line_no}"
        report.n_rows += 1
        _require_str(row, ("chosen", "rejected"), origin)
        prompt, chosen = split_prompt(row["chosen"], origin)
        if not row["rejected"].startswith(prompt):
            if drop_mismatched:
                report.drop(MISMATCH, origin)
                continue
            raise DataError(
                f"{origin}: {MISMATCH} (prompt ends {prompt[-60:]!r}); pass drop_mismatched=True "
                "to drop and report such rows"
            )
        pair = PreferencePair(prompt, chosen, row["rejected"][len(prompt) :], origin)
        if _keep(pair, report, keep_identical):
            pairs.append(pair)
    report.n_pairs = len(pairs)
    return pairs, report


def load_hh(
    hh_dir: str | Path,
    split: str = "test",
    subsets: Sequence[str] = HH_LOCAL_SUBSETS,
    drop_mismatched: bool = False,
    keep_identical: bool = False,
) -> tuple[list[PreferencePair], LoadReport]:
    """Pairs of ``<hh_dir>/<subset>/<split>.jsonl.gz`` for each subset, in order, with one report
    (``load_hh_file`` of each)."""
    if not subsets:
        raise ValueError("subsets is empty: name at least one HH subset, e.g. 'helpful-base'")
    pairs, report = [], LoadReport(f"HH-RLHF {split} ({', '.join(subsets)})")
    for subset in subsets:
        path = Path(hh_dir) / subset / f"{split}.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; on these machines only the test files are local "
                "(../shared/data/hh-rlhf); with internet, download_hh() or `python -m "
                "upo_ref.reproduce --hh-split official` fetches the official files"
            )
        p, r = load_hh_file(path, drop_mismatched, keep_identical)
        pairs += p
        report.merge(r)
    return pairs, report


def download_hh(
    dest: str | Path, split: str, subsets: Sequence[str] = HH_SUBSETS, base_url: str = HH_URL
) -> Path:
    """Fetch the official ``<subset>/<split>.jsonl.gz`` files into ``dest`` (those not there yet).

    Each file is written to a temporary name and renamed, so an interrupted download leaves no
    truncated file behind. Returns ``dest``.
    """
    dest = Path(dest)
    for subset in subsets:
        target = dest / subset / f"{split}.jsonl.gz"
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{base_url}/{subset}/{split}.jsonl.gz"
        with urllib.request.urlopen(url) as response:
            with tempfile.NamedTemporaryFile(
                dir=target.parent, suffix=".part", delete=False
            ) as tmp:
                try:
                    shutil.copyfileobj(response, tmp)
                except BaseException:
                    Path(tmp.name).unlink()
                    raise
        Path(tmp.name).replace(target)
    return dest
