from pathlib import Path

import pytest
import torch

from tiny_components import OFFICIAL_SMALL


@pytest.fixture
def official_small() -> Path:
    """The original implementation's reference outputs (a small random model; see its README)."""
    return OFFICIAL_SMALL


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on shared cores, two threads wait on each other for every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
