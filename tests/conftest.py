"""Test configuration: hypothesis profiles (float64 maths, no deadlines)."""

import os

import torch
from hypothesis import HealthCheck, settings

# The suite runs as two pytest-xdist workers on two cores: one intra-op thread each. (With two
# OpenMP threads per worker, tiny element-wise kernels wait ~10 ms at every parallel barrier.)
torch.set_num_threads(1)

# "default": random examples each run. "ci": the same examples every run (derandomized), so CI
# is reproducible; .ci/run selects it with HYPOTHESIS_PROFILE=ci.
settings.register_profile(
    "default", deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The notebook runs are the longest tests by far (a kernel each, 10-40 s). Collected first, the
# longest first, they start at once, and with ``--dist worksteal`` (pyproject.toml) the other worker
# takes the short tests off their queue: the two workers finish together.
_NOTEBOOKS_LONGEST_FIRST = ["07_", "04_", "03_", "02_", "06_", "01_"]


def _start_rank(item) -> tuple[int, int]:
    if "test_notebooks.py" not in item.nodeid:
        return (1, 0)
    rank = [i for i, prefix in enumerate(_NOTEBOOKS_LONGEST_FIRST) if f"[{prefix}" in item.nodeid]
    return (0, rank[0] if rank else len(_NOTEBOOKS_LONGEST_FIRST))


def pytest_collection_modifyitems(items):
    items.sort(key=_start_rank)  # stable: the rest keep their order
