"""The tree is lint-clean and formatted: ``ruff check`` and ``ruff format --check`` (configured in
pyproject.toml) find nothing in upo_ref/ and tests/."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from upo_ref.utils.paths import REPO_ROOT

TARGETS = ("upo_ref", "tests")


def _ruff(*args: str) -> subprocess.CompletedProcess:
    """Run ruff from this interpreter's environment (``python -m ruff``), else from PATH."""
    command = [sys.executable, "-m", "ruff"]
    probe = subprocess.run([*command, "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        if shutil.which("ruff") is None:
            pytest.fail("ruff is not installed: pip install -r requirements.txt (ruff==0.17.6)")
        command = ["ruff"]
    return subprocess.run([*command, *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_ruff_check_finds_nothing():
    result = _ruff("check", "--no-cache", "--output-format=concise", *TARGETS)
    assert result.returncode == 0, f"ruff check found:\n{result.stdout}{result.stderr}"


def test_ruff_format_changes_nothing():
    result = _ruff("format", "--no-cache", "--check", *TARGETS)
    assert result.returncode == 0, f"ruff format would reformat:\n{result.stdout}{result.stderr}"
