r"""Preference data: HH-RLHF and SHP loaders, the prompt-hash train/eval split, tokenization, collation.

The recipe is the one of the DPO reference code (eric-mitchell/direct-preference-optimization,
``preference_datasets.py``), which the paper's GPT-2 experiments build on:

* **prompt** x = the dialogue up to and including the last ``"\n\nAssistant:"`` of the chosen text;
  the responses y_w (chosen) and y_l (rejected) are what follows it;
* **EOS** is appended to each response, so a model learns where an answer ends;
* **labels** are the input ids with the prompt masked out (``IGNORE_INDEX``): only response tokens
  enter log pi(y | x);
* **truncation**: if prompt + longer response exceeds ``max_length`` tokens, the prompt is cut to
  ``max_prompt_length`` tokens (HH keeps its *end*, the turn being answered; SHP keeps its start);
  if that is still too long, both responses are cut to ``max_length - max_prompt_length`` tokens
  (and then lose their EOS, as in the reference code).

Where this module differs from the reference code, it is louder, never looser: a malformed line
raises :class:`DataError` naming the file and line; a row dropped by a documented filter (SHP's
score ratio, an HH row whose rejected text does not start with the chosen's prompt) is counted in
a :class:`LoadReport` with its file and line, never dropped silently.

Shapes: a collated batch of B pairs holds ``input_ids``, ``attention_mask`` and ``labels`` of shape
(2B, T): rows 0..B-1 are the chosen sequences (x, y_w), rows B..2B-1 the rejected (x, y_l), padded
on the right to the longest of the 2B sequences, so one forward pass serves both.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "ASSISTANT_TAG",
    "HH_SUBSETS",
    "HH_LOCAL_SUBSETS",
    "HH_URL",
    "DataError",
    "PreferencePair",
    "LoadReport",
    "read_jsonl",
    "split_prompt",
    "load_hh_file",
    "load_hh",
    "download_hh",
    "load_shp",
    "shp_files",
    "prompt_hash_fraction",
    "split_by_prompt_hash",
    "sft_examples",
    "TokenizedPair",
    "truncate",
    "tokenize_pairs",
    "tokenize_sft",
    "CompactVocab",
    "collate_sequences",
    "collate_pairs",
]

IGNORE_INDEX = (
    -100
)  # label of a position that enters no log-prob (prompt, padding); torch's ignore_index
ASSISTANT_TAG = "\n\nAssistant:"
HUMAN_TAG = "\n\nHuman:"

# The four preference subsets of Anthropic/hh-rlhf (what ``datasets.load_dataset("Anthropic/hh-rlhf")``
# concatenates); red-team-attempts has no pairs. Only the first three are on these machines.
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_LOCAL_SUBSETS = ("harmless-base", "helpful-base", "helpful-rejection-sampled")
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"


class DataError(ValueError):
    """A row of a data file that cannot be read as a preference pair; the message names file and line."""


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

    Raises DataError naming the file and line for a line that is not a JSON object; a blank line
    is an error too (the official files have none, so one means a damaged file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}"
                )
            yield line_no, row


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
            f"{origin}: the text has no {ASSISTANT_TAG!r}, so there is no prompt to split off: {text[:80]!r}"
        )
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


# ------------------------------------------------------------------------------------------------
# HH-RLHF
# ------------------------------------------------------------------------------------------------

MISMATCH = "rejected text does not start with the chosen text's prompt"


def load_hh_file(
    path: str | Path, drop_mismatched: bool = False
) -> tuple[list[PreferencePair], LoadReport]:
    """Pairs of one official HH file (``{"chosen": ..., "rejected": ...}`` per line).

    The prompt is split off the chosen text; the rejected text must start with the same prompt.
    In the local files 7 of 7,415 rows break this (e.g. the chosen response itself contains
    ``"\\n\\nAssistant:"``); the reference code silently slices them at the wrong place. Here such a
    row raises DataError, or with ``drop_mismatched=True`` is dropped and listed in the report.
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
                f"{origin}: {MISMATCH} (prompt ends {prompt[-60:]!r}); pass drop_mismatched=True to drop "
                f"and report such rows"
            )
        pairs.append(PreferencePair(prompt, chosen, row["rejected"][len(prompt) :], origin))
    report.n_pairs = len(pairs)
    return pairs, report


