"""Offline auxiliary rewards (upo_ref.auxiliary.rewards): Flesch scores worked by hand, the syllable
rules, hashed features, and the safety scorer measured on held-out HH harmless-base pairs."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from strategies import F64_RTOL

from upo_ref.auxiliary.rewards import (
    SAFETY_FEATURE_DIM,
    SAFETY_HELD_OUT,
    TextStats,
    count_syllables,
    flesch_kincaid_grade,
    flesch_reading_ease,
    harmless_pairs,
    hashed_ngram_features,
    pairwise_accuracy,
    readability_rewards,
    text_stats,
    train_bradley_terry_scorer,
    train_safety_scorer,
)
from upo_ref.lm.data import PreferencePair
from upo_ref.lm.split import prompt_hash_fraction

# Dictionary syllable counts (Merriam-Webster) of words each rule of count_syllables decides.
SYLLABLES = {
    "the": 1,
    "a": 1,
    "cat": 1,
    "you": 1,
    "yes": 1,
    "strength": 1,
    "queue": 1,
    "don't": 1,  # vowel groups, y
    "cake": 1,
    "there": 1,
    "whole": 1,
    "are": 1,
    "eye": 1,
    "free": 1,  # silent final e; -ee
    "table": 2,
    "people": 2,
    "simple": 2,
    "little": 2,
    "apple": 2,
    "syllable": 3,  # consonant + le
    "walked": 1,
    "played": 1,
    "wanted": 2,
    "needed": 2,  # -ed
    "makes": 1,
    "times": 1,
    "boxes": 2,
    "places": 2,
    "judges": 2,
    "houses": 2,
    "wishes": 2,  # -es
    "play": 1,
    "they": 1,
    "player": 2,
    "beyond": 2,
    "happy": 2,  # y after a vowel is a consonant
    "readability": 5,
    "beautiful": 3,
    "readers": 2,
    "matters": 2,
    "ago": 2,
    "rhetoric": 3,
}


@pytest.mark.parametrize("word,n", sorted(SYLLABLES.items()))
def test_count_syllables_matches_the_dictionary(word, n):
    assert count_syllables(word) == n


def test_count_syllables_edge_cases():
    assert count_syllables("") == 0 and count_syllables("123") == 0
    assert count_syllables("THE") == 1  # case-insensitive
    assert (
        count_syllables("rhythm") == 1
    )  # no vowel letter in "thm": at least one syllable, a known miss


def test_flesch_worked_by_hand():
    # "The cat sat on the mat.": 1 sentence, 6 words, 6 syllables.
    s = "The cat sat on the mat."
    assert text_stats(s) == TextStats(1, 6, 6)
    assert flesch_reading_ease(s) == pytest.approx(206.835 - 1.015 * 6 - 84.6 * 1, rel=F64_RTOL)
    assert flesch_kincaid_grade(s) == pytest.approx(0.39 * 6 + 11.8 * 1 - 15.59, rel=F64_RTOL)
    # Readability(5) matters(2). Simple(2) words(1) help(1) readers(2).
    # 2 sentences, 6 words, 13 syllables.
    t = "Readability matters. Simple words help readers."
    assert text_stats(t) == TextStats(2, 6, 13)
    assert flesch_reading_ease(t) == pytest.approx(
        206.835 - 1.015 * 3 - 84.6 * 13 / 6, rel=F64_RTOL
    )
    assert flesch_kincaid_grade(t) == pytest.approx(0.39 * 3 + 11.8 * 13 / 6 - 15.59, rel=F64_RTOL)


@pytest.mark.parametrize(
    "text,sentences,words",
    [
        ("Hi! How are you? Fine.", 3, 5),
        ("no punctuation at all", 1, 4),
        ("Wait... what?!", 2, 2),
        ("...", 0, 0),
    ],
)
def test_sentence_and_word_counts(text, sentences, words):
    s = text_stats(text)
    assert (s.sentences, s.words) == (sentences, words)


def test_shorter_words_and_sentences_read_easier():
    hard = "Unquestionably, institutional considerations necessitate comprehensive evaluation."
    easy = "We need to look at it. Then we can act."
    assert flesch_reading_ease(easy) > flesch_reading_ease(hard)
    assert flesch_kincaid_grade(easy) < flesch_kincaid_grade(hard)


def test_readability_rewards():
    texts = ["The cat sat on the mat.", "", "?!"]
    r = readability_rewards(texts, scale=0.01, empty=-1.0, dtype=torch.float64)
    torch.testing.assert_close(
        r, torch.tensor([0.01 * flesch_reading_ease(texts[0]), -1.0, -1.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="no words"):
        flesch_reading_ease("   ")


# --- hashed features and the Bradley-Terry scorer -------------------------------------------------
def test_hashed_features_worked_case():
    # "a b a": unigrams a x2, b x1; bigrams "a b", "b a"; L2 norm sqrt(4 + 1 + 1 + 1).
    phi = hashed_ngram_features(["A b a", ""]).to_dense()
    expected = torch.zeros(2, SAFETY_FEATURE_DIM, dtype=torch.float64)
    for gram, count in (("a", 2.0), ("b", 1.0), ("a b", 1.0), ("b a", 1.0)):
        expected[0, zlib.crc32(gram.encode()) % SAFETY_FEATURE_DIM] += count / math.sqrt(7.0)
    assert torch.equal(phi, expected)  # the empty text is a zero row


def test_bradley_terry_scorer_learns_the_separating_words():
    chosen = [
        "i am glad to help kindly",
        "a kind and careful answer",
        "happy to help you kindly",
    ] * 3
    rejected = ["here is how to harm them", "harm and hurt them badly", "i will hurt you"] * 3
    scorer = train_bradley_terry_scorer(chosen, rejected, dim=256, l2=1e-4)
    pairs = [PreferencePair("", c, r) for c, r in zip(chosen, rejected, strict=True)]
    assert pairwise_accuracy(scorer, pairs) == 1.0
    s = scorer(["kindly help", "hurt and harm"])
    assert s[0] > 0 > s[1]


def test_harmless_pairs_come_from_the_pipelines_loader_and_prompt_hash_split():
    """The one HH loader: every row of the local harmless-base file is kept or dropped and listed,
    prompts end at the last assistant turn, and the split is the pipeline's (no prompt on both
    sides, the held-out side exactly the pairs whose prompt hash is below SAFETY_HELD_OUT)."""
    train, held, report = harmless_pairs()
    assert report.n_rows == 2312  # the official test split, shared/README.md
    assert len(train) + len(held) == report.n_pairs == 2312 - sum(map(len, report.dropped.values()))
    assert all(p.prompt.endswith("\n\nAssistant:") for p in train + held)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert all(prompt_hash_fraction(p.prompt) < SAFETY_HELD_OUT for p in held)
    assert all(prompt_hash_fraction(p.prompt) >= SAFETY_HELD_OUT for p in train)
    with pytest.raises(FileNotFoundError, match="harmless-base/test.jsonl.gz not found"):
        harmless_pairs("/no/such/folder")


def test_safety_scorer_ranks_held_out_harmless_pairs_above_chance():
    """Trained on 80 % of harmless-base prompts, it must rank the other 20 % better than a coin by
    three standard errors of a fair coin's accuracy, sqrt(0.25 / n)."""
    train, held, _ = harmless_pairs()
    scorer = train_safety_scorer(train)
    accuracy = pairwise_accuracy(scorer, held)
    assert accuracy > 0.5 + 3 * math.sqrt(0.25 / len(held))
