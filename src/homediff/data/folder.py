"""Folder datasets in the kohya layout: images with same-stem ``.txt`` captions, found recursively.

A sub-folder named ``N_name`` (N a positive integer) repeats the images below it N times (the
nearest such folder counts). Hidden files and folders are ignored. Links to folders are followed
once, and only within the root unless ``outside_links``: the scan never wanders into a system
folder that a link points at; the links left out are counted and named in a warning. The index is
cached in the user cache folder (``$XDG_CACHE_HOME/homediff/index``, else ``~/.cache/...``), keyed
by the folder's absolute path, and rebuilt when any folder's modification time changes (a file
added or removed).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from homediff.caching import cache_key, json_file_cache, user_cache_dir
from homediff.data.problems import BadSample, ProblemLog
from homediff.data.progress import progress
from homediff.data.options import MAX_CAPTION_BYTES
from homediff.data.transform import DataConfig, make_sample, sample_seed
from homediff.errors import HomediffError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
INDEX_VERSION = 2
_REPEAT = re.compile(r"^(\d+)_.")


@dataclass(frozen=True)
class Entry:
    """An image (path relative to the root), its caption file (or None) and its repeat count."""

    image: str
    caption: str | None
    repeats: int


def _leads_outside(root: Path, path: str | Path) -> bool:
    """Whether ``path``, its links resolved, lies outside ``root``."""
    return not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def _walk(root: Path, caption_extension: str = ".txt",
          outside_links: bool = False) -> tuple[list[Entry], dict[str, int], dict[str, str]]:
    """Scan ``root`` recursively: entries, each folder's mtime (ns) for cache validation, and the
    folder links not followed because they lead out of ``root`` (path → target). Extensions match
    in any case (``.PNG``, ``.TXT``)."""
    entries: list[Entry] = []
    mtimes: dict[str, int] = {}
    outside: dict[str, str] = {}
    visited: set[tuple[int, int]] = set()  # (device, inode): symlinked folders are followed once
    pending = [("", 1)]
    bar = progress(f"scanning {root}", None, "folder")
    while pending:
        rel, repeats = pending.pop()
        folder = root / rel
        info = folder.stat()
        if (info.st_dev, info.st_ino) in visited:
            continue
        visited.add((info.st_dev, info.st_ino))
        mtimes[rel] = info.st_mtime_ns
        images, texts = [], {}
        with os.scandir(folder) as scan:
            for item in scan:
                if item.name.startswith("."):
                    continue
                if item.is_dir():
                    if not outside_links and item.is_symlink() and _leads_outside(root, item.path):
                        outside[rel + item.name] = os.path.realpath(item.path)
                        continue
                    match = _REPEAT.match(item.name)
                    count = int(match.group(1)) if match and int(match.group(1)) > 0 else repeats
                    pending.append((f"{rel}{item.name}/", count))
                    continue
                stem, ext = os.path.splitext(item.name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    images.append((stem, item.name))
                elif ext.lower() == caption_extension.lower():
                    texts[stem] = item.name
        for stem, name in sorted(images):
            caption = f"{rel}{texts[stem]}" if stem in texts else None
            entries.append(Entry(rel + name, caption, repeats))
        bar.update()
        bar.set_postfix(images=len(entries), refresh=False)
    bar.close()
    entries.sort(key=lambda e: e.image)
    return entries, mtimes, outside


def _warn_outside(root: Path, outside: dict[str, str], shown: int = 5) -> None:
    if not outside:
        return
    links = ", ".join(f"{link} → {target}" for link, target in sorted(outside.items())[:shown])
    more = f" and {len(outside) - shown} more" if len(outside) > shown else ""
    logger.warning("%s: not scanned, %d link(s) to folders outside it (%s%s); set "
                   "allow_outside_links to follow them", root, len(outside), links, more)


def _index_valid(root: Path, mtimes: dict[str, int]) -> bool:
    try:
        return all((root / rel).stat().st_mtime_ns == t for rel, t in mtimes.items())
    except OSError:
        return False


def scan_folder(root: str | Path, cache: bool | str | Path = True, caption_extension: str = ".txt",
                outside_links: bool = False) -> list[Entry]:
    """Every image under ``root`` with its caption file (same stem, ``caption_extension``) and
    repeat count, sorted by path; folder links that lead out of ``root`` are followed only with
    ``outside_links`` (a warning counts and names those left out).

    ``cache``: True (``user_cache_dir("index")``), a folder to keep index files in, or False.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise HomediffError(f"{root}: not a folder; give the folder that holds the images")
    if not cache:
        entries, _, outside = _walk(root, caption_extension, outside_links)
        _warn_outside(root, outside)
        return entries
    index = json_file_cache(user_cache_dir("index") if cache is True else cache)
    key = cache_key("folder index", INDEX_VERSION, str(root), caption_extension.lower(), outside_links)
    stored = index.get(key)
    try:
        if stored and stored["root"] == str(root) and _index_valid(root, stored["mtimes"]):
            _warn_outside(root, stored["outside"])
            return [Entry(*item) for item in stored["entries"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        logger.info("folder index of %s: unreadable cache entry, scanning again", root)
    entries, mtimes, outside = _walk(root, caption_extension, outside_links)
    index.put(key, {"root": str(root), "mtimes": mtimes, "outside": outside,
                    "entries": [[e.image, e.caption, e.repeats] for e in entries]})
    _warn_outside(root, outside)
    return entries


def missing_captions(entries: list[Entry], config: DataConfig) -> str | None:
    """What to say when more than ``config.max_missing_captions`` of the images have no caption
    file (they would train as unconditional images); None otherwise."""
    missing = sum(entry.caption is None for entry in entries)
    if not entries or missing / len(entries) <= config.max_missing_captions:
        return None
    return (f"{missing:,} of {len(entries):,} images ({missing / len(entries):.0%}) have no "
            f"{config.caption_extension} caption file: set dataset.options.caption_extension (e.g. "
            "\".caption\"), or max_missing_captions = 1.0 to train on them without captions")


def read_entry(root: Path, entry: Entry, config: DataConfig) -> tuple[bytes, bytes | None]:
    """Image and caption bytes of an entry (see ``read_bounded``)."""
    image = read_bounded(root, entry.image, config.max_file_bytes, config.allow_outside_links)
    caption = None
    if entry.caption:
        caption = read_bounded(root, entry.caption, MAX_CAPTION_BYTES, config.allow_outside_links)
    return image, caption


def read_bounded(root: Path, relative: str, limit: int, outside_links: bool = False) -> bytes:
    """The bytes of a regular file under ``root``, at most ``limit`` of them; raises BadSample for
    anything else: a FIFO or device (opened without blocking, never read), a link that leads out
    of ``root`` (unless ``outside_links``), a larger file, or an OSError."""
    path = root / relative
    if not outside_links and _leads_outside(root, path):
        raise BadSample("outside-root", f"a link to {os.path.realpath(path)}, outside {root} "
                                        "(set allow_outside_links to read it)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise BadSample("unreadable", f"cannot open the file ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadSample("not-a-file", "not a regular file (a FIFO, device or socket)")
        if info.st_size > limit:
            raise BadSample("file-too-big", f"{info.st_size:,} bytes, over the limit of {limit:,}")
        try:
            data = file.read(limit + 1)
        except OSError as err:
            raise BadSample("unreadable", f"cannot read the file ({err.strerror or err})") from None
    if len(data) > limit:  # a file that grew while being read
        raise BadSample("file-too-big", f"over the limit of {limit:,} bytes")
    return data


class FolderDataset(Dataset):
    """A map-style dataset over a folder (see the module docstring); items are sample dicts.

    Index ``k`` is sample ``k mod len`` in epoch ``k // len`` (``EpochSampler`` yields such
    indices), and its random choices are seeded from (seed, epoch, sample), so crops differ per
    epoch and repeat exactly for any number of workers. A sample that must be skipped is replaced
    by another one drawn at random; ``max_tries`` failures in a row raise an error.
    """

    def __init__(self, root: str | Path, config: DataConfig | None = None, seed: int = 0,
                 cache: bool | str | Path = True, max_tries: int = 50):
        self.root = Path(root)
        self.config = config or DataConfig()
        self.seed, self.max_tries = seed, max_tries
        self.entries = scan_folder(self.root, cache, self.config.caption_extension,
                                   self.config.allow_outside_links)
        if not self.entries:
            raise HomediffError(f"{self.root}: no images found (looked for "
                                f"{', '.join(IMAGE_EXTENSIONS)} files, recursively)")
        self._ends = np.cumsum([e.repeats for e in self.entries])
        self.problems = ProblemLog()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return int(self._ends[-1])

    def entry(self, index: int) -> int:
        """The entry that sample ``index`` (0 ≤ index < len) shows."""
        return int(np.searchsorted(self._ends, index, side="right"))

    def __getitem__(self, index: int) -> dict:
        epoch, index = divmod(int(index), len(self))
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        target = self.entry(index)
        skipped: list[str] = []
        for _ in range(self.max_tries):
            if target not in self._bad:
                entry = self.entries[target]
                path = str(self.root / entry.image)
                try:
                    sample, notes = make_sample(*read_entry(self.root, entry, self.config), path,
                                                self.config, generator)
                except BadSample as bad:
                    self.problems.note(path, bad.kind, bad.detail, skipped=True)
                    self._bad.add(target)
                    skipped.append(bad.kind)
                else:
                    for kind, detail in notes:
                        self.problems.note(path, kind, detail)
                    sample["problems"] = skipped + [kind for kind, _ in notes]
                    return sample
            target = int(torch.randint(0, len(self.entries), (1,), generator=generator))
        raise HomediffError(
            f"{self.root}: {self.max_tries} unusable images in a row ({len(self._bad)} so far); "
            f"run `homediff data check {self.root}` to list the problems")
