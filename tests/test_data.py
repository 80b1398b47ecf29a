"""Data: loaders, malformed rows, the prompt-hash split, truncation, tokenization, collation,
synthetic task."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from upo_ref.lm.config import HH_LOCAL_SUBSETS, ModelConfig
from upo_ref.lm.data import (
    ASSISTANT_TAG,
    IDENTICAL,
    MISMATCH,
    DataError,
    LoadReport,
    PreferencePair,
    download_hh,
    load_hh,
    load_hh_file,
    read_jsonl,
    split_prompt,
)
from upo_ref.lm.data_shp import load_shp, shp_files
from upo_ref.lm.data_trl import load_trl
from upo_ref.lm.logprobs import IGNORE_INDEX
from upo_ref.lm.models import load_tokenizer
from upo_ref.lm.split import sft_examples, split_by_prompt_hash
from upo_ref.lm.synthetic import SyntheticTask
from upo_ref.lm.tokenize import (
    IDENTICAL_AFTER_TRUNCATION,
    CompactVocab,
    TokenizedPair,
    collate_pairs,
    collate_sequences,
    fingerprint,
    tokenize_pairs,
    truncate,
)
from upo_ref.utils.paths import hh_dir


def write_jsonl(path, rows, gz=None):
    """Write rows (dicts, or raw strings written as-is) one per line; gzip if the name ends .gz."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz or path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def hh_row(prompt_turn: str, chosen: str, rejected: str) -> dict:
    prompt = f"\n\nHuman: {prompt_turn}{ASSISTANT_TAG}"
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return load_tokenizer(ModelConfig())


# ------------------------------------------------------------------------------------------------
# Malformed data: every error names the file and the line
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_malformed_json_line_names_file_and_line(tmp_path, suffix):
    path = write_jsonl(
        tmp_path / f"test{suffix}",
        [hh_row("a", " b", " c"), hh_row("d", " e", " f"), '{"chosen": "x"'],
    )
    with pytest.raises(DataError, match=rf"test{suffix.replace('.', '[.]')}:3: not valid JSON"):
        load_hh_file(path)


def test_non_object_and_blank_lines_are_errors(tmp_path):
    with pytest.raises(DataError, match=r":2: expected a JSON object, got list"):
        list(read_jsonl(write_jsonl(tmp_path / "a.jsonl", [{"x": 1}, "[1, 2]"])))
    with pytest.raises(DataError, match=r":2: not valid JSON"):
        list(read_jsonl(write_jsonl(tmp_path / "b.jsonl", [{"x": 1}, ""])))


def test_missing_field_and_wrong_type(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl", [hh_row("a", " b", " c"), {"chosen": "\n\nHuman: q\n\nAssistant: a"}]
    )
    with pytest.raises(DataError, match=r"t.jsonl:2: missing field\(s\) \['rejected'\]"):
        load_hh_file(path)
    path = write_jsonl(tmp_path / "u.jsonl", [{"chosen": 3, "rejected": "x"}])
    with pytest.raises(DataError, match=r"u.jsonl:1: field 'chosen' must be a string, got int"):
        load_hh_file(path)


def test_chosen_without_assistant_tag_is_an_error(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"chosen": "\n\nHuman: hello", "rejected": "\n\nHuman: hello"}]
    )
    with pytest.raises(DataError, match=r"t.jsonl:1: the text has no '\\n\\nAssistant:'"):
        load_hh_file(path)


