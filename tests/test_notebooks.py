"""Every notebook runs top to bottom in a clean kernel, in fast mode (UPO_REF_FAST=1).

Fast mode shrinks seeds and steps; figures go to a temporary folder so the committed figures,
which come from the full run, are never overwritten by a test.
"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_clean_in_fast_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("UPO_REF_FAST", "1")
    monkeypatch.setenv("UPO_REF_FIGURES", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
    # Every figure the notebook makes is also committed under figures/ (from the full run).
    made = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".svg", ".pdf"))
    assert made, f"{path.name} saved no figure under figures/"
    missing = [name for name in made if not (ROOT / "figures" / name).exists()]
    assert not missing, (
        f"{path.name} makes figures that are not committed under figures/: {missing}"
    )
