"""The main job end to end in smoke mode (quick and paper presets), its outputs, model loading."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from upo_ref.experiments.figure1 import trailing_mean
from upo_ref.experiments.grid_report import time_split
from upo_ref.lm.config import HH_SUBSETS, TINY_GPT2, ModelConfig
from upo_ref.lm.data import ASSISTANT_TAG, DataError
from upo_ref.lm.experiment import RunResult, prepare_data
from upo_ref.lm.models import build_model, load_tokenizer
from upo_ref.lm.presets import get_preset, smoke
from upo_ref.lm.runfiles import METRICS, RunLockedError, run_lock
from upo_ref.lm.train import read_metrics
from upo_ref.reproduce import _parser, _with_train_pairs, config_from_args, format_table, main
from upo_ref.utils.paths import REPO_ROOT, gpt2_tokenizer_dir

GRID = [
    ("IPO", 0.1),
    ("IPO", 0.2),
    ("IPO", 0.5),
    ("JS-IUPO", 0.1),
    ("JS-IUPO", 0.2),
    ("JS-IUPO", 0.5),
]


def check_outputs(out, name: str, eval_points: list[int]):
    """What every run of the main job must leave behind, with numbers that agree with each other."""
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert [(r["label"], r["beta"]) for r in summary["runs"]] == GRID
    table = (out / "results" / "summary.md").read_text()
    for r in summary["runs"]:
        f = r["final"]
        acc, n = f["rewards/accuracies"], r["n_eval_pairs"]
        data = summary["config"]["data"]
        assert n == data["n_eval_pairs"] * len(
            data["datasets"]
        )  # every eval pair of the (smoke) config
        se = (acc * (1 - acc) / n) ** 0.5
        assert (
            f"| {r['label']} | {r['beta']:g} | {acc:.4f} +- {se:.4f} | {f['rewards/margins']:.4f} |"
            in table
        )
    figure = out / f"figure1_{name}.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label, beta in GRID:
        records = read_metrics(out / "results" / "metrics" / f"{label.lower()}_beta{beta:g}.jsonl")
        evals = [r for r in records if r["split"] == "eval"]
        assert [r["examples_seen"] for r in evals] == eval_points
        # Step 0: pi = pi_ref exactly, so h = Uh = 0 and both losses equal (0 - 1/(2 beta))^2,
        # i.e. 1/(4 beta^2).
        assert evals[0]["rewards/margins"] == 0.0
        assert evals[0]["loss"] == pytest.approx(1 / (4 * beta**2), rel=1e-12)
        assert (
            evals[-1]["rewards/accuracies"]
            == next(r for r in summary["runs"] if (r["label"], r["beta"]) == (label, beta))[
                "final"
            ]["rewards/accuracies"]
        )
    sft = read_metrics(out / "results" / "metrics" / "sft.jsonl")
    assert [r["examples_seen"] for r in sft if r["split"] == "eval"] == [0, 8]
    return summary


def without_time(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_quick_preset_smoke_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    results = main(["--smoke", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert [(r.label, r.beta) for r in results] == GRID
    summary = check_outputs(out, "quick-smoke", [0, 8, 16])
    assert (
        summary["config"]["data"]["hh_split"] == "hash"
        and summary["config"]["model"]["n_layer"] == 2
    )
    # Running the same command again resumes from the finished checkpoints: nothing is retrained.
    before = {p.name: p.read_text() for p in (out / "results" / "metrics").iterdir()}
    again = main(["--smoke", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert [r.final for r in again] == [r.final for r in results]
    assert {p.name: p.read_text() for p in (out / "results" / "metrics").iterdir()} == before
    # The time split says whose time it is: the runs' training and evaluation come from their
    # metrics (the first command's, unchanged), the SFT (resumed) and the reference from this
    # command. (The summary rounds to 0.1 s, which a smoke grid's evaluations can fall under.)
    resumed = json.loads((out / "results" / "summary.json").read_text())
    logged = time_split(results, {})
    for k in ("training_s", "evaluation_s"):
        assert logged[k] > 0
        assert resumed["seconds"][k] == summary["seconds"][k] == round(logged[k], 1)
    own = resumed["seconds"]
    assert (
        f"(in this command: sft {own['sft_s'] / 60:.1f} min, reference "
        f"{own['reference_s'] / 60:.1f} min); the runs' own training "
        f"{own['training_s'] / 60:.1f} min, evaluation {own['evaluation_s'] / 60:.1f} min, from "
        "their metrics" in (out / "results" / "summary.md").read_text()
    )
    # --fresh-run NAME retrains that run only, to the same numbers (the CPU is deterministic).
    written = {d.name: (d / "metrics.jsonl").stat().st_mtime_ns for d in out.glob("*_beta*")}
    main(["--smoke", "--out", str(out), "--no-progress", "--fresh-run", "ipo_beta0.2"])
    assert "starting over: ipo_beta0.2\n" in capsys.readouterr().out
    rewritten = {
        d: t for d, t in written.items() if (out / d / "metrics.jsonl").stat().st_mtime_ns != t
    }
    assert list(rewritten) == ["ipo_beta0.2"]
    strip = lambda name: without_time(read_metrics(out / "results" / "metrics" / name))  # noqa: E731
    assert strip("ipo_beta0.2.jsonl") == without_time(
        [json.loads(line) for line in before["ipo_beta0.2.jsonl"].splitlines()]
    )
    with pytest.raises(SystemExit):
        main(["--smoke", "--out", str(out), "--no-progress", "--fresh-run", "dpo_beta9"])
    assert (
        "--fresh-run dpo_beta9: no such run; the runs are sft, ipo_beta0.1"
        in capsys.readouterr().err
    )
    with run_lock(out):  # another command holds the folder
        with pytest.raises(RunLockedError, match=rf"{out} is in use by another run"):
            main(["--smoke", "--out", str(out), "--no-progress"])


def write_official_hh(root, n_train: int, n_test: int):
    """Tiny files in the official layout: <subset>/{train,test}.jsonl.gz for the four subsets."""
    import gzip

    for subset in HH_SUBSETS:
        for split, n in (("train", n_train), ("test", n_test)):
            rows = []
            for i in range(n):
                prompt = f"\n\nHuman: {subset} {split} question {i}?{ASSISTANT_TAG}"
                rows.append(
                    {
                        "chosen": prompt + f" A helpful answer number {i}.",
                        "rejected": prompt + " No.",
                    }
                )
            path = root / subset / f"{split}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)


def write_shp(root, split: str, n: int):
    """n kept pairs (score ratio 3) and one filtered pair (ratio 1.5) in
    <root>/askscience/<split>.json."""
    rows = [
        {
            "history": f"{split} question {i}?",
            "human_ref_A": f"Answer {i} in detail.",
            "human_ref_B": "No idea.",
            "labels": 1,
            "score_A": 30,
            "score_B": 10,
        }
        for i in range(n)
    ]
    rows.append(
        {
            "history": "tie?",
            "human_ref_A": "a",
            "human_ref_B": "b",
            "labels": 0,
            "score_A": 2,
            "score_B": 3,
        }
    )
    path = root / "askscience" / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_paper_preset_smoke_on_official_files_plus_shp(tmp_path, capsys):
    """The paper preset's code path (official HH train/test files plus SHP, RMSprop, microbatches)
    on a tiny model."""
    hh, shp = tmp_path / "hh", tmp_path / "shp"
    write_official_hh(hh, n_train=5, n_test=3)
    write_shp(shp, "train", 16)
    write_shp(shp, "test", 8)
    out = tmp_path / "run"
    main(
        [
            "--preset",
            "paper",
            "--smoke",
            "--hh-dir",
            str(hh),
            "--shp-dir",
            str(shp),
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert "SHP: 17 rows read, 16 pairs kept\n  dropped 1 (score ratio < 2)" in printed
    assert (
        "preference: 32 train / 16 eval pairs" in printed
    )  # 16 + 16 train, 8 + 8 eval (the smoke sizes, per dataset)
    summary = check_outputs(out, "paper-smoke", [0, 8, 16])
    cfg = summary["config"]
    assert cfg["data"]["datasets"] == ["hh", "shp"]
    assert cfg["data"]["hh_split"] == "official" and cfg["data"]["hh_subsets"] == list(HH_SUBSETS)
    assert cfg["pref"]["optimizer"] == "rmsprop" and cfg["pref"]["microbatch_size"] == 2
    assert cfg["model"]["name_or_path"] == TINY_GPT2  # smoke replaces GPT-2 124M


def test_paper_preset_is_the_papers_experiment():
    cfg = get_preset("paper")
    assert cfg.model.name_or_path == "gpt2"
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 256)
    assert cfg.betas == (0.1, 0.2, 0.5)
    assert [(n, d) for n, d in cfg.losses] == [("ipo", None), ("iupo", "jensen_shannon")]
    for phase in (cfg.sft, cfg.pref):  # the DPO reference code's optimiser
        assert (
            phase.optimizer,
            phase.lr,
            phase.warmup_steps,
            phase.max_grad_norm,
            phase.batch_size,
        ) == ("rmsprop", 5e-7, 150, 10.0, 64)
    assert cfg.data.hh_split == "official" and cfg.data.hh_subsets == HH_SUBSETS


def test_quick_preset_is_the_figure_1_grid():
    cfg = get_preset("quick")
    assert cfg.betas == (0.1, 0.2, 0.5) and cfg.model.name_or_path == TINY_GPT2
    assert [(n, d) for n, d in cfg.losses] == [("ipo", None), ("iupo", "jensen_shannon")]
    assert cfg.data.hh_split == "hash" and cfg.sft.n_examples > 0


def test_command_line_overrides():
    parse = _parser().parse_args
    cfg = config_from_args(
        parse(
            [
                "--preset",
                "paper",
                "--model",
                "/m/SmolLM2.gguf",
                "--hh-split",
                "hash",
                "--shp-dir",
                "/shp",
                "--threads",
                "3",
            ]
        )
    )
    assert cfg.model.name_or_path == "/m/SmolLM2.gguf"
    assert (
        cfg.data.hh_split == "hash"
        and cfg.data.datasets == ("hh", "shp")
        and cfg.data.shp_dir == "/shp"
    )
    assert cfg.threads == 3 and cfg.name == "paper"
    assert config_from_args(parse(["--smoke"])) == smoke(get_preset("quick"))
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_args(parse(["--preset", "huge"]))


def test_command_line_edges_are_clear_errors(monkeypatch, capsys):
    parse = _parser().parse_args
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            parse(["--threads", bad])
        assert f"--threads: must be a whole number >= 1, got '{bad}'" in capsys.readouterr().err
    assert config_from_args(parse(["--smoke", "--threads", "3"])).threads == 3
    assert config_from_args(parse(["--smoke"])).threads is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--smoke", "--device", "cuda"])
    assert "device 'cuda': CUDA is not available to this torch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--smoke", "--device", "tpu"])
    assert "device 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--smoke", "--eval-data", "e.jsonl"])
    assert "--eval-data is the eval set of --data" in capsys.readouterr().err


def test_data_seed_draws_another_training_sample_of_the_same_split(capsys):
    parse = _parser().parse_args
    base = config_from_args(parse(["--smoke"]))
    assert config_from_args(parse(["--smoke", "--data-seed", "0"])) == base  # the presets' seed
    cfg = config_from_args(parse(["--smoke", "--data-seed", "3"]))
    assert cfg.data.shuffle_seed == 3 and cfg.name == "quick-seed3-smoke"
    assert dataclasses.replace(cfg, name=base.name, data=base.data) == base  # nothing else moves
    # With every eval pair kept (n_eval_pairs None, as in smol) and the tokenizer's own ids (not a
    # compact vocabulary built from the training sample), the eval set is the same set of pairs in
    # another order, and the training sample another draw from the same training split.
    tokenizer = load_tokenizer(cfg.model)
    a, b = (
        prepare_data(
            dataclasses.replace(
                c, data=dataclasses.replace(c.data, n_eval_pairs=None, compact_vocab=None)
            ),
            tokenizer,
        )
        for c in (base, cfg)
    )
    key = lambda p: (tuple(p.prompt), tuple(p.chosen), tuple(p.rejected))  # noqa: E731
    assert sorted(map(key, a.pref_eval)) == sorted(map(key, b.pref_eval))
    assert [key(p) for p in a.pref_eval] != [key(p) for p in b.pref_eval]
    assert {key(p) for p in a.pref_train} != {key(p) for p in b.pref_train}
    assert len(a.pref_train) == len(b.pref_train) == base.data.n_train_pairs
    for bad in ("-1", "one"):
        with pytest.raises(SystemExit):
            parse(["--data-seed", bad])
        assert f"--data-seed: must be a whole number >= 0, got '{bad}'" in capsys.readouterr().err


def test_lr_trains_at_another_learning_rate_in_a_folder_of_its_own(tmp_path, capsys):
    parse = _parser().parse_args
    base = config_from_args(parse(["--smoke"]))
    own = str(base.pref.lr)
    assert config_from_args(parse(["--smoke", "--lr", own])) == base  # the preset's own rate
    cfg = config_from_args(parse(["--smoke", "--lr", "3e-4"]))
    assert (cfg.name, cfg.pref.lr) == ("quick-lr0.0003-smoke", 3e-4)
    assert cfg.sft == base.sft  # SFT keeps the preset's rate
    assert dataclasses.replace(cfg, name=base.name, pref=base.pref) == base  # nothing else moves
    seeded = config_from_args(parse(["--preset", "smol", "--data-seed", "2", "--lr", "0.001"]))
    assert seeded.name == "smol-seed2-lr0.001"
    for bad in ("0", "-1e-4", "nan", "inf", "fast"):
        with pytest.raises(SystemExit):
            parse([f"--lr={bad}"])  # = : a leading minus is not taken for an option
        assert f"--lr: must be a finite number > 0, got '{bad}'" in capsys.readouterr().err
    # The rate reaches the optimiser: after warmup every step of every run trains at it.
    args = ["--smoke", "--betas", "0.1", "--no-progress", "--lr", "3e-4"]
    main(args + ["--out", str(tmp_path)])
    warmup = cfg.pref.warmup_steps
    for run in ("ipo_beta0.1", "js-iupo_beta0.1"):
        records = read_metrics(tmp_path / run / METRICS)
        lrs = [r["lr"] for r in records if r["split"] == "train"]
        assert lrs and lrs[warmup:] == [3e-4] * (len(lrs) - warmup)


def test_train_pairs_trains_on_another_number_of_pairs_in_a_folder_of_its_own(tmp_path):
    parse = _parser().parse_args
    base = config_from_args(parse(["--preset", "smol"]))
    assert config_from_args(parse(["--preset", "smol", "--train-pairs", "2048"])) == base
    cfg = config_from_args(parse(["--preset", "smol", "--train-pairs", "5168"]))
    assert (cfg.name, cfg.data.n_train_pairs, cfg.pref.n_examples) == ("smol-pairs5168", 5168, 5168)
    moved = dict(name=base.name, data=base.data, pref=base.pref)
    assert dataclasses.replace(cfg, **moved) == base  # nothing else moves
    assert dataclasses.replace(cfg.data, n_train_pairs=2048) == base.data
    assert dataclasses.replace(cfg.pref, n_examples=2048) == base.pref
    seeded = config_from_args(
        parse(["--preset", "smol", "--data-seed", "1", "--train-pairs", "32"])
    )
    assert seeded.name == "smol-seed1-pairs32"
    # A preset with two passes over its pairs keeps two passes over the new number.
    two = dataclasses.replace(base, pref=dataclasses.replace(base.pref, n_examples=4096))
    assert _with_train_pairs(two, 1032).pref.n_examples == 2064
    with pytest.raises(ValueError, match=r"2 pass\(es\).*2058 examples.*e\.g\. 1024 or 1032"):
        _with_train_pairs(two, 1029)
    with pytest.raises(
        ValueError,
        match=r"5177 examples, not a whole number of batches of 16.*"
        r"e\.g\. 5168 or 5184",
    ):
        config_from_args(parse(["--preset", "smol", "--train-pairs", "5177"]))
    with pytest.raises(ValueError, match="preset paper already draws every training pair"):
        config_from_args(parse(["--preset", "paper", "--train-pairs", "64"]))
    too_many = config_from_args(parse(["--preset", "smol", "--smoke", "--train-pairs", "6000"]))
    with pytest.raises(ValueError, match="asked for 6000 hh train pairs but the split has only"):
        prepare_data(too_many, load_tokenizer(too_many.model))  # the smoke model's tokenizer
    # The number reaches the data and the loop: a smoke run on 24 pairs (smoke's own are 16)
    # draws 24 and trains one pass over them, in runs/<preset>-pairs24-smoke.
    small = config_from_args(parse(["--smoke", "--train-pairs", "24"]))
    assert (small.name, small.data.n_train_pairs, small.pref.n_examples) == (
        "quick-pairs24-smoke",
        24,
        24,
    )
    # The folder says what it holds: --smoke with the preset's own number draws that many, not
    # smoke's 16, so it gets a folder of its own; with smoke's own number it is plain --smoke.
    own_number = config_from_args(parse(["--preset", "smol", "--smoke", "--train-pairs", "2048"]))
    assert (own_number.name, own_number.data.n_train_pairs) == ("smol-pairs2048-smoke", 2048)
    assert config_from_args(parse(["--smoke", "--train-pairs", "16"])) == config_from_args(
        parse(["--smoke"])
    )
    # On the tokenizer's own ids (quick's compact vocabulary is built from the training sample):
    # the 24 pairs start with the 16 (one seeded shuffle, then the first n), and the eval pairs are
    # drawn apart from them: the same pairs in the same order, which experiments.ablation relies
    # on to pair two grids that differ in n_train_pairs.
    tokenizer = load_tokenizer(small.model)
    drawn, own = (
        prepare_data(
            dataclasses.replace(c, data=dataclasses.replace(c.data, compact_vocab=None)), tokenizer
        )
        for c in (small, config_from_args(parse(["--smoke"])))
    )
    assert len(drawn.pref_train) == 24 and len(own.pref_train) == 16
    key = lambda p: (tuple(p.prompt), tuple(p.chosen), tuple(p.rejected))  # noqa: E731
    assert [key(p) for p in drawn.pref_train[:16]] == [key(p) for p in own.pref_train]
    assert [key(p) for p in drawn.pref_eval] == [key(p) for p in own.pref_eval]
    main(
        [
            "--smoke",
            "--train-pairs",
            "24",
            "--runs",
            "ipo_beta0.1",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    seen = [r["examples_seen"] for r in read_metrics(tmp_path / "ipo_beta0.1" / METRICS)]
    assert max(seen) == 24 and seen.count(24) >= 1


def write_trl(path, n: int, bad_row: str | None = None):
    rows = [
        json.dumps({"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": " No."})
        for i in range(n)
    ]
    path.write_text("\n".join(rows + ([bad_row] if bad_row else [])) + "\n", encoding="utf-8")
    return str(path)


def test_trl_format_data_on_the_command_line(tmp_path):
    parse = _parser().parse_args
    train_file, eval_file = write_trl(tmp_path / "t.jsonl", 20), write_trl(tmp_path / "e.jsonl", 9)
    cfg = config_from_args(parse(["--smoke", "--data", train_file, "--eval-data", eval_file]))
    assert cfg.data.datasets == ("trl",) and cfg.data.trl_eval == eval_file
    data = prepare_data(cfg, load_tokenizer(cfg.model))
    assert (len(data.pref_train), len(data.pref_eval)) == (16, 8)
    assert any("TRL-format" in line and "20 rows read" in line for line in data.reports)
    # The same truncation recipe as HH: at most max_length tokens, EOS ending every short response.
    assert all(len(p.prompt) + len(p.chosen) <= cfg.data.max_length for p in data.pref_train)
    bad = write_trl(tmp_path / "bad.jsonl", 20, json.dumps({"prompt": "x", "chosen": " y"}))
    cfg = config_from_args(parse(["--smoke", "--data", bad]))
    with pytest.raises(DataError, match=r"bad[.]jsonl:21: missing field\(s\) \['rejected'\]"):
        prepare_data(cfg, load_tokenizer(cfg.model))


def test_asking_for_more_pairs_than_the_split_has_is_an_error():
    cfg = get_preset("quick")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_eval_pairs=10_000))
    with pytest.raises(
        ValueError, match="asked for 10000 hh eval pairs but the split has only 718"
    ):
        prepare_data(cfg, load_tokenizer(cfg.model))


def test_compact_vocabulary_is_built_from_the_training_split_and_maps_every_split():
    cfg = smoke(get_preset("quick"))
    k = 4096
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, compact_vocab=k))
    tok = load_tokenizer(cfg.model)
    full = prepare_data(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, compact_vocab=None)), tok
    )
    data = prepare_data(cfg, tok)
    assert (data.vocab_size, data.pad_id) == (k, k - 2) and any(
        "compact vocabulary of 4096 ids" in r for r in data.reports
    )
    train_tokens = {
        t for p in full.pref_train + full.sft_train for t in p.prompt + p.chosen + p.rejected
    }
    assert len(train_tokens) < k - 1  # 16 smoke pairs: every training token is kept
    for split in ("sft_train", "sft_eval", "pref_train", "pref_eval"):
        for before, after in zip(getattr(full, split), getattr(data, split), strict=True):
            for a, b in zip(
                (before.prompt, before.chosen, before.rejected),
                (after.prompt, after.chosen, after.rejected),
                strict=True,
            ):
                assert len(a) == len(b) and max(b) < k
                # a token is UNK exactly when the training data does not have it; EOS maps to pad_id
                assert [t not in train_tokens for t in a] == [u == k - 1 for u in b]
                assert [t == tok.eos_token_id for t in a] == [u == k - 2 for u in b]
    assert any(
        u == k - 1 for p in data.pref_eval for u in p.chosen + p.rejected
    )  # eval has unseen tokens


def test_compact_vocabulary_is_for_a_random_init_model_only():
    cfg = dataclasses.replace(
        get_preset("quick"), data=dataclasses.replace(get_preset("quick").data, compact_vocab=64)
    )
    with pytest.raises(ValueError, match="has its own vocabulary"):
        dataclasses.replace(cfg, model=ModelConfig("gpt2"))
    args = _parser().parse_args(["--model", "gpt2"])
    assert config_from_args(args).data.compact_vocab is None  # --model brings its own vocabulary
    with pytest.raises(ValueError, match="compact_vocab must be None or >= 3"):
        dataclasses.replace(cfg.data, compact_vocab=2)


def test_trailing_mean_of_the_train_loss_curve():
    assert trailing_mean([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert trailing_mean([4.0, 2.0, 0.0], 10) == [
        4.0,
        3.0,
        2.0,
    ]  # a window longer than the run: running mean
    assert trailing_mean([3.0, -1.0], 1) == [3.0, -1.0]


def test_format_table():
    runs = [
        RunResult(
            "IPO", 0.1, {"rewards/accuracies": 0.5, "rewards/margins": -0.01234, "loss": 25.0}, None
        ),
        RunResult(
            "JS-IUPO", 0.5, {"rewards/accuracies": 0.625, "rewards/margins": 0.1, "loss": 1.5}, None
        ),
    ]
    assert format_table(runs, {"nll_per_token": 5.4321, "loss": 145.0}).splitlines() == [
        "| run | beta | eval accuracy | eval reward margin | eval loss |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| IPO | 0.1 | 0.5000 | -0.0123 | 25.0000 |",
        "| JS-IUPO | 0.5 | 0.6250 | 0.1000 | 1.5000 |",
        "",
        "SFT model (pi_ref): eval NLL 5.4321 nats/token, 145.00 nats/response.",
    ]
    # With the number of eval pairs: the binomial standard error sqrt(a (1 - a) / n); 0.5 over 64
    # pairs is 1/16.
    assert format_table(runs, {}, n_eval=64).splitlines() == [
        "| run | beta | eval accuracy | eval reward margin | eval loss |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| IPO | 0.1 | 0.5000 +- 0.0625 | -0.0123 | 25.0000 |",
        f"| JS-IUPO | 0.5 | 0.6250 +- {(0.625 * 0.375 / 64) ** 0.5:.4f} | 0.1000 | 1.5000 |",
        "",
        "Accuracy +- one binomial standard error over the 64 eval pairs.",
    ]


# ------------------------------------------------------------------------------------------------
# Loading models: a local checkpoint folder, a .gguf file
# ------------------------------------------------------------------------------------------------


def test_local_checkpoint_folder_loads_with_its_tokenizer(tmp_path):
    torch.manual_seed(0)
    saved = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=32)
    )
    saved.save_pretrained(tmp_path)
    for f in gpt2_tokenizer_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = ModelConfig(name_or_path=str(tmp_path))
    tok = load_tokenizer(cfg)
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tok.pad_token_id == tok.eos_token_id == 50256
    model = build_model(cfg, len(tok), n_positions=32)
    x = torch.tensor([[15496, 995, 50256]])
    saved.eval(), model.eval()
    torch.testing.assert_close(model(x).logits, saved(x).logits, rtol=0, atol=0)


def test_gguf_file_is_passed_to_transformers_as_gguf_file(tmp_path, monkeypatch):
    import transformers

    calls = []

    def fake_from_pretrained(path, **kwargs):
        calls.append((path, kwargs))
        return GPT2LMHeadModel(
            GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16)
        )

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake_from_pretrained)
    )
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    build_model(ModelConfig(name_or_path=str(gguf)), vocab_size=64, n_positions=16)
    assert calls == [(str(tmp_path), {"dtype": torch.float32, "gguf_file": gguf.name})]
    with pytest.raises(FileNotFoundError, match="no such gguf file"):
        build_model(
            ModelConfig(name_or_path=str(tmp_path / "missing.gguf")), vocab_size=64, n_positions=16
        )
    with pytest.raises(
        ValueError, match="has 64 token embeddings but the tokenizer has 100 tokens"
    ):
        build_model(ModelConfig(name_or_path=str(gguf)), vocab_size=100, n_positions=16)


def test_importing_upo_ref_has_no_side_effects():
    """No global torch settings, no RNG draws, no printing, and no transformers/matplotlib until
    used."""
    code = (
        "import sys, torch; n = torch.get_num_threads(); s = torch.get_rng_state()\n"
        "import upo_ref.lm.config, upo_ref.lm.data, upo_ref.lm.split, upo_ref.lm.tokenize\n"
        "import upo_ref.experiments.figure1, upo_ref.lm.logprobs, upo_ref.lm.models\n"
        "import upo_ref.reproduce, upo_ref.lm.synthetic, upo_ref.lm.train\n"
        "assert torch.get_num_threads() == n and torch.equal(torch.get_rng_state(), s)\n"
        "assert 'transformers' not in sys.modules and 'matplotlib' not in sys.modules, "
        "'heavy import'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