def test_rejected_not_sharing_the_prompt_raises_or_is_dropped_and_reported(tmp_path):
    good = hh_row("q1", " yes", " no")
    bad = {
        "chosen": "\n\nHuman: q2\n\nAssistant: a",
        "rejected": "\n\nHuman: other\n\nAssistant: b",
    }
    path = write_jsonl(tmp_path / "t.jsonl", [good, bad, good])
    with pytest.raises(
        DataError, match=r"t.jsonl:2: rejected text does not start with the chosen text's prompt"
    ):
        load_hh_file(path)
    pairs, report = load_hh_file(path, drop_mismatched=True)
    assert [p.origin for p in pairs] == [f"{path}:1", f"{path}:3"]
    assert report.n_rows == 3 and report.n_pairs == 2
    assert report.dropped == {
        "rejected text does not start with the chosen text's prompt": [f"{path}:2"]
    }
    assert "dropped 1" in str(report) and f"{path}:2" in str(report)


def gzipped_rows(n: int) -> bytes:
    return gzip.compress(
        "".join(
            json.dumps(hh_row(f"q{i} " + "x" * 200, " a", " b")) + "\n" for i in range(n)
        ).encode()
    )


def test_truncated_and_corrupt_gzip_name_file_and_line(tmp_path):
    """A download cut short, or flipped bytes inside the stream, is a DataError naming the file and
    the line being read (not zlib's or EOF's bare error), and the fix."""
    data = gzipped_rows(200)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut[.]jsonl[.]gz:\d+: the gzip stream is truncated"):
        load_hh_file(cut)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(data[:40] + bytes(b ^ 0xFF for b in data[40:60]) + data[60:])
    with pytest.raises(DataError, match=r"corrupt[.]jsonl[.]gz:\d+: .*download or copy the file"):
        load_hh_file(corrupt)


def test_plain_file_named_gz_invalid_utf8_and_empty_file_are_errors(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl.gz", [hh_row("a", " b", " c")], gz=False)
    plain.write_text(json.dumps(hh_row("a", " b", " c")) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"plain[.]jsonl[.]gz: not a gzip file.*drop the [.]gz"):
        load_hh_file(plain)
    latin = tmp_path / "latin.jsonl"
    good = json.dumps(hh_row("a", " b", " c")).encode()
    latin.write_bytes(good + b"\n" + good.replace(b" b", b" caf\xe9") + b"\n")
    with pytest.raises(DataError, match=r"latin[.]jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_hh_file(latin)
    for name in ("empty.jsonl", "empty.jsonl.gz"):
        empty = write_jsonl(tmp_path / name, [])
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: the file is empty"):
            load_hh_file(empty)


def test_identical_responses_are_dropped_and_listed_or_kept_on_request(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl", [hh_row("q1", " yes", " no"), hh_row("q2", " same", " same")]
    )
    pairs, report = load_hh_file(path)
    assert [p.origin for p in pairs] == [f"{path}:1"]
    assert report.dropped == {IDENTICAL: [f"{path}:2"]} and report.n_rows == 2
    pairs, report = load_hh_file(path, keep_identical=True)
    assert len(pairs) == 2 and report.dropped == {}


def test_trl_format_rows_file_and_dataset(tmp_path):
    rows = [
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "extra": 1},
        {"prompt": "Q: sky?", "chosen": " blue", "rejected": " blue"},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    pairs, report = load_trl(path)
    assert pairs == [PreferencePair("Q: 2+2?", " 4", " 5", f"{path}:1")]
    assert report.dropped == {IDENTICAL: [f"{path}:2"]} and report.n_rows == 2
    from_rows, _ = load_trl(iter(rows), keep_identical=True)
    assert [(p.prompt, p.chosen, p.rejected, p.origin) for p in from_rows] == [
        ("Q: 2+2?", " 4", " 5", "row 0"),
        ("Q: sky?", " blue", " blue", "row 1"),
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": " a", "rejected": " b"}, r"missing field\(s\) \['prompt'\]"),
        ({"prompt": "x", "rejected": " b"}, r"missing field\(s\) \['chosen'\]"),
        ({"prompt": "x", "chosen": " a"}, r"missing field\(s\) \['rejected'\]"),
        (
            {"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"},
            r"field 'chosen' must be a string, got list; .*chat template",
        ),
    ],
)
def test_trl_format_malformed_rows_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "x", "chosen": " a", "rejected": " b"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, row])
    with pytest.raises(DataError, match=r"prefs[.]jsonl:2: " + message):
        load_trl(path)
    with pytest.raises(DataError, match=r"row 1: " + message):
        load_trl([good, row])
    with pytest.raises(DataError, match=r"prefs[.]jsonl:3: not valid JSON"):
        load_trl(write_jsonl(tmp_path / "prefs.jsonl", [good, good, '{"prompt": ']))
    with pytest.raises(DataError, match=r"TRL-format rows: no rows"):
        load_trl([])


