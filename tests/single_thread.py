"""An autouse fixture for the training tests: one torch intra-op thread while a test runs.

The suite runs as two pytest-xdist workers on two cores. With two threads per worker, the tiny
kernels of the tiny test models wait at every parallel barrier and the training tests run ten
times slower. A test module opts in with ``from single_thread import one_torch_thread  # noqa: F401``.
(Where the project's conftest already sets one thread for the whole session, this is a no-op.)
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
