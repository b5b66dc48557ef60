from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "xut-official-small"


@pytest.fixture
def official_small() -> Path:
    """The original implementation's reference outputs (a small random model)."""
    if not (FIXTURE / "model.safetensors").is_file():
        pytest.skip("the shared fixture xut-official-small is not beside this checkout")
    return FIXTURE