def test_split_prompt_cuts_after_the_last_assistant_tag():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
    prompt, response = split_prompt(text)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert response == " like this"


def test_hh_pairs_are_prompt_plus_responses(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl.gz", [hh_row("q", " good answer", " bad answer")])
    (pair,), report = load_hh_file(path)
    assert pair == PreferencePair(
        "\n\nHuman: q\n\nAssistant:", " good answer", " bad answer", f"{path}:1"
    )
    assert report.dropped == {}


def test_load_hh_missing_file_and_empty_subsets(tmp_path):
    with pytest.raises(FileNotFoundError, match="helpful-base/train.jsonl.gz not found"):
        load_hh(tmp_path, "train", ["helpful-base"])
    with pytest.raises(ValueError, match="subsets is empty"):
        load_hh(tmp_path, "test", [])


def test_download_hh_fetches_missing_files_only(tmp_path):
    source = tmp_path / "mirror"
    for subset in ("helpful-base", "harmless-base"):
        write_jsonl(source / subset / "train.jsonl.gz", [hh_row(subset, " y", " n")])
    dest = tmp_path / "hh"
    download_hh(dest, "train", ["helpful-base", "harmless-base"], base_url=source.as_uri())
    pairs, _ = load_hh(dest, "train", ["helpful-base", "harmless-base"])
    assert [p.prompt for p in pairs] == [
        f"\n\nHuman: {s}{ASSISTANT_TAG}" for s in ("helpful-base", "harmless-base")
    ]
    # Files already there are not fetched again: with the mirror gone, a second call still succeeds.
    for f in source.rglob("*.gz"):
        f.unlink()
    download_hh(dest, "train", ["helpful-base", "harmless-base"], base_url=source.as_uri())
    assert not list(dest.rglob("*.part")) and len(list(dest.rglob("*.jsonl.gz"))) == 2


# ------------------------------------------------------------------------------------------------
# The local HH files and the prompt-hash split
# ------------------------------------------------------------------------------------------------

# Pinned: the 7 rows of the local files whose rejected text does not start with the chosen's prompt,
# and the sizes of the prompt-hash split at eval_fraction 0.1. A change to either changes the data.
LOCAL_MISMATCHED = [
    ("harmless-base", 1255),
    ("harmless-base", 1689),
    ("harmless-base", 1953),
    ("harmless-base", 2037),
    ("helpful-base", 568),
    ("helpful-base", 1167),
    ("helpful-rejection-sampled", 1598),
]
LOCAL_SPLIT_SIZES = (6656, 718)
LOCAL_IDENTICAL = 34  # rows whose chosen and rejected responses are the same text


@pytest.fixture(scope="module")
def local_hh():
    return load_hh(hh_dir(), "test", HH_LOCAL_SUBSETS, drop_mismatched=True)


def test_local_hh_counts_and_dropped_rows(local_hh):
    pairs, report = local_hh
    assert report.n_rows == 2312 + 2354 + 2749 == 7415
    assert report.n_pairs == len(pairs) == 7415 - 7 - LOCAL_IDENTICAL
    assert set(report.dropped) == {MISMATCH, IDENTICAL}
    assert report.dropped[MISMATCH] == [
        f"{hh_dir() / s / 'test.jsonl.gz'}:{line}" for s, line in LOCAL_MISMATCHED
    ]
    kept, kept_report = load_hh(
        hh_dir(), "test", HH_LOCAL_SUBSETS, drop_mismatched=True, keep_identical=True
    )
    assert set(kept_report.dropped) == {MISMATCH} and len(kept) == len(pairs) + LOCAL_IDENTICAL
    identical = {p.origin for p in kept if p.chosen == p.rejected}
    assert sorted(identical) == sorted(report.dropped[IDENTICAL])
    assert len(identical) == LOCAL_IDENTICAL


def test_prompt_hash_split_sizes_disjoint_prompts_and_order_independent(local_hh):
    pairs, _ = local_hh
    train, held_out = split_by_prompt_hash(pairs, 0.1)
    assert (len(train), len(held_out)) == LOCAL_SPLIT_SIZES
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    shuffled = list(pairs)
    random.Random(0).shuffle(shuffled)
    train2, held_out2 = split_by_prompt_hash(shuffled, 0.1)
    assert {p.origin for p in train2} == {p.origin for p in train}
    assert {p.origin for p in held_out2} == {p.origin for p in held_out}


def test_prompt_hash_split_keeps_shared_prompts_together_and_rejects_bad_fractions():
    pairs = [PreferencePair(f"p{i % 50}", "a", "b", str(i)) for i in range(500)]
    train, held_out = split_by_prompt_hash(pairs, 0.3)
    assert len(train) + len(held_out) == 500 and not {p.prompt for p in train} & {
        p.prompt for p in held_out
    }
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="eval_fraction must be in"):
            split_by_prompt_hash(pairs, bad)
    with pytest.raises(ValueError, match="both sides need at least one"):
        split_by_prompt_hash(pairs[:1], 0.5)


