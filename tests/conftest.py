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
    "ci", deadline=None, max_examples=100, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
