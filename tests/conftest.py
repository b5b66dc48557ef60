import random
from pathlib import Path

import pytest
import torch

from tiny_components import OFFICIAL_SMALL

from homediff.datasets import shapes


@pytest.fixture
def official_small() -> Path:
    """The original implementation's reference outputs (a small random model; see its README)."""
    return OFFICIAL_SMALL


@pytest.fixture(scope="session", autouse=True)
def session_user_cache(tmp_path_factory):
    """The user cache (remembered precision measurements, data-folder indexes, evaluation features)
    in a folder of the test session, for the commands the tests run too: never the user's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on shared cores, two threads wait on each other for every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def index_cache(tmp_path, monkeypatch):
    """Keep folder-index caches inside the test's temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def shape_scenes():
    """scenes(count, seed): (spec, objects) of random shapes scenes, one in five from the held-out
    pairs."""
    def scenes(count: int, seed: int = 0):
        rng = random.Random(seed)
        specs = [shapes.random_spec(rng, heldout=i % 5 == 0) for i in range(count)]
        return [(spec, shapes.layout(spec, rng)) for spec in specs]

    return scenes
