r"""Auxiliary rewards that work offline: readability (Flesch) and safety (a harmlessness scorer).

UPO's auxiliary rewards are designer objectives scored per response, not preferences (Badrinath et
al. use readability and a safety classifier). Both here need no download.

Readability
-----------
Flesch reading ease (Flesch 1948) and Flesch-Kincaid grade level (Kincaid et al. 1975):

.. math::

    FRE = 206.835 - 1.015 \frac{words}{sentences} - 84.6 \frac{syllables}{words}, \qquad
    FKGL = 0.39 \frac{words}{sentences} + 11.8 \frac{syllables}{words} - 15.59.

Higher FRE is easier text (60-70 is plain English); FKGL is a US school grade. Syllables come from
:func:`count_syllables`, a rule-based counter (no dictionary download), so scores can differ by a
point or two from tools that use a pronouncing dictionary.

Safety
------
The paper scores safety with a toxicity classifier (toxic-bert, per its summary card), which cannot
be downloaded here. This module trains its own: a linear Bradley-Terry scorer on hashed word uni-
and bi-grams, fitted to which of two assistant replies crowdworkers judged *more harmless* in the
local Anthropic HH-RLHF ``harmless-base`` pairs (:func:`train_safety_scorer`). It is a harmlessness
reward model, not a toxicity classifier: its score is a logit-scale reward, higher is safer, and
only differences between responses are meaningful. Why this one:

* it installs nothing (torch only) and trains in seconds, deterministically, on data already on
  disk;
* it measures the harm HH is about (help with dangerous requests), which a profanity classifier
  such as ``alt-profanity-check`` (a linear SVM on offensive-language data that ships its weights
  in its wheel, but needs scikit-learn and scipy) does not; this scorer ranks held-out pairs
  correctly in 0.628 of them (notebook 06 prints it; ``tests/test_rewards.py`` checks it is above
  chance with 3 standard errors to spare).

Only the harmless-base *test* split exists offline, so the scorer trains on the pairs of 80 % of
its prompts and is measured on the other 20 %, split by the pipeline's prompt-hash rule
(:func:`harmless_pairs`); anything that evaluates "safety" with it must use the held-out part or
other data.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lm.data import LoadReport, PreferencePair, load_hh
from ..lm.split import split_by_prompt_hash
from ..utils.paths import hh_dir

__all__ = [
    "count_syllables",
    "TextStats",
    "text_stats",
    "flesch_reading_ease",
    "flesch_kincaid_grade",
    "readability_rewards",
    "SAFETY_FEATURE_DIM",
    "word_tokens",
    "hashed_ngram_features",
    "LinearTextScorer",
    "train_bradley_terry_scorer",
    "SAFETY_HELD_OUT",
    "harmless_pairs",
    "train_safety_scorer",
    "pairwise_accuracy",
]

# --- readability ----------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # words are runs of letters, with inner apostrophes
_SENTENCE_END = re.compile(r"[.!?]+")
_VOWELS = frozenset("aeiouy")
# After these "-es" is its own syllable (boxes, wishes, churches; places, judges); else silent.
_SYLLABIC_ES_AFTER = ("s", "x", "z", "ch", "sh")  # ... + "es"
_SYLLABIC_S_AFTER = ("ce", "ge")  # ... + "s"


def count_syllables(word: str) -> int:
    """Rule-based English syllable count, at least 1 for any word with a letter (0 for none).

    1. Count groups of consecutive vowels (a e i o u, and y except at the start of a word or right
       after a vowel, where it is a consonant: "yes", "play", "beyond").
    2. A final silent "e" takes one away (cake, there), except "-le" after a consonant (table,
       people) and "-ee" (free).
    3. A final "-ed" is silent except after t or d (walked 1, wanted 2); a final "-es" is silent
       except after s, x, z, ce, ge, ch, sh (makes 1, boxes 2).

    Rules 2-3 never take a word below one syllable. Known misses (a dictionary would get them):
    vowel pairs spoken as two syllables (created, radio: one short) and "y" before a vowel after a
    consonant (crying: one short).
    """
    w = "".join(c for c in word.lower() if "a" <= c <= "z")
    if not w:
        return 0
    groups, previous_vowel = 0, False
    for i, c in enumerate(w):
        vowel = c in _VOWELS and not (c == "y" and (i == 0 or previous_vowel))
        if vowel and not previous_vowel:
            groups += 1
        previous_vowel = vowel
    silent = 0
    if w.endswith("e") and not w.endswith("ee"):
        consonant_le = w.endswith("le") and len(w) > 2 and w[-3] not in _VOWELS
        silent = 0 if consonant_le else 1
    elif w.endswith("ed") and len(w) > 3 and w[-3] not in "td":
        silent = 1
    elif w.endswith("es") and len(w) > 3:
        syllabic = w[:-2].endswith(_SYLLABIC_ES_AFTER) or w[:-1].endswith(_SYLLABIC_S_AFTER)
        silent = 0 if syllabic else 1
    return max(1, groups - silent)


@dataclass(frozen=True)
class TextStats:
    """Counts behind the Flesch formulas."""

    sentences: int
    words: int
    syllables: int


def text_stats(text: str) -> TextStats:
    """Sentences (runs ended by . ! or ?, plus an unterminated last one, each holding a word), words
    (runs of letters, apostrophes inside: "don't" is one) and their syllables."""
    words = _WORD.findall(text)
    sentences = sum(1 for part in _SENTENCE_END.split(text) if _WORD.search(part))
    return TextStats(sentences, len(words), sum(count_syllables(w) for w in words))


def _rates(text: str) -> tuple[float, float]:
    s = text_stats(text)
    if s.words == 0:
        raise ValueError(
            f"text has no words, so its Flesch score is undefined: {text[:40]!r}; score empty "
            "responses with readability_rewards(..., empty=...)"
        )
    return s.words / s.sentences, s.syllables / s.words


def flesch_reading_ease(text: str) -> float:
    """FRE = 206.835 - 1.015 words/sentence - 84.6 syllables/word (higher is easier)."""
    words_per_sentence, syllables_per_word = _rates(text)
    return 206.835 - 1.015 * words_per_sentence - 84.6 * syllables_per_word


def flesch_kincaid_grade(text: str) -> float:
    """FKGL = 0.39 words/sentence + 11.8 syllables/word - 15.59 (a US school grade)."""
    words_per_sentence, syllables_per_word = _rates(text)
    return 0.39 * words_per_sentence + 11.8 * syllables_per_word - 15.59


def readability_rewards(
    texts: list[str], scale: float = 0.01, empty: float = 0.0, dtype=torch.float32
) -> Tensor:
    """Readability reward per response, (B,): ``scale`` x Flesch reading ease (``empty`` for no
    words).

    The default scale 1/100 puts the reward in "hundreds of FRE points" (the chosen replies of HH
    helpful-base have 5 %, 50 % and 95 % quantiles 0.41, 0.77 and 1.04), a unit in which advantage
    temperatures alpha of order 0.1-1 are sensible. (A reconstruction:
    the paper's exact readability reward is not available here.)
    """
    out = [empty if text_stats(t).words == 0 else scale * flesch_reading_ease(t) for t in texts]
    return torch.tensor(out, dtype=dtype)


# --- safety: a linear Bradley-Terry scorer on hashed n-grams -------------------------------------
SAFETY_FEATURE_DIM = (
    2**14
)  # hashed feature buckets: collisions are rare for HH's ~20k distinct n-grams
_TOKEN = re.compile(r"[a-z0-9']+")


def word_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters, digits and apostrophes."""
    return _TOKEN.findall(text.lower())


def hashed_ngram_features(
    texts: list[str], dim: int = SAFETY_FEATURE_DIM, ngrams: tuple[int, ...] = (1, 2)
) -> Tensor:
    """Count the word n-grams of each text into ``dim`` buckets by CRC-32 (stable across runs,
    unlike Python's salted ``hash``), then scale each row to unit L2 norm; a sparse (B, dim) float64
    tensor.

    A text with no tokens is an all-zero row.
    """
    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        tokens = word_tokens(text)
        counts: dict[int, float] = {}
        for n in ngrams:
            for j in range(len(tokens) - n + 1):
                bucket = zlib.crc32(" ".join(tokens[j : j + n]).encode()) % dim
                counts[bucket] = counts.get(bucket, 0.0) + 1.0
        norm = math.sqrt(sum(v * v for v in counts.values())) or 1.0
        for bucket, v in sorted(counts.items()):
            rows.append(i)
            cols.append(bucket)
            vals.append(v / norm)
    index = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(
        index, torch.tensor(vals, dtype=torch.float64), (len(texts), dim), check_invariants=True
    ).coalesce()


@dataclass(frozen=True)
class LinearTextScorer:
    """score(text) = w . phi(text), phi = :func:`hashed_ngram_features`. Higher is better
    (safer)."""

    weight: Tensor  # (dim,) float64
    ngrams: tuple[int, ...] = (1, 2)

    def __call__(self, texts: list[str]) -> Tensor:
        """Scores, (B,) float64."""
        features = hashed_ngram_features(texts, self.weight.shape[0], self.ngrams)
        return torch.sparse.mm(features, self.weight.unsqueeze(-1)).squeeze(-1)


def train_bradley_terry_scorer(
    chosen: list[str],
    rejected: list[str],
    dim: int = SAFETY_FEATURE_DIM,
    l2: float = 1e-3,
    ngrams: tuple[int, ...] = (1, 2),
    max_iter: int = 100,
) -> LinearTextScorer:
    r"""Fit w by L-BFGS on the Bradley-Terry log-loss mean_i softplus(-(w.phi(c_i) - w.phi(r_i))) +
    l2 |w|^2.

    Convex, started at w = 0, so the result is deterministic. ``chosen[i]`` is preferred to
    ``rejected[i]``.
    """
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(
            f"chosen and rejected must be non-empty lists of equal length, got {len(chosen)} and "
            f"{len(rejected)}"
        )
    diff = (
        hashed_ngram_features(chosen, dim, ngrams) - hashed_ngram_features(rejected, dim, ngrams)
    ).coalesce()
    w = torch.zeros(dim, 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        margin = torch.sparse.mm(diff, w).squeeze(-1)  # (N,) score(chosen) - score(rejected)
        loss = F.softplus(-margin).mean() + l2 * w.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return LinearTextScorer(w.detach().squeeze(-1), ngrams)


# The share of harmless-base prompts held out to measure the safety scorer.
SAFETY_HELD_OUT = 0.2


def harmless_pairs(
    root: str | Path | None = None,
) -> tuple[list[PreferencePair], list[PreferencePair], LoadReport]:
    """(train, held-out, report): the local HH-RLHF harmless-base test file, read by the pipeline's
    loader (``lm.data.load_hh``; rows whose rejected text does not start with the chosen text's
    prompt, and rows whose two responses are identical, are dropped and listed in the report) and
    split by the pipeline's prompt-hash rule
    (``lm.split.split_by_prompt_hash``) with :data:`SAFETY_HELD_OUT` of the prompts held out.
    ``root`` is the HH folder (default ``<shared>/data/hh-rlhf``)."""
    root = Path(root) if root is not None else hh_dir()
    pairs, report = load_hh(root, "test", ("harmless-base",), drop_mismatched=True)
    train, held_out = split_by_prompt_hash(pairs, SAFETY_HELD_OUT)
    return train, held_out, report


def train_safety_scorer(
    pairs: Sequence[PreferencePair] | None = None, l2: float = 1e-3
) -> LinearTextScorer:
    """The project's safety reward: :func:`train_bradley_terry_scorer` on the replies of the
    training part of HH harmless-base (:func:`harmless_pairs`), or of the ``pairs`` given."""
    if pairs is None:
        pairs, _, _ = harmless_pairs()
    return train_bradley_terry_scorer([p.chosen for p in pairs], [p.rejected for p in pairs], l2=l2)


def pairwise_accuracy(scorer, pairs: Sequence[PreferencePair]) -> float:
    """Fraction of pairs whose chosen reply the scorer rates strictly higher than the rejected
    one."""
    chosen = scorer([p.chosen for p in pairs])
    rejected = scorer([p.rejected for p in pairs])
    return (chosen > rejected).double().mean().item()