def test_sft_examples_one_per_prompt_first_chosen():
    pairs = [
        PreferencePair("x", "a1", "b1"),
        PreferencePair("y", "c", "d"),
        PreferencePair("x", "a2", "b2"),
    ]
    assert sft_examples(pairs) == [("x", "a1"), ("y", "c")]


# ------------------------------------------------------------------------------------------------
# SHP
# ------------------------------------------------------------------------------------------------


def shp_row(history, a, b, label, sa, sb):
    return {
        "history": history,
        "human_ref_A": a,
        "human_ref_B": b,
        "labels": label,
        "score_A": sa,
        "score_B": sb,
        "post_id": "x",
        "domain": "askscience_train",
    }


def test_shp_loader_recipe_and_counted_score_ratio_filter(tmp_path):
    rows = [
        shp_row(
            "Why is the sky blue?", "Rayleigh", "dunno", 1, 30, 10
        ),  # ratio 3, A preferred: kept
        shp_row(
            "Why is the sky blue?", "ok", "better", 0, 5, 10
        ),  # ratio exactly 2, B preferred: kept
        shp_row("Best pizza?", "NY", "Chicago", 1, 15, 10),  # ratio 1.5: filtered, counted
    ]
    path = write_jsonl(tmp_path / "askscience" / "train.json", rows)
    assert shp_files(tmp_path, "train") == [path]
    pairs, report = load_shp([path])
    prompt = "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert pairs == [
        PreferencePair(prompt, " Rayleigh", " dunno", f"{path}:1", (30.0, 10.0)),
        PreferencePair(prompt, " better", " ok", f"{path}:2", (10.0, 5.0)),
    ]
    assert (
        report.n_rows == 3
        and report.n_pairs == 2
        and report.dropped == {"score ratio < 2": [f"{path}:3"]}
    )
    # The SFT target of a prompt is its highest-scored response over all its pairs.
    assert sft_examples(pairs) == [(prompt, " Rayleigh")]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"history": "h", "human_ref_A": "a"}, r"missing field\(s\) \['human_ref_B', 'labels'"),
        (shp_row("h", "a", "b", 2, 3, 1), "labels must be 0 or 1"),
        (shp_row("h", "a", "b", 1, 0, 1), "score_A and score_B must be positive numbers"),
        (shp_row("h", None, "b", 1, 3, 1), "field 'human_ref_A' must be a string"),
    ],
)
def test_shp_malformed_rows(tmp_path, row, message):
    path = write_jsonl(tmp_path / "r" / "test.json", [shp_row("h", "a", "b", 1, 3, 1), row])
    with pytest.raises(DataError, match=rf"test.json:2: {message}"):
        load_shp([path])


