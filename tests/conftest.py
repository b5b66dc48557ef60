from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "xut-official-small"


@pytest.fixture
def official_small() -> Path:
    """The original implementation's reference outputs (a small random model)."""
    if not (FIXTURE / "model.safetensors").is_file():
        pytest.skip("the shared fixture xut-official-small is not beside this checkout")
    return FIXTURE


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on shared cores, two threads wait on each other for every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
