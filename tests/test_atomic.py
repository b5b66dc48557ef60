"""Atomic writes (``homediff.atomic``): a process killed at any point of a write leaves the old file
or folder, or the new one, whole, never neither; and what is renamed into place is on disk first,
the rename itself after."""

import os
import sys
from pathlib import Path

import pytest

from homediff import atomic

WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT
# the audit events of the steps that change the file system (``open`` only when it writes);
# the folder swap, a C call, raises none of its own: the killed process wraps it in "exchange"
CHANGES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "exchange"}
OLD, NEW, OTHER = {"a": b"old a", "sub/b": b"old b"}, {"a": b"new a", "c": b"new c"}, {"d": b"other"}


def killed_at(event: int, action, swap: bool = True) -> bool:
    """Run ``action`` in a forked process that dies at once (no clean-up runs, as under SIGKILL or
    a power cut) just before its ``event``-th change to the file system; True if it died there,
    False if the action ended first. ``swap=False``: as on a file system that cannot swap folders."""
    pid = os.fork()
    if pid == 0:
        count = 0

        def hook(name, args):
            nonlocal count
            if name in CHANGES or (name == "open" and args[2] & WRITING):
                count += 1
                if count == event:
                    os._exit(9)

        real = atomic._exchange

        def exchange(a, b):
            sys.audit("exchange")
            return swap and real(a, b)

        atomic._exchange = exchange
        sys.addaudithook(hook)
        try:
            action()
        except BaseException:
            os._exit(1)
        os._exit(0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code in (0, 9), f"the action failed (exit code {code})"
    return code == 9


def make(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def contents(folder: Path) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def every_kill(tmp_path: Path, prepare, action, check, swap: bool = True) -> int:
    """Kill ``action(folder)`` before each of its changes in turn, each time in a fresh folder
    made by ``prepare(folder)``, and ``check(folder)`` what it left; the last time it finishes.
    Returns the number of tries (``swap``: see ``killed_at``)."""
    event = 0
    while True:
        event += 1
        folder = tmp_path / f"kill-{event}"
        folder.mkdir()
        prepare(folder)
        if not killed_at(event, lambda: action(folder), swap):
            return event
        check(folder)


def write_new(path: Path) -> None:
    """The new file in two writes, so that a kill can fall between them."""
    path.write_bytes(b"new ")
    with open(path, "ab") as file:
        file.write(b"contents")


@pytest.mark.parametrize("existing", [True, False], ids=["over-a-file", "new-file"])
def test_a_file_written_atomically_is_the_old_or_the_new_wherever_the_writer_dies(tmp_path, existing):
    def prepare(folder):
        if existing:
            (folder / "f").write_bytes(b"old")

    def check(folder):
        found = (folder / "f").read_bytes() if (folder / "f").exists() else None
        assert found in ((b"old",) if existing else (None,)) + (b"new contents",)

    points = every_kill(tmp_path, prepare, lambda folder: atomic.write_atomically(folder / "f", write_new),
                        check)
    assert points >= 4  # before and between the writes, before the rename, after it
    done = tmp_path / f"kill-{points}"
    assert sorted(os.listdir(done)) == ["f"] and (done / "f").read_bytes() == b"new contents"


@pytest.mark.parametrize("swap", [True, False], ids=["swapped", "moved-aside"])
@pytest.mark.parametrize("existing", [True, False], ids=["over-a-folder", "new-folder"])
def test_a_folder_replaced_is_the_old_or_the_new_wherever_the_writer_dies(tmp_path, existing, swap):
    """Over a folder, with a file system that swaps two folders in one step, the old one stays in
    place until the swap. One that cannot (``swap=False``: NFS, other systems) moves the old folder
    aside first: a kill between that and the next rename leaves it beside, whole, and the next
    replacement puts it back before it goes on."""
    def prepare(folder):
        make(folder / "out.partial", NEW)
        if existing:
            make(folder / "out", OLD)

    def check(folder):
        found = contents(folder / "out")
        if found is None and existing and not swap:
            assert contents(folder / "out.replaced") == OLD
            make(folder / "again.partial", OTHER)
            assert killed_at(2, lambda: atomic.replace_folder(folder / "again.partial", folder / "out"))
            assert contents(folder / "out") == OLD
            found = OLD
        assert found in ((OLD,) if existing else (None,)) + (NEW,)

    def replace(folder):
        atomic.replace_folder(folder / "out.partial", folder / "out")

    points = every_kill(tmp_path, prepare, replace, check, swap)
    assert points >= (4 if existing else 2)
    done = tmp_path / f"kill-{points}"
    assert contents(done / "out") == NEW and sorted(os.listdir(done)) == ["out"]


@pytest.fixture
def flushes(monkeypatch) -> list[tuple]:
    """Every flush to disk and rename ``atomic`` makes, in order: ("fsync", path), ("rename", a, b)."""
    log = []
    real_fsync, real_replace, real_rename = atomic.fsync, os.replace, os.rename
    monkeypatch.setattr(atomic, "fsync", lambda path: (log.append(("fsync", Path(path))), real_fsync(path)))
    for name, real in (("replace", real_replace), ("rename", real_rename)):
        monkeypatch.setattr(atomic.os, name, lambda a, b, real=real: (
            log.append(("rename", Path(a), Path(b))), real(a, b))[1])
    real_exchange = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: (
        log.append(("rename", Path(a), Path(b))), real_exchange(a, b))[1])
    return log


def test_a_file_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, flushes):
    atomic.write_atomically(tmp_path / "f", write_new)
    temporary = flushes[1][1]
    assert flushes == [("fsync", temporary), ("rename", temporary, tmp_path / "f"), ("fsync", tmp_path)]


@pytest.mark.parametrize("existing", [True, False], ids=["over-a-folder", "new-folder"])
def test_a_folder_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, flushes, existing):
    staged = make(tmp_path / "out.partial", NEW)
    if existing:
        make(tmp_path / "out", OLD)
    atomic.replace_folder(staged, tmp_path / "out")
    swap = flushes.index(("rename", staged, tmp_path / "out"))
    flushed = {entry[1] for entry in flushes[:swap] if entry[0] == "fsync"}
    assert flushed == {staged, staged / "a", staged / "c"}  # its files and their names
    assert flushes[swap + 1:] == [("fsync", tmp_path)]