def test_shp_files_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SHP files"):
        shp_files(tmp_path, "train")


# ------------------------------------------------------------------------------------------------
# Truncation (the reference code's tokenize_batch_element)
# ------------------------------------------------------------------------------------------------

P = tuple(range(100, 110))  # a prompt of 10 tokens


def test_truncation_nothing_to_do():
    assert truncate(
        P, [(1, 2), (3,)], max_length=12, max_prompt_length=4, truncation_mode="keep_end"
    ) == (P, [(1, 2), (3,)])


def test_truncation_prompt_keep_end_and_keep_start():
    # 10 + 3 > 12: the prompt is cut to 4 tokens; 4 + 3 fits, so the responses are untouched.
    assert truncate(P, [(1, 2, 3), (4,)], 12, 4, "keep_end") == (P[-4:], [(1, 2, 3), (4,)])
    assert truncate(P, [(1, 2, 3), (4,)], 12, 4, "keep_start") == (P[:4], [(1, 2, 3), (4,)])


def test_truncation_is_decided_by_the_longer_response():
    # The chosen alone would fit (10 + 2 <= 12), the rejected does not: both see the cut prompt.
    prompt, (chosen, rejected) = truncate(P, [(1, 2), (3, 4, 5)], 12, 6, "keep_end")
    assert prompt == P[-6:] and chosen == (1, 2) and rejected == (3, 4, 5)


def test_truncation_of_responses_when_the_cut_prompt_is_not_enough():
    long = tuple(range(20))
    prompt, (a, b) = truncate(P, [long, (7, 8)], 12, 4, "keep_end")
    assert prompt == P[-4:] and a == long[:8] and b == (7, 8)  # max_length - max_prompt_length = 8


def test_truncation_short_prompt_long_response():
    prompt, (a,) = truncate((1, 2), [tuple(range(30))], 12, 4, "keep_start")
    assert prompt == (1, 2) and a == tuple(range(8)) and len(prompt) + len(a) <= 12


def test_truncation_bad_arguments():
    with pytest.raises(ValueError, match="truncation_mode"):
        truncate(P, [(1,)], 12, 4, "keep_middle")
    for mpl, ml in ((0, 12), (12, 12), (13, 12)):
        with pytest.raises(ValueError, match="0 < max_prompt_length < max_length"):
            truncate(P, [(1,)], ml, mpl, "keep_end")


@given(
    prompt_len=st.integers(1, 40),
    response_lens=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    max_length=st.integers(2, 60),
    data=st.data(),
    mode=st.sampled_from(["keep_end", "keep_start"]),
)
def test_truncation_invariants(prompt_len, response_lens, max_length, data, mode):
    max_prompt_length = data.draw(st.integers(1, max_length - 1))
    prompt = tuple(range(1000, 1000 + prompt_len))
    responses = [tuple(range(r)) for r in response_lens]
    p, rs = truncate(prompt, responses, max_length, max_prompt_length, mode)
    assert all(len(p) + len(r) <= max_length for r in rs)
    assert p == (prompt[len(prompt) - len(p) :] if mode == "keep_end" else prompt[: len(p)])
    assert all(r == orig[: len(r)] and len(r) >= 1 for r, orig in zip(rs, responses, strict=True))
    if prompt_len + max(response_lens) <= max_length:
        assert (p, rs) == (prompt, responses)


