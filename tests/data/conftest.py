import pytest

pytest.importorskip("PIL.Image", reason="the data tests need Pillow: pip install 'homediff[data]'")


@pytest.fixture(autouse=True)
def data_test_defaults(one_thread, index_cache):
    """One thread (as the data code runs in loader workers) and the index cache in the test's
    folder, for every test here."""