def load_hh(
    hh_dir: str | Path,
    split: str = "test",
    subsets: Sequence[str] = HH_LOCAL_SUBSETS,
    drop_mismatched: bool = False,
) -> tuple[list[PreferencePair], LoadReport]:
    """Pairs of ``<hh_dir>/<subset>/<split>.jsonl.gz`` for each subset, in order, with one report."""
    if not subsets:
        raise ValueError("subsets is empty: name at least one HH subset, e.g. 'helpful-base'")
    pairs, report = [], LoadReport(f"HH-RLHF {split} ({', '.join(subsets)})")
    for subset in subsets:
        path = Path(hh_dir) / subset / f"{split}.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; on these machines only the test files are local (../shared/data/hh-rlhf); "
                f"with internet, download_hh() or `python -m upo_ref.reproduce --hh-split official` fetches "
                f"the official files"
            )
        p, r = load_hh_file(path, drop_mismatched)
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


# ------------------------------------------------------------------------------------------------
# SHP (Stanford Human Preferences)
# ------------------------------------------------------------------------------------------------

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
    files: Iterable[str | Path], min_score_ratio: float = SHP_MIN_SCORE_RATIO
) -> tuple[list[PreferencePair], LoadReport]:
    r"""Pairs of SHP files in the official format (fields ``SHP_FIELDS``; ``labels`` 1 = A preferred).

    Prompt ``"\n\nHuman: " + history + "\n\nAssistant:"``, responses ``" " + human_ref_*``, as in the
    reference code, which also keeps only pairs whose score ratio max(sA/sB, sB/sA) is at least 2:
    the others are dropped *and counted* in the report. Scores must be positive (a ratio of a
    non-positive score means nothing; the reference code would divide by zero).
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
                pairs.append(PreferencePair(prompt, a, b, origin, (float(s_a), float(s_b))))
            else:
                pairs.append(PreferencePair(prompt, b, a, origin, (float(s_b), float(s_a))))
    report.n_pairs = len(pairs)
    return pairs, report


# ------------------------------------------------------------------------------------------------
# The train/eval split of the local HH files, and SFT targets
# ------------------------------------------------------------------------------------------------


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
        for score, response in zip(p.scores, (p.chosen, p.rejected)):
            if p.prompt not in best or score > best[p.prompt][0]:
                best[p.prompt] = (score, response)
    return [(prompt, target) for prompt, (_, target) in best.items()]


# ------------------------------------------------------------------------------------------------
# Tokenization and truncation
# ------------------------------------------------------------------------------------------------

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
            f"need 0 < max_prompt_length < max_length (room for a response), got {max_prompt_length}, {max_length}"
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


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
) -> list[TokenizedPair]:
    """Tokenize prompt and responses separately (no special tokens), append EOS, truncate."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS")
    prompts = _token_ids(tokenizer, [p.prompt for p in pairs])
    chosen = _token_ids(tokenizer, [p.chosen for p in pairs])
    rejected = _token_ids(tokenizer, [p.rejected for p in pairs])
    out = []
    for p, x, yw, yl in zip(pairs, prompts, chosen, rejected):
        for ids, what in ((x, "prompt"), (yw, "chosen response"), (yl, "rejected response")):
            _check_tokens(ids, eos, what, p.origin)
        if not x:
            raise DataError(
                f"{p.origin}: the prompt is empty; the first response token would have no context"
            )
        x, (yw, yl) = truncate(
            x, [yw + [eos], yl + [eos]], max_length, max_prompt_length, truncation_mode
        )
        out.append(TokenizedPair(x, yw, yl))
    return out


def tokenize_sft(
    examples: Sequence[tuple[str, str]],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
) -> list[TokenizedPair]:
    """SFT examples as TokenizedPair with rejected = chosen = the target (the reference code does the
    same); SFT uses only (prompt, chosen)."""
    pairs = [PreferencePair(x, y, y, f"sft example {i}") for i, (x, y) in enumerate(examples)]
    return tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length, truncation_mode)


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
    the padding id); ``unk_id`` = size-1. ``ids`` maps original id -> compact id for the kept tokens.
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
