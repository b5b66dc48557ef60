"""Writes that are whole or absent: a reader (or a run killed mid-write) never sees half a file or
half a folder, and what stood before is replaced only once its successor is complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` beside ``path``, then rename it over ``path``."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def replace_folder(staged: str | Path, final: str | Path) -> None:
    """Put the complete folder ``staged`` at ``final``. An existing ``final`` is moved aside first
    (to ``final.replaced``, removed at the end): a folder cannot be renamed over a non-empty one, and
    deleting it first would leave a moment with neither."""
    staged, final = Path(staged), Path(final)
    aside = final.with_name(f"{final.name}.replaced")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.rename(final, aside)
    os.rename(staged, final)
    fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