# ------------------------------------------------------------------------------------------------
# Tokenization with the real GPT-2 tokenizer
# ------------------------------------------------------------------------------------------------


def test_tokenize_pairs_appends_eos_and_keeps_prompt_end(gpt2_tokenizer):
    tok = gpt2_tokenizer
    pair = PreferencePair(
        "\n\nHuman: Hello world, how are you today?\n\nAssistant:", " Fine, thanks.", " Go away."
    )
    (full,) = tokenize_pairs(
        [pair], tok, max_length=64, max_prompt_length=32, truncation_mode="keep_end"
    )
    eos = tok.eos_token_id
    assert eos == 50256
    assert full.prompt == tuple(tok(pair.prompt, add_special_tokens=False)["input_ids"])
    assert full.chosen == (*tok(" Fine, thanks.", add_special_tokens=False)["input_ids"], eos)
    assert full.rejected == (*tok(" Go away.", add_special_tokens=False)["input_ids"], eos)
    (cut,) = tokenize_pairs(
        [pair],
        tok,
        max_length=len(full.prompt) + 2,
        max_prompt_length=3,
        truncation_mode="keep_end",
    )
    assert cut.prompt == full.prompt[-3:]  # HH keeps the end: "...\n\nAssistant:"
    assert tok.decode(cut.prompt).endswith("Assistant:")


def test_tokenize_rejects_eos_inside_text_and_empty_prompt(gpt2_tokenizer):
    bad = PreferencePair("\n\nHuman: hi\n\nAssistant:", " a <|endoftext|> b", " c", "f.jsonl:7")
    with pytest.raises(DataError, match=r"f.jsonl:7: the chosen response contains the EOS token"):
        tokenize_pairs([bad], gpt2_tokenizer, 64, 32, "keep_end")
    with pytest.raises(DataError, match="the prompt is empty"):
        tokenize_pairs([PreferencePair("", " a", " b", "g:1")], gpt2_tokenizer, 64, 32, "keep_end")


def test_pairs_identical_after_truncation_are_dropped_and_listed_or_kept(gpt2_tokenizer):
    """Responses that differ only after the first max_length - max_prompt_length tokens become the
    same tokens: dropped and listed in the report; an error without one; kept on request."""
    prompt = "\n\nHuman: hi\n\nAssistant:"
    differ_late = PreferencePair(
        prompt, " one two three four five six", " one two three four X", "f:1"
    )
    differ_early = PreferencePair(prompt, " yes", " no", "f:2")
    report = LoadReport("t")
    kept = tokenize_pairs([differ_late, differ_early], gpt2_tokenizer, 12, 8, "keep_end", report)
    assert len(kept) == 1 and kept[0].chosen != kept[0].rejected
    assert report.dropped == {IDENTICAL_AFTER_TRUNCATION: ["f:1"]}
    assert (report.n_rows, report.n_pairs) == (2, 1)
    with pytest.raises(DataError, match=r"f:1: chosen and rejected responses identical after"):
        tokenize_pairs([differ_late], gpt2_tokenizer, 12, 8, "keep_end")
    (both,) = tokenize_pairs([differ_late], gpt2_tokenizer, 12, 8, "keep_end", keep_identical=True)
    assert both.chosen == both.rejected and len(both.chosen) == 12 - 8


def test_fingerprint_changes_with_any_token_and_with_order():
    a, b = TokenizedPair((1, 2), (3,), (4,)), TokenizedPair((1,), (2, 3), (4,))
    assert fingerprint([a, b]) == fingerprint([a, b])
    assert len({fingerprint([a, b]), fingerprint([b, a]), fingerprint([a]), fingerprint([])}) == 4
    assert fingerprint([a]) != fingerprint([TokenizedPair((1, 2), (3,), (5,))])


# ------------------------------------------------------------------------------------------------
# The compact vocabulary of a small model trained from scratch
# ------------------------------------------------------------------------------------------------


