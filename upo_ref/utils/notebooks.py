"""Which code a notebook's outputs come from: a hash of its sources, recorded at full execution.

A committed notebook carries the outputs of one full run (``UPO_REF_FAST`` unset). Its metadata
``upo_ref.source_hash`` is the SHA-256 of

* the notebook's code cells, in order, and
* every ``upo_ref`` module its code cells import, followed transitively through the modules' own
  imports of ``upo_ref`` (absolute and relative), each file's bytes under its path,

computed when the notebook was executed in full by :func:`execute`. ``tests/test_notebooks.py``
recomputes it: a change to a cell or to any module the notebook runs makes the test fail until the
notebook is re-executed in full with ``python -m upo_ref.utils.notebooks notebooks/<name>.ipynb``.

What the hash does not cover: third-party packages (torch, matplotlib: their versions are not
recorded), data under ``../shared``, markdown cells (prose is checked against the printed numbers
by its own test), and modules reached other than by an import statement (``importlib``).
"""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

__all__ = ["code_sources", "upo_ref_dependencies", "source_hash", "execute"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../upo_ref
METADATA_KEY = "upo_ref"


def code_sources(nb) -> list[str]:
    """The source of every code cell of the nbformat notebook ``nb``, in order."""
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _module_file(name: str) -> Path | None:
    """The file of module ``upo_ref.a.b`` (a module or a package's ``__init__``), or None."""
    parts = name.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(tree: ast.AST, module: str | None, is_package: bool) -> set[str]:
    """Names of the upo_ref modules ``tree`` imports (for ``from m import x``: m, and m.x when that
    is a module). ``module`` is the importing module's name, for relative imports."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "upo_ref"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    continue  # a relative import in a notebook cell cannot be upo_ref's
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "upo_ref":
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")}
    # importing upo_ref.a.b runs upo_ref/__init__.py and upo_ref/a/__init__.py as well
    return {".".join(n.split(".")[:k]) for n in found for k in range(1, len(n.split(".")) + 1)}


def upo_ref_dependencies(sources: list[str]) -> list[Path]:
    """Every upo_ref module file the code ``sources`` import, transitively, sorted by path."""
    todo = set()
    for source in sources:
        # IPython magics (%matplotlib inline) are not Python: drop those lines
        text = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%"))
        todo |= _imports(ast.parse(text), None, False)
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        tree = ast.parse(path.read_text(encoding="utf-8"))
        todo |= _imports(tree, name, path.name == "__init__.py") - set(seen)
    return sorted(set(seen.values()))


def source_hash(nb) -> str:
    """SHA-256 (hex) of the notebook's code cells and the upo_ref modules they import (module
    doc)."""
    sources = code_sources(nb)
    digest = hashlib.sha256()
    for source in sources:
        digest.update(b"cell\0" + source.encode("utf-8") + b"\0")
    for path in upo_ref_dependencies(sources):
        relative = path.relative_to(PACKAGE_DIR.parent).as_posix()
        digest.update(b"file\0" + relative.encode("utf-8") + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def execute(path: str | Path, timeout: int = 1800) -> str:
    """Execute the notebook at ``path`` in full, top to bottom in a clean kernel, write its outputs
    in place and record its source hash in the metadata; return the hash.

    Refuses to run in fast mode (``UPO_REF_FAST=1``): the committed outputs are those of a full
    run. The kernel imports the upo_ref of this checkout (``PYTHONPATH`` is set to it).
    """
    import nbformat
    from nbclient import NotebookClient

    if os.environ.get("UPO_REF_FAST", "0") == "1":
        raise RuntimeError("UPO_REF_FAST=1 is set: committed notebooks carry full runs; unset it")
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    root = str(PACKAGE_DIR.parent)
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    digest = source_hash(nb)
    nb.metadata[METADATA_KEY] = {
        "source_hash": digest,
        "modules": [
            p.relative_to(PACKAGE_DIR.parent).as_posix()
            for p in upo_ref_dependencies(code_sources(nb))
        ],
    }
    nbformat.write(nb, path)
    return digest


if __name__ == "__main__":
    import sys
    import time

    if len(sys.argv) < 2:
        sys.exit("usage: python -m upo_ref.utils.notebooks notebooks/<name>.ipynb [...]")
    for name in sys.argv[1:]:
        t0 = time.perf_counter()
        print(f"{name}: {execute(name)[:12]} ({time.perf_counter() - t0:.0f} s)", flush=True)
