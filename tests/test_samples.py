"""experiments.samples: a grid's final accuracies over several training samples, against numbers
computed here by hand (statistics module, the t quantile), and its refusals."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest

from upo_ref.experiments.samples import format_spreads, main, read_grid, spreads
from upo_ref.utils.paths import REPO_ROOT
from upo_ref.utils.stats import binomial_se, student_t_quantile

TOL = 1e-12  # float64 arithmetic on a handful of numbers
N_EVAL = 2000
CONFIG = {
    "model": {"name_or_path": "m"},
    "data": {"shuffle_seed": 0, "max_length": 128},
    "sft": {},
    "pref": {"lr": 1e-4},
    "average_logps": False,
    "precision": "float32",
    "trunk_precision": "bfloat16",
    "cache_dtype": "float16",
}


def grid(tmp_path, seed: int, ipo: float, js: float, diff: float, se: float, dpo: bool = False):
    """A results folder with summary.json: IPO and JS-IUPO at beta 0.1 (DPO too if asked)."""
    runs = [("IPO", ipo), ("JS-IUPO", js)] + [("DPO", 0.52)] * dpo
    config = copy.deepcopy(CONFIG)
    config["data"]["shuffle_seed"] = seed
    summary = {
        "config": config,
        "runs": [
            {"label": lab, "beta": 0.1, "n_eval_pairs": N_EVAL, "final": {"rewards/accuracies": a}}
            for lab, a in runs
        ],
        "paired_comparisons": [
            {"a": "IPO", "b": "JS-IUPO", "beta": 0.1, "n": N_EVAL, "diff": diff, "se": se}
        ],
    }
    folder = tmp_path / f"seed{seed}"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_spreads_are_the_hand_computed_mean_sd_and_t_interval(tmp_path):
    ipo, js, diff, se = (
        [0.55, 0.53, 0.535],
        [0.51, 0.515, 0.50],
        [-0.04, -0.015, -0.035],
        [0.013, 0.014, 0.012],
    )
    folders = [grid(tmp_path, s, ipo[s], js[s], diff[s], se[s], dpo=s == 0) for s in range(3)]
    table, missing = spreads([read_grid(f) for f in folders])
    assert missing == ["DPO beta 0.1"]  # only one grid has it: said, not silently dropped
    by_name = {s.what: s for s in table}
    assert sorted(by_name) == ["IPO", "JS-IUPO", "JS-IUPO - IPO"]
    t = student_t_quantile(0.975, 2)
    for name, values, own in (
        ("IPO", ipo, [binomial_se(a, N_EVAL) for a in ipo]),
        ("JS-IUPO - IPO", diff, se),
    ):
        s = by_name[name]
        sd = statistics.stdev(values)
        assert s.values == tuple(values) and s.ses == tuple(own)
        assert abs(s.mean - statistics.fmean(values)) < TOL
        assert abs(s.sd - sd) < TOL and abs(s.se_of_mean - sd / math.sqrt(3)) < TOL
        lo, hi = s.interval
        assert abs(lo - (s.mean - t * sd / math.sqrt(3))) < TOL
        assert abs(hi - (s.mean + t * sd / math.sqrt(3))) < TOL
        assert abs(s.mean_own_se - statistics.fmean(own)) < TOL
    written = tmp_path / "samples.md"
    text = main([str(f) for f in folders] + ["--write", str(written)])
    assert written.read_text() == text + "\n"
    assert "| IPO | 0.1 | 0.5500, 0.5300, 0.5350 | 0.5383 |" in text
    assert "Not in every grid, so not compared: DPO beta 0.1." in text


def test_grids_of_other_experiments_or_the_same_seed_are_refused(tmp_path, capsys):
    a = grid(tmp_path, 0, 0.55, 0.51, -0.04, 0.013)
    b = grid(tmp_path, 1, 0.53, 0.52, -0.01, 0.013)
    other = json.loads((b / "summary.json").read_text())
    other["config"]["data"]["max_length"] = 112
    (b / "summary.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"differ in \['data'\], not only in the data seed"):
        spreads([read_grid(a), read_grid(b)])
    other["config"]["data"]["max_length"] = 128
    other["config"]["data"]["shuffle_seed"] = 0
    (b / "summary.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"the same data seed \(\[0, 0\]\)"):
        spreads([read_grid(a), read_grid(b)])
    with pytest.raises(ValueError, match="at least 2 grids, got 1"):
        spreads([read_grid(a)])
    with pytest.raises(SystemExit):
        main([str(a), str(tmp_path / "nowhere")])
    assert "nowhere/summary.json not found: give the results folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "written, names",
    [
        ("smol", ("smol", "smol-seed1", "smol-seed2", "smol-seed3")),
        ("smol-sft", ("smol-sft", "smol-sft-seed1", "smol-sft-seed2")),
    ],
)
def test_the_committed_samples_tables_are_what_the_code_computes(written, names):
    grids = [read_grid(REPO_ROOT / "results" / name) for name in names]
    table, missing = spreads(grids)
    committed = (REPO_ROOT / "results" / written / "samples.md").read_text(encoding="utf-8")
    assert committed == format_spreads(grids, table, missing) + "\n"
