"""experiments.ablation: two grids on the same eval pairs, each shared run's change in final
accuracy as a paired difference, against numbers counted here by hand, and its refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest

from upo_ref.experiments.ablation import ablation, format_ablation, main, settings_changed
from upo_ref.experiments.samples import read_grid
from upo_ref.utils.paths import REPO_ROOT

TOL = 1e-12  # float64 arithmetic on a handful of 0/1/half values
CONFIG = {
    "name": "g",
    "model": {"name_or_path": "m"},
    "data": {"shuffle_seed": 0, "max_length": 128, "n_sft_examples": None},
    "sft": {"n_examples": 0},
    "betas": [0.1],
    "average_logps": False,
}


def grid(tmp_path, name: str, runs: dict, **change) -> str:
    """A results folder: summary.json and metrics/<run>.final.json for runs {(label, beta):
    per-pair correctness}; ``change``: config sections replaced or updated."""
    config = copy.deepcopy(CONFIG)
    for k, v in change.items():
        config[k] = {**config[k], **v} if isinstance(v, dict) else v
    folder = tmp_path / name
    (folder / "metrics").mkdir(parents=True)
    summary = {"config": config, "runs": []}
    for (label, beta), correct in runs.items():
        summary["runs"].append({"label": label, "beta": beta, "n_eval_pairs": len(correct)})
        stem = f"{label.lower()}_beta{beta:g}"
        (folder / "metrics" / f"{stem}.final.json").write_text(
            json.dumps({"rewards/accuracies": correct})
        )
    (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_each_shared_run_is_compared_pair_by_pair(tmp_path):
    ipo_a, ipo_b = [1, 1, 0, 0, 1, 0.5], [1, 0, 1, 1, 1, 1]
    a = grid(tmp_path, "a", {("IPO", 0.1): ipo_a, ("DPO", 0.1): [1, 0, 1, 0, 1, 0]})
    b = grid(
        tmp_path, "b", {("IPO", 0.1): ipo_b, ("IPO", 0.2): [0] * 6},
        sft={"n_examples": 8}, data={"n_sft_examples": 8}, betas=[0.1, 0.2],
    )  # fmt: skip
    rows, only = ablation(read_grid(a), read_grid(b))
    assert only == ["DPO beta 0.1", "IPO beta 0.2"]  # said, not silently dropped
    (row,) = rows
    d = [y - x for x, y in zip(ipo_a, ipo_b, strict=True)]  # 0, -1, 1, 1, 0, 0.5
    mean = sum(d) / 6
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 5)
    assert (row["label"], row["beta"], row["n"]) == ("IPO", 0.1, 6)
    assert abs(row["acc_a"] - 3.5 / 6) < TOL and abs(row["acc_b"] - 5 / 6) < TOL
    assert abs(row["diff"] - mean) < TOL and abs(row["se"] - sd / math.sqrt(6)) < TOL
    # A skips SFT: the phase is named whole, not field by field.
    assert settings_changed(read_grid(a), read_grid(b)) == ["data.n_sft_examples", "sft"]
    c = grid(tmp_path, "c", {}, sft={"n_examples": 8, "lr": 1.0}, data={"n_sft_examples": 8})
    assert settings_changed(read_grid(b), read_grid(c)) == ["sft.lr"]
    # More training pairs leave the eval pairs as they are: compared, and named.
    more = grid(tmp_path, "more", {("IPO", 0.1): ipo_b}, data={"n_train_pairs": 12})
    assert settings_changed(read_grid(a), read_grid(more)) == ["data.n_train_pairs"]
    assert ablation(read_grid(a), read_grid(more))[0][0]["diff"] == row["diff"]
    written = tmp_path / "ablation.md"
    text = main([a, b, "--write", str(written)])
    assert written.read_text() == text + "\n"
    assert "they differ in `data.n_sft_examples`, `sft`." in text
    assert (
        f"| IPO | 0.1 | {3.5 / 6:.4f} +- " in text and f"| {mean:+.4f} +- {row['se']:.4f} |" in text
    )


def test_grids_that_may_score_other_eval_pairs_are_refused(tmp_path, capsys):
    a = grid(tmp_path, "a", {("IPO", 0.1): [1, 0, 1]})
    for name, change in (
        ("seed", {"data": {"shuffle_seed": 1}}),  # another sample: the eval pairs reordered
        ("length", {"data": {"max_length": 64}}),  # other truncation
    ):
        b = grid(tmp_path, name, {("IPO", 0.1): [1, 1, 1]}, **change)
        with pytest.raises(ValueError, match="may score other eval pairs"):
            ablation(read_grid(a), read_grid(b))
    fewer = grid(tmp_path, "fewer", {("IPO", 0.1): [1, 1]})
    with pytest.raises(ValueError, match="eval-set size"):
        ablation(read_grid(a), read_grid(fewer))
    other = grid(tmp_path, "other", {("DPO", 0.1): [1, 1, 1]})
    with pytest.raises(SystemExit):
        main([a, other])
    assert "no run in common" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changed",
    [
        "smol-average",
        "smol-sft",
        "smol-trunk-float32",
        "smol-bfloat16",
        "smol-lr3e-05",
        "smol-lr0.0003",
        "smol-lr0.001",
        "smol-pairs5168",
        ("smol-seed1", "smol-seed1-pairs5168"),
        ("smol-seed1", "smol-sft-seed1"),
        ("smol-seed2", "smol-sft-seed2"),
    ],
)
def test_the_committed_ablation_tables_are_what_the_code_computes(changed):
    base, changed = changed if isinstance(changed, tuple) else ("smol", changed)
    a, b = (read_grid(REPO_ROOT / "results" / name) for name in (base, changed))
    committed = (REPO_ROOT / "results" / changed / "ablation.md").read_text(encoding="utf-8")
    assert committed == format_ablation(a, b, *ablation(a, b)) + "\n"


def test_a_grid_against_itself_changes_no_pair():
    a = read_grid(REPO_ROOT / "results" / "smol")
    rows, only = ablation(a, a)
    assert not only and len(rows) == len(a["runs"])
    assert all(r["diff"] == 0 and r["se"] == 0 for r in rows)
    table = format_ablation(a, a, rows, only)
    assert "they differ in no setting" in table and "nan" not in table
    assert table.count("| no pair changed |") == len(rows)


def test_every_pair_changed_alike_is_said_not_divided_by_zero(tmp_path):
    """Every eval pair wrong under A and right under B: the paired SE is 0, the change +1."""
    a = grid(tmp_path, "a", {("IPO", 0.1): [0, 0, 0, 0]})
    b = grid(tmp_path, "b", {("IPO", 0.1): [1, 1, 1, 1]}, sft={"n_examples": 8})
    (row,) = ablation(read_grid(a), read_grid(b))[0]
    assert (row["diff"], row["se"]) == (1.0, 0.0)
    table = main([a, b])
    assert "| +1.0000 +- 0.0000 | every pair changed alike |" in table
    assert "nan" not in table and "inf" not in table
