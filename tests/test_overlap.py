"""The SFT-overlap check (upo_ref.overlap) on a smoke run of the main job, and the unused pairs it
reads."""

import dataclasses
from collections import Counter

import pytest

from upo_ref.lm.experiment_data import _first, _first_and_rest, prepare_data
from upo_ref.lm.models import load_tokenizer
from upo_ref.lm.presets import get_preset, smoke
from upo_ref.lm.train import read_metrics
from upo_ref.overlap import (
    GROUPS,
    _groups,
    format_overlap,
    main,
    overlap_check,
    sft_target_flags,
    unused_against_eval,
)
from upo_ref.reproduce import main as reproduce_main

N_UNUSED = 48
TOL = 1e-12  # float64 sums of a few dozen proportions


def _all_training_pairs(cfg):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train_pairs=None))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap") / "run"
    reproduce_main(["--smoke", "--out", str(out), "--no-progress", "--device", "cpu"])
    return smoke(get_preset("quick")), out


def test_first_and_rest_partition_the_shuffled_items():
    items = [i % 37 for i in range(200)]  # with repeats
    for n in (0, 1, 64, 200):
        first, rest = _first_and_rest(items, n, seed=3, what="items")
        assert first == _first(items, n, 3, "items") and len(first) == n
        assert Counter(first + rest) == Counter(items)
    assert _first_and_rest(items, None, 3, "items") == (_first(items, None, 3, "items"), [])


def test_unused_pairs_are_training_pairs_preference_training_did_not_draw():
    cfg = smoke(get_preset("quick"))
    tok = load_tokenizer(cfg.model)
    plain, kept = prepare_data(cfg, tok), prepare_data(cfg, tok, keep_unused=5)
    assert (
        plain.pref_unused == [] and len(kept.pref_unused) == 5
    )  # the main job does not tokenize them
    assert not set(kept.pref_unused) & set(kept.pref_train)
    # Keeping them changes nothing else, the compact vocabulary included.
    for split in ("sft_train", "sft_eval", "pref_train", "pref_eval"):
        assert getattr(kept, split) == getattr(plain, split)
    assert (kept.vocab_size, kept.pad_id) == (plain.vocab_size, plain.pad_id)


def test_overlap_check_agrees_with_what_the_trainer_logged(smoke_run):
    cfg, out = smoke_run
    rows = overlap_check(cfg, out, n_unused=N_UNUSED)
    models = list(dict.fromkeys(r.model for r in rows))
    assert models[0] == "pi_ref" and len(models) == 1 + len(cfg.losses) * len(cfg.betas)
    n = {r.group: r.n for r in rows}
    # Smoke SFTs 16 of the training prompts (n_sft_examples), so the unused pairs are split into
    # those whose chosen response was an SFT target (none or few of 48) and the others; an empty
    # group is left out.
    assert cfg.data.n_sft_examples == 16
    four = ["trained", "unused-sft", "unused-other", "eval"]
    assert list(n) == [g for g in four if g in n] and {"trained", "unused-other", "eval"} <= set(n)
    assert (n["trained"], n.get("unused-sft", 0) + n["unused-other"], n["eval"]) == (
        cfg.data.n_train_pairs,
        N_UNUSED,
        cfg.data.n_eval_pairs,
    )
    assert [r.group for r in rows] == list(n) * len(models)
    # On the eval group a run's row is the trainer's last eval record: same batches, same log-probs.
    for r in rows:
        if r.model == "pi_ref" or r.group != "eval":
            continue
        label, beta = r.model.split(" beta=")
        final = [
            m
            for m in read_metrics(out / f"{label.lower()}_beta{beta}" / "metrics.jsonl")
            if m["split"] == "eval"
        ][-1]
        assert r.accuracy == final["rewards/accuracies"]
        assert r.margin == pytest.approx(final["rewards/margins"], rel=1e-6, abs=1e-9)
    table = format_overlap(rows).splitlines()
    assert (
        table[0].startswith("| model | trained acc. (16 pairs)")
        and f"unused-other acc. ({n['unused-other']} pairs)" in table[0]
        and len(table) == (2 + len(models) + 2) + (3 + len(models)) + 2
    )


