"""Writes that are whole or absent: a reader (or a run killed mid-write, or a power cut) never sees
half a file or half a folder, and what stood before is replaced only once its successor is complete
and on disk."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` beside ``path``, flush it to disk, rename it over ``path``, and flush
    the rename."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        fsync(temporary)
        os.replace(temporary, path)
        fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def replace_folder(staged: str | Path, final: str | Path) -> None:
    """Put the complete folder ``staged`` at ``final``, its files flushed to disk first.

    An existing ``final`` is swapped with ``staged`` in one step, then deleted. Where the file
    system cannot swap (other systems than Linux, NFS), it is moved aside to ``final.replaced``
    first (a folder cannot be renamed over a non-empty one); should a crash come between the two
    renames, the next replacement of ``final`` puts it back before going on."""
    staged, final = Path(staged), Path(final)
    aside = final.with_name(f"{final.name}.replaced")
    if aside.exists() and not final.exists():
        os.rename(aside, final)
    shutil.rmtree(aside, ignore_errors=True)
    _flush_folder(staged)
    if final.exists() and _exchange(staged, final):
        fsync(final.parent)
        shutil.rmtree(staged)  # the old folder, swapped out
        return
    if final.exists():
        os.rename(final, aside)
    os.rename(staged, final)
    fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _flush_folder(folder: Path) -> None:
    """Flush every file under ``folder`` and every folder's entries, ``folder``'s last."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(Path(parent, name))
        fsync(Path(parent))


@functools.cache
def _renameat2():
    """Linux's renameat2 from the C library, or None."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system or file system cannot."""
    rename = _renameat2()
    if rename is None:
        return False
    if rename(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
