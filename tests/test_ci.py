"""``.ci/run``: on Debian, a chromium that cannot be installed fails CI instead of letting it pass
with the browser tests of ``homediff ui`` skipped."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.skipif(not Path("/etc/debian_version").exists(), reason="the rule is Debian's")
def test_ci_fails_on_debian_when_chromium_cannot_be_installed(tmp_path):
    """With no chromium on PATH and apt-get failing, the script stops before installing anything
    (the python3 it would call next leaves a mark)."""
    tools = tmp_path / "bin"
    tools.mkdir()
    stub(tools, "apt-get", "exit 100")
    stub(tools, "python3", f": > {tmp_path / 'reached'}")
    os.symlink(shutil.which("dirname"), tools / "dirname")
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    result = subprocess.run([shutil.which("bash"), str(repo / ".ci" / "run")], capture_output=True,
                            text=True, env={"PATH": str(tools)}, timeout=60)
    assert result.returncode != 0
    assert "chromium could not be installed" in result.stderr
    assert not (tmp_path / "reached").exists()
