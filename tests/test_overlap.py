"""The SFT-overlap check (upo_ref.overlap) on a smoke run of the main job, and the unused pairs it
reads."""

import dataclasses
from collections import Counter

import pytest

from upo_ref.lm.experiment_data import _first, _first_and_rest, prepare_data
from upo_ref.lm.models import load_tokenizer
from upo_ref.lm.presets import get_preset, smoke
from upo_ref.lm.train import read_metrics
from upo_ref.overlap import GROUPS, format_overlap, main, overlap_check
from upo_ref.reproduce import main as reproduce_main

N_UNUSED = 48


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
    assert n == {
        "trained": cfg.data.n_train_pairs,
        "unused": N_UNUSED,
        "eval": cfg.data.n_eval_pairs,
    }
    assert [r.group for r in rows] == list(GROUPS) * len(models)
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
        and len(table) == 2 + len(models) + 2
    )


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
    with pytest.raises(ValueError, match="trains only the top of its model"):
        overlap_check(smoke(get_preset("smol-sft")), out)


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