def test_compact_vocab_keeps_the_most_frequent_tokens_then_eos_then_unk():
    eos = 99
    # counts: 7 -> 3, 5 -> 2, 3 -> 2, 8 -> 1, eos -> 2 (kept whatever its count, so it does not
    # compete)
    vocab = CompactVocab.build([(7, 5, 7, eos), (3, 7, 5, 3, 8, eos)], size=5, eos_id=eos)
    assert (vocab.size, vocab.eos_id, vocab.unk_id) == (5, 3, 4)
    assert vocab.ids == {
        7: 0,
        3: 1,
        5: 2,
        eos: 3,
    }  # 3 and 5 tie at 2: the lower original id first; 8 is cut
    assert vocab.encode((8, 7, 1234, eos, 5)) == (4, 0, 4, 3, 2)
    pairs = [TokenizedPair((7, 8), (3, 42, eos), (5,))]
    assert vocab.remap(pairs) == [TokenizedPair((0, 4), (1, 4, 3), (2,))]  # lengths unchanged
    assert (
        CompactVocab.coverage(vocab.remap(pairs), vocab.unk_id) == 3 / 4
    )  # 42 is the one UNK response token
    assert CompactVocab.build([(1, 2)], size=10, eos_id=eos).ids == {
        1: 0,
        2: 1,
        eos: 8,
    }  # room to spare
    with pytest.raises(ValueError, match="size >= 3"):
        CompactVocab.build([(1,)], size=2, eos_id=eos)


# ------------------------------------------------------------------------------------------------
# Collation
# ------------------------------------------------------------------------------------------------


def test_collate_sequences_pads_right_and_masks_prompt():
    batch = collate_sequences([((1, 2), (3, 4, 5)), ((6,), (7,))], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    I = IGNORE_INDEX  # noqa: E741 (reads like the mask it is)
    assert batch["labels"].tolist() == [[I, I, 3, 4, 5], [I, 7, I, I, I]]
    with pytest.raises(ValueError, match="empty batch"):
        collate_sequences([], 0)


def test_collate_pairs_chosen_rows_first_then_rejected():
    pairs = [TokenizedPair((1,), (2, 3), (4,)), TokenizedPair((5, 6), (7,), (8, 9, 10))]
    batch = collate_pairs(pairs, [11, 3], pad_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 0, 0],
        [5, 6, 7, 0, 0],
        [1, 4, 0, 0, 0],
        [5, 6, 8, 9, 10],
    ]
    assert batch["index"].tolist() == [11, 3]
    assert (batch["labels"] != IGNORE_INDEX).sum(-1).tolist() == [2, 1, 1, 3]


# ------------------------------------------------------------------------------------------------
# The synthetic task
# ------------------------------------------------------------------------------------------------


def test_synthetic_pairs_are_ranked_by_the_ground_truth_reward():
    task = SyntheticTask(seed=3)
    pairs = task.pairs(300, stream=0)
    assert len(pairs) == 300
    assert all(task.reward(p.prompt, p.chosen) > task.reward(p.prompt, p.rejected) for p in pairs)
    assert all(p.chosen[-1] == p.rejected[-1] == task.eos_id for p in pairs)
    assert pairs == task.pairs(300, stream=0) and pairs != task.pairs(300, stream=1)
    w = task.weights
    assert torch.equal(w[1], -w[0]) and w.sum(-1).tolist() == [0.0, 0.0]  # complementary halves


def test_synthetic_reward_ignoring_the_prompt_is_at_chance():
    """The best prompt-blind ranking (score = sum of per-token weights averaged over topics) is 0
    for every response, so the task cannot be solved without reading the prompt."""
    task = SyntheticTask(seed=0)
    w = task.weights
    assert torch.equal(w.mean(0), torch.zeros(task.n_content))


def test_synthetic_bad_sizes():
    with pytest.raises(ValueError, match="n_content must be an even number"):
        SyntheticTask(n_content=7)