def test_overlap_counts_the_pairs_with_a_trained_prompt_and_pools_the_unused_ones(smoke_run):
    cfg, out = smoke_run
    rows = overlap_check(cfg, out, n_unused=N_UNUSED)
    tok = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tok, keep_unused=N_UNUSED)
    groups = _groups(cfg, data, sft_target_flags(cfg, tok, N_UNUSED))
    for r in rows:  # one pair at a time against every trained pair
        hits = [any(p.prompt == t.prompt for t in data.pref_train) for p in groups[r.group]]
        assert r.shares_prompt == sum(hits)
    assert {r.shares_prompt for r in rows if r.group == "eval"} == {0}  # the split is by prompt
    pooled = unused_against_eval(rows)
    assert [m for m, *_ in pooled] == list(dict.fromkeys(r.model for r in rows))
    for model, n, acc, diff, se in pooled:
        by = {r.group: r for r in rows if r.model == model}
        unused = [by[g] for g in ("unused", "unused-sft", "unused-other") if g in by]
        right = sum(r.accuracy * r.n for r in unused)  # pairs ranked right, a tie counting half
        assert n == N_UNUSED and acc == pytest.approx(right / N_UNUSED, abs=TOL)
        assert diff == pytest.approx(acc - by["eval"].accuracy, abs=TOL)
        e = by["eval"]
        var = acc * (1 - acc) / n + e.accuracy * (1 - e.accuracy) / e.n
        assert se == pytest.approx(var**0.5, abs=TOL)
    table = format_overlap(rows)
    first = {r.group: r for r in rows if r.model == "pi_ref"}
    assert f"eval 0 of {first['eval'].n}." in table
    assert f"| pi_ref | {pooled[0][2]:.4f} ({N_UNUSED} pairs) | {pooled[0][3]:+.4f} |" in table


def test_overlap_command_writes_its_table_and_refuses_what_it_cannot_check(smoke_run, tmp_path):
    cfg, out = smoke_run
    rows = main(["--smoke", "--out", str(out), "--n-unused", "8", "--results", str(tmp_path)])
    text = (tmp_path / "overlap.md").read_text()
    assert "python -m upo_ref.overlap --smoke" in text and format_overlap(rows) in text
    with pytest.raises(ValueError, match="n_unused must be a positive number"):
        overlap_check(cfg, out, n_unused=0)
    other = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, shuffle_seed=1)
    )  # not what wrote `out`
    with pytest.raises(ValueError, match="made with another model or data config"):
        overlap_check(other, out, n_unused=8)
    with pytest.raises(FileNotFoundError, match="python -m upo_ref.reproduce"):
        overlap_check(cfg, tmp_path / "nothing here", n_unused=8)
    with pytest.raises(ValueError, match="uses every training pair"):
        overlap_check(_all_training_pairs(cfg), out)


def test_sft_disjoint_keeps_the_preference_training_prompts_out_of_sft():
    r = dataclasses.replace
    base = smoke(get_preset("quick"))
    # Every SFT prompt, GPT-2's ids, and prompts long enough that truncation does not make two
    # different prompts the same tokens (at 16 prompt tokens, two HH prompts can end alike).
    data = r(base.data, n_sft_examples=None, compact_vocab=None, max_length=512)
    base = r(base, data=r(data, max_prompt_length=256))
    tok = load_tokenizer(base.model)
    paper_recipe = prepare_data(base, tok)
    control = prepare_data(r(base, data=r(base.data, sft_disjoint=True)), tok)
    pref_prompts = {p.prompt for p in paper_recipe.pref_train}
    assert len(pref_prompts) == base.data.n_train_pairs
    assert pref_prompts <= {
        p.prompt for p in paper_recipe.sft_train
    }  # the paper's recipe: all are SFT prompts
    assert not pref_prompts & {p.prompt for p in control.sft_train}  # the control: none is
    assert len(control.sft_train) == len(paper_recipe.sft_train) - len(pref_prompts)
    assert (control.pref_train, control.pref_eval) == (
        paper_recipe.pref_train,
        paper_recipe.pref_eval,
    )
    quick = get_preset("quick")
    assert get_preset("quick-sft-disjoint") == r(
        quick, name="quick-sft-disjoint", data=r(quick.data, sft_disjoint=True)
    )


