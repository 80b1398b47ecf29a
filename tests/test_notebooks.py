"""The notebooks: each runs top to bottom in a clean kernel in fast mode (UPO_REF_FAST=1), and the
committed ones carry the outputs of a full run of the current code, figures embedded.

Fast mode shrinks seeds and steps; figures go to a temporary folder so the committed figures,
which come from the full run, are never overwritten by a test.
"""

import ast
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from upo_ref.utils.notebooks import METADATA_KEY, source_hash

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]
FIGURE_MAKERS = {("plt", "subplots"), ("plt", "figure")}  # calls that create a matplotlib figure


def _read(path):
    return nbformat.read(path, as_version=4)


def _code(cell) -> ast.Module:
    lines = cell.source.splitlines()
    return ast.parse("\n".join(line for line in lines if not line.lstrip().startswith("%")))


def _calls(tree, skip_defs: bool):
    """What ``tree`` calls: ("plt", "subplots") for plt.subplots(...), ("", "f") for f(...)."""
    todo, out = list(ast.iter_child_nodes(tree)), set()
    while todo:
        node = todo.pop()
        if skip_defs and isinstance(node, ast.FunctionDef):
            continue
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                out.add((f.value.id, f.attr))
            elif isinstance(f, ast.Name):
                out.add(("", f.id))
        todo.extend(ast.iter_child_nodes(node))
    return out


