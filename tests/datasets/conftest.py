import pytest
import torch

pytest.importorskip("PIL.Image", reason="the datasets tests need Pillow: pip install 'homediff[data]'")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as in the data tests: faster on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    """Keep folder-index caches inside the test's temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