def test_unused_pairs_are_split_by_sft_target_when_sft_draws_a_sample():
    r = dataclasses.replace
    base = smoke(get_preset("quick"))
    # GPT-2's ids and no truncation, so that a pair's (prompt, chosen) tokens are an SFT example's
    # exactly when its texts are; 64 SFT examples of the training split's prompts.
    data = r(base.data, n_sft_examples=64, compact_vocab=None, max_length=1 << 16)
    cfg = r(base, data=r(data, max_prompt_length=1 << 15))
    tok = load_tokenizer(cfg.model)
    d = prepare_data(cfg, tok, keep_unused=None)
    targets = {(e.prompt, e.chosen) for e in d.sft_train}
    flags = sft_target_flags(cfg, tok, None)
    assert flags == [(p.prompt, p.chosen) in targets for p in d.pref_unused]
    assert sft_target_flags(cfg, tok, 100) == flags[:100]
    groups = _groups(cfg, d, flags)
    assert list(groups) == ["trained", "unused-sft", "unused-other", "eval"]
    assert len(groups["unused-sft"]) >= 16 and len(groups["unused-other"]) >= 16  # both there
    assert sorted(map(id, groups["unused-sft"] + groups["unused-other"])) == sorted(
        map(id, d.pref_unused)
    )
    # SFT on every training prompt (n_sft_examples None): the three groups of the paper's recipe.
    every = r(cfg, data=r(cfg.data, n_sft_examples=None))
    assert list(_groups(every, prepare_data(every, tok, keep_unused=8), None)) == list(GROUPS)
    with pytest.raises(RuntimeError, match="3 SFT-target flags for"):
        _groups(cfg, d, flags[:3])


def test_overlap_check_scores_a_partially_fine_tuned_preset_on_its_trunk_cache(tmp_path):
    """smol-sft's path on a tiny random Llama: the top layer on the cached trunk states, SFT on a
    sample of the training prompts, so four groups; its eval rows are what the trainer logged."""
    out = tmp_path / "run"
    reproduce_main(["--preset", "smol-sft", "--smoke", "--out", str(out), "--no-progress"])
    cfg = smoke(get_preset("smol-sft"))
    before = sorted(p.name for p in (out / "trunk_cache").iterdir())
    rows = overlap_check(cfg, out, n_unused=N_UNUSED)
    after = sorted(p.name for p in (out / "trunk_cache").iterdir())
    # The run's entries (its trained and eval pairs, its SFT sets) are read, not computed again;
    # the unused pairs add theirs.
    assert set(before) < set(after) and len(after) == len(before) + 2
    n = {r.group: r.n for r in rows}
    assert list(n) == ["trained", "unused-sft", "unused-other", "eval"]
    models = list(dict.fromkeys(r.model for r in rows))
    assert models == ["pi_ref"] + [f"{f.label} beta={b:g}" for f, b in cfg.runs()]
    for r in rows:
        if r.model == "pi_ref" or r.group != "eval":
            continue
        label, beta = r.model.split(" beta=")
        final = [
            m
            for m in read_metrics(out / f"{label.lower()}_beta{beta}" / "metrics.jsonl")
            if m["split"] == "eval"
        ][-1]
        assert r.accuracy == final["rewards/accuracies"]
        assert r.margin == pytest.approx(final["rewards/margins"], rel=1e-6, abs=1e-9)


def test_overlap_reads_a_run_of_another_data_seed_given_that_seed_and_refuses_it_before_data(
    tmp_path, monkeypatch
):
    out = tmp_path / "run"
    reproduce_main(
        ["--smoke", "--data-seed", "1", "--out", str(out), "--no-progress", "--device", "cpu"]
    )
    args = ["--smoke", "--out", str(out), "--n-unused", "8", "--results", str(tmp_path)]
    rows = main(args + ["--data-seed", "1"])
    text = (tmp_path / "overlap.md").read_text()
    assert "preset `quick-seed1-smoke`" in text and "--data-seed 1" in text
    assert format_overlap(rows) in text

    # Without the seed (or with the preset's own, 0) the data is another draw: refused from the
    # checkpoints' identity, before any data is loaded or any model run.
    def no_data(*a, **k):
        raise AssertionError("data loaded before the checkpoints were checked")

    monkeypatch.setattr("upo_ref.overlap.load_experiment_data", no_data)
    for seed in ([], ["--data-seed", "0"]):
        with pytest.raises(ValueError, match="and its --data-seed"):
            main(args + seed)