def figure_cells(nb) -> list[int]:
    """Indices of the code cells that draw a figure: they call plt.subplots / plt.figure outside a
    function definition, or call a function defined in the notebook that does."""
    drawing, cells = set(), []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tree = _code(cell)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and _calls(node, False) & FIGURE_MAKERS:
                drawing.add(("", node.name))
        if _calls(tree, True) & (FIGURE_MAKERS | drawing):
            cells.append(i)
    return cells


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_embeds_every_figure_it_draws(path):
    nb = _read(path)
    cells = figure_cells(nb)
    assert cells, f"{path.name} draws no figure (or the detection in this test is broken)"
    missing = [
        i
        for i in cells
        if not any("image/png" in o.get("data", {}) for o in nb.cells[i].get("outputs", []))
    ]
    assert not missing, (
        f"{path.name}: code cells {missing} draw a figure but embed no image/png in their outputs; "
        f"start the notebook with `%matplotlib inline` and re-execute it in full "
        f"(python -m upo_ref.utils.notebooks {path.relative_to(ROOT)})"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_outputs_are_those_of_the_current_code(path):
    """Guarantees: the committed outputs come from one top-to-bottom run (execution counts
    1, 2, ..., no error), made by ``upo_ref.utils.notebooks.execute`` (a full run: it refuses
    fast mode) on exactly the current code cells and the current upo_ref modules the notebook
    imports. Does not guarantee: the same third-party versions or shared data, nor that a rerun
    prints the same numbers (timings differ; the notebooks seed their randomness)."""
    nb = _read(path)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not one run top to bottom"
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: committed outputs contain an error"
    recorded = nb.metadata.get(METADATA_KEY, {}).get("source_hash")
    assert recorded == source_hash(nb), (
        f"{path.name}: its code cells or the upo_ref modules it imports changed since its outputs "
        f"were made; re-execute it in full: python -m upo_ref.utils.notebooks "
        f"{path.relative_to(ROOT)}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_clean_in_fast_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("UPO_REF_FAST", "1")
    monkeypatch.setenv("UPO_REF_FIGURES", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _read(path)
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
    # Embedded in fast mode too, under MPLBACKEND=Agg (what CI sets).
    assert all(
        any("image/png" in o.get("data", {}) for o in nb.cells[i].get("outputs", []))
        for i in figure_cells(nb)
    ), f"{path.name}: a figure is not embedded when run under MPLBACKEND=Agg"


# Numbers the prose of a committed notebook quotes, each of which one of its cells prints.
PROSE_NUMBERS = {
    "01_f_divergences.ipynb": [
        "88.72",
        "103.97",
        "88.75",
        "88.05",
        "104.00",
        "103.95",
        "88.03",
        "2.78",
        "6.54",
        "1.00",
    ],
    "02_kkt_reparameterisation.ipynb": ["1.1e-16", "0.4"],
    "03_loss_zoo.ipynb": [
        "7.4e-13",
        "2.7e-15",
        "4.99",
        "147.4",
        "0.7213",
        "0.4761",
        "0.0110",
        "0.4995",
        "0.5151",
        "0.0029",
        "0.0044",
        "0.1743",
        "0.0084",
        "2.394",
        "121.862",
        "0.054",
    ],
    "04_bandits.ipynb": ["0.0556", "0.0151", "0.7213", "800"],
    "05_reproduction.ipynb": [
        "0.5476 +- 0.0106",
        "0.5430 +- 0.0106",
        "0.5335 +- 0.0106",
        "0.5139 +- 0.0107",
        "0.5175 +- 0.0107",
        "0.5130 +- 0.0107",
        "0.5112 +- 0.0107",
        "0.5271 +- 0.0107",
        "-0.0337 +- 0.0137",
        "-2.46",
        "0.0150",
        "1799.3",
        "1761.4",
        "42.0",
        "0.0810",
        "0.5175",
        "0.7951 +- 0.0120",
        "0.2123 +- 0.0126",
        "0.5646 +- 0.0147",
        "0.5292 +- 0.0153",
        "0.5476, 0.5344, 0.5266, 0.5198",
        "0.5321",
        "0.0119",
        "-0.0337, -0.0132, -0.0146, +0.0000",
        "-0.0154",
        "(-0.0374, +0.0067)",
        "0.5280",
        "0.5225",
        "+0.0018",
        "(-0.0308, +0.0063)",
        "(-0.0215, +0.0097)",
        "-0.0173 +- 0.0128",
        "-0.0036 +- 0.0147",
        "2.6679",
        "2.4207",
        "-0.0287 +- 0.0077",
        "+0.0114 +- 0.0084",
        "+0.0064 +- 0.0129",
        "-0.0092",
        "(-0.0213, +0.0029)",
        "-0.0119",
        "+0.0059 +- 0.0075",
        "0.5198 +- 0.0107",
        "0.8206 +- 0.0114",
        "0.1972 +- 0.0122",
        "+0.0296 +- 0.0112",
        "0.5407 +- 0.0106",
        "0.5385 +- 0.0106",
        "0.5485 +- 0.0106",
        "+0.0009 +- 0.0119",
        "-0.0287 +- 0.0136",
        "-0.0077 +- 0.0095",
        "0.5366 +- 0.0106",
        "0.5453 +- 0.0106",
        "+0.0105 +- 0.0119",
        "+0.0109 +- 0.0117",
        "-0.0123 +- 0.0081",
        "-0.0132 +- 0.0089",
        "-0.0023 +- 0.0079",
        "+0.0059 +- 0.0078",
        "0.5181",
        "0.5207",
        "+0.0064, -0.0032, +0.0046",
        "+0.0026",
        "(-0.0100, +0.0152)",
        "0.907 +- 0.006",
        "0.649 +- 0.011",
        "0.540 +- 0.017",
        "0.555 +- 0.017",
        "0.535 +- 0.010",
        "0.533 +- 0.010",
        "0.547 +- 0.016",
        "0.531 +- 0.011",
        "0.527 +- 0.011",
        "+0.0142",
        "+0.0225",
        "+0.0199",
        "+0.0148",
        "0.0139",
        "+0.0031",
        "-0.0032",
    ],
    "06_auxiliary_upo_frontier.ipynb": ["-0.875"],
}


def _printed(nb) -> str:
    texts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            texts.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


@pytest.mark.parametrize("name", sorted(PROSE_NUMBERS))
def test_numbers_quoted_in_the_prose_are_printed_by_the_cells(name):
    nb = _read(ROOT / "notebooks" / name)
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    printed = _printed(nb)
    not_in_prose = [x for x in PROSE_NUMBERS[name] if x not in prose]
    not_printed = [x for x in PROSE_NUMBERS[name] if x not in printed]
    assert not not_in_prose, f"{name}: the prose no longer quotes {not_in_prose}"
    assert not not_printed, f"{name}: the prose quotes {not_printed}, which no cell prints"
