"""The final accuracy split by pi_ref's preference (experiments/by_reference.py): the recovery of
the reference's log-ratios, the split by hand, the committed tables of the smol grids."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from upo_ref.experiments.by_reference import (
    NEAR,
    by_reference_of_results,
    format_by_reference,
    reference_log_ratios,
    render_by_reference,
    split_by_reference,
)
from upo_ref.metrics import preference_metrics
from upo_ref.utils.paths import REPO_ROOT

F32_EPS = torch.finfo(torch.float32).eps
SMOL = REPO_ROOT / "results" / "smol"


def final_of(pc, pr, rc, rr, beta):
    """A per-pair final evaluation as the trainer writes it (float32 metrics as lists)."""
    m = preference_metrics(pc, pr, rc, rr, beta)
    final = {k: v.tolist() for k, v in m.items()}
    final["logps/chosen"], final["logps/rejected"] = pc.tolist(), pr.tolist()
    return final


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 3.0])
def test_reference_log_ratios_are_recovered_from_a_final_evaluation(beta):
    g = torch.Generator().manual_seed(0)
    rc, rr = (-400 * torch.rand(2, 500, generator=g)).unbind(0)  # float32, as in training
    pc = rc + 20 * (torch.rand(500, generator=g) - 0.5)  # the policy within 10 nats of pi_ref
    pr = rr + 20 * (torch.rand(500, generator=g) - 0.5)
    got = reference_log_ratios(final_of(pc, pr, rc, rr, beta), beta)
    got = torch.tensor(got, dtype=torch.float64)
    want = rc.double() - rr.double()
    # two float32 roundings of beta (log pi - log pi_ref) per response, undone by / beta
    bound = 3 * F32_EPS * ((pc.double() - rc.double()).abs() + (pr.double() - rr.double()).abs())
    assert ((got - want).abs() <= bound + 1e-12).all()


def test_split_by_reference_by_hand():
    # a_ref = -3, -1, 0, 2, 5 (pi = pi_ref + 1/4 on the chosen, so every reward is beta/4)
    beta = 0.5
    rc = torch.tensor([-4.0, -2.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    rr = torch.tensor([-1.0, -1.0, -1.0, -3.0, -6.0], dtype=torch.float64)
    final = final_of(rc + 0.25, rr, rc, rr, beta)
    final["rewards/accuracies"] = [1.0, 0.0, 1.0, 0.5, 0.0]  # any per-pair scores
    s = split_by_reference("X", beta, final)
    assert (s.n_below, s.acc_below, s.n_above, s.acc_above, s.n_equal) == (2, 0.5, 2, 0.25, 1)
    assert s.n_near == 4 and s.median_abs == 2.0  # |a_ref| = 3, 1, 0, 2, 5; 5 > log 99
    assert s.se_below == math.sqrt(0.25 / 2) and s.se_above == math.sqrt(0.25 * 0.75 / 2)
    assert s.difference == (0.25, math.hypot(s.se_below, s.se_above))
    assert "| X | 0.5 | 0.5000 +- 0.3536 | 0.2500 +- 0.3062 | +0.2500 +- 0.4677 |" in (
        format_by_reference([s])
    )


def test_an_empty_half_is_shown_as_such_and_bad_input_is_refused():
    rc = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    rr = torch.tensor([-3.0, -3.0], dtype=torch.float64)  # pi_ref prefers y_w on both
    s = split_by_reference("X", 0.1, final_of(rc, rr, rc, rr, 0.1))
    assert s.n_below == 0 and math.isnan(s.acc_below) and s.n_above == 2 and s.acc_above == 0.5
    assert "| X | 0.1 | no pairs | 0.5000 +- 0.3536 | - |" in format_by_reference([s])
    final = final_of(rc, rr, rc, rr, 0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        reference_log_ratios(final, 0.0)
    del final["logps/rejected"]
    with pytest.raises(ValueError, match=r"lacks \['logps/rejected'\]"):
        reference_log_ratios(final, 0.1)
    final = final_of(rc, rr, rc, rr, 0.1)
    del final["rewards/accuracies"]
    with pytest.raises(ValueError, match=r"lacks \['rewards/accuracies'\]"):
        split_by_reference("X", 0.1, final)
    with pytest.raises(ValueError, match="no runs to tabulate"):
        format_by_reference([])
    with pytest.raises(ValueError, match="has no pairs"):
        split_by_reference("X", 0.1, {k: [] for k in final_of(rc, rr, rc, rr, 0.1)})


def test_the_command_refuses_a_folder_that_is_not_a_grids_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json not found: give the results folder"):
        by_reference_of_results(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"runs": [{"label": "IPO", "beta": 0.1}]}))
    with pytest.raises(FileNotFoundError, match=r"ipo_beta0.1.final.json not found"):
        by_reference_of_results(tmp_path)


COMMITTED = sorted(p.parent.name for p in (REPO_ROOT / "results").glob("*/by_reference.md"))


@pytest.mark.parametrize("name", COMMITTED)
def test_each_committed_table_is_what_the_code_computes_from_the_committed_metrics(name):
    folder = REPO_ROOT / "results" / name
    splits = by_reference_of_results(folder)
    assert (folder / "by_reference.md").read_text(encoding="utf-8") == render_by_reference(splits)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    for s, run in zip(splits, summary["runs"], strict=True):
        n = run["n_eval_pairs"]
        assert (s.n_below + s.n_above + s.n_equal, s.n_equal) == (n, 0)
        # the two halves recombine into the run's own final accuracy
        whole = (s.n_below * s.acc_below + s.n_above * s.acc_above) / n
        assert whole == pytest.approx(run["final"]["rewards/accuracies"], abs=1e-12)
    if name == "smol":  # summed log-probs: |a_ref| < log 99 on few pairs, JS's weight 0 or 1
        assert splits[0].n_near < 0.1 * n
    assert NEAR == math.log(99)
    assert "smol" in COMMITTED


def test_the_command_prints_the_table(tmp_path):
    import shutil

    results = tmp_path / "smol"
    shutil.copytree(SMOL, results, ignore=shutil.ignore_patterns("*.jsonl", "by_reference.md"))
    out = subprocess.run(
        [sys.executable, "-m", "upo_ref.experiments.by_reference", str(results)],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    ).stdout  # fmt: skip
    assert out == format_by_reference(by_reference_of_results(SMOL)) + "\n"
    assert (results / "by_reference.md").read_text() == (SMOL / "by_reference.md").read_text()
