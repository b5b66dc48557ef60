"""WebDataset tar shards: streamed, split across ranks and workers, resumable; and packing a folder.

A shard holds samples as members ``KEY.jpg`` (or png, webp, bmp), ``KEY.txt`` (caption) and
``KEY.path`` (the source path, used in logs). Each epoch the shard list is shuffled with the seed
(the same order on every rank) and global worker g of G (G = ranks × workers) reads shards
g, g+G, ...; with fewer shards than workers, every worker reads all shards and keeps sample i when
i mod G = g. Either way every sample is seen once per epoch, by one worker. A seeded buffer shuffles
samples within a worker. The stream position (epoch, samples read) of each worker travels with the
batches (``batch["state"]``); ``ShardProgress`` collects it and ``load_state_dict`` resumes there.
"""

from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from homediff.data.folder import IMAGE_EXTENSIONS, scan_folder
from homediff.data.loader import distributed_rank
from homediff.data.problems import BadSample, ProblemLog
from homediff.data.progress import progress
from homediff.data.transform import DataConfig, make_sample, sample_seed
from homediff.errors import ConfigError, HomediffError
from homediff.extras import require

logger = logging.getLogger(__name__)

IMAGE_MEMBERS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)  # the keys an image may have in a shard


def shard_list(shards: str | Path | Iterable[str | Path]) -> list[str]:
    """Shard paths from a folder (its ``*.tar``), a glob, a brace pattern
    (``data-{000..099}.tar``) or a list."""
    if not isinstance(shards, (str, Path)):
        found = [str(s) for s in shards]
    elif Path(shards).is_dir():
        found = sorted(str(p) for p in Path(shards).glob("*.tar"))
    else:
        expand = require("webdataset.shardlists", "data", "webdataset").expand_urls
        found = sorted({match for url in expand(str(shards))
                        for match in (glob.glob(url) if glob.has_magic(url) else [url])})
    if not found:
        raise HomediffError(f"no shards found in {shards}: give a folder of .tar files, a glob or "
                            "a brace pattern such as data-{000000..000009}.tar")
    return found


def dataset_kind(path: str | Path, kind: str = "auto") -> str:
    """``"folder"`` or ``"shards"``: as given, or for ``"auto"`` from the path (a .tar file, a
    glob or brace pattern, or a folder of .tar files are shards). A folder that holds both .tar
    files and images is an error: which one is meant cannot be guessed."""
    if kind in ("folder", "shards"):
        return kind
    text, path = str(path), Path(path)
    if path.suffix == ".tar" or glob.has_magic(text) or "{" in text:
        return "shards"
    if not (path.is_dir() and any(path.glob("*.tar"))):
        return "folder"
    if scan_folder(path):
        raise ConfigError(f"{path} holds both .tar shards and images: say which to read with "
                          "dataset.kind = \"shards\" or \"folder\" (or move one of them)")
    return "shards"


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of ``size`` items."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """Samples streamed from tar shards (see the module docstring); items are sample dicts.

    ``epochs``: passes over the data (None: forever; count training steps instead). Random choices
    are seeded from (seed, epoch, worker, position), so a resumed stream repeats exactly.
    """

    def __init__(self, shards, config: DataConfig | None = None, seed: int = 0,
                 epochs: int | None = None, shuffle_buffer: int = 256, rank: int | None = None,
                 world_size: int | None = None):
        self.shards = shard_list(shards)
        self.config = config or DataConfig()
        self.seed, self.epochs, self.shuffle_buffer = seed, epochs, max(1, shuffle_buffer)
        self.rank, self.world_size = distributed_rank(rank, world_size)
        self.problems = ProblemLog()
        self._resume: dict | None = None
        self._pending: list[str] = []

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``ShardProgress.state_dict()``; call before creating the loader."""
        self._resume = state

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _start(self, gid: int, world: int) -> tuple[int, int]:
        if not self._resume or not self._resume.get("positions"):
            return 0, 0
        if self._resume.get("world") not in (None, world):
            raise HomediffError(
                f"the saved shard position is for {self._resume['world']} global workers (ranks × "
                f"loader workers) but this run has {world}: resume with the same numbers")
        epoch, position = self._resume["positions"].get(str(gid), (0, 0))
        return int(epoch), int(position)

    def _bad_shard(self, err: Exception) -> bool:
        where = next((str(a) for a in reversed(err.args) if isinstance(a, str)), "a shard")
        detail = f"{type(err).__name__}: {err.args[0] if err.args else ''}"
        self.problems.note(where, "bad-shard", detail, skipped=True)
        self._pending.append("bad-shard")
        return True

    def raw_samples(self, gid: int, world: int, epoch: int) -> Iterator[dict]:
        """The raw (undecoded) samples of global worker ``gid`` in ``epoch``, in stream order."""
        tariterators = require("webdataset.tariterators", "data", "webdataset")
        order = list(self.shards)
        random.Random(sample_seed(self.seed, epoch)).shuffle(order)
        mine = order[gid::world] if len(order) >= world else order
        samples = tariterators.tarfile_samples([{"url": url} for url in mine],
                                               handler=self._bad_shard)
        if len(order) < world:
            samples = (s for i, s in enumerate(samples) if i % world == gid)
        rng = random.Random(sample_seed(self.seed, epoch, gid, world))
        return _shuffled(samples, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict]:
        gid, world = self._worker()
        epoch, start = self._start(gid, world)
        while self.epochs is None or epoch < self.epochs:
            position = -1
            for position, raw in enumerate(self.raw_samples(gid, world, epoch)):
                if position < start:
                    continue
                sample = self._decode(raw, seed=(self.seed, epoch, gid, position))
                if sample is not None:
                    sample["state"] = (gid, world, epoch, position + 1)
                    yield sample
            if position < 0:
                raise HomediffError(f"worker {gid} of {world} found no samples in its shards "
                                    f"({len(self.shards)} shards); run `homediff data check`")
            epoch, start = epoch + 1, 0

    def _decode(self, raw: dict, seed: tuple) -> dict | None:
        key = raw.get("path", b"").decode(errors="replace") or raw["__key__"]
        label = f"{raw['__url__']}:{key}"
        generator = torch.Generator().manual_seed(sample_seed(*seed))
        try:
            image = next((raw[m] for m in IMAGE_MEMBERS if m in raw), None)
            if image is None:
                raise BadSample("no-image", f"no image member ({', '.join(IMAGE_MEMBERS)})")
            sample, notes = make_sample(image, raw.get("txt"), label, self.config, generator)
        except BadSample as bad:
            self.problems.note(label, bad.kind, bad.detail, skipped=True)
            self._pending.append(bad.kind)
            return None
        for kind, detail in notes:
            self.problems.note(label, kind, detail)
        sample["problems"] = self._pending + [kind for kind, _ in notes]
        self._pending = []
        return sample


class ShardProgress:
    """Where each global worker's stream stands, from the batches the training loop consumed.

    Call ``update(batch)`` for every batch used; save ``state_dict()``; give it to
    ``ShardDataset.load_state_dict`` to continue after the last batch used. Each rank keeps its own.
    """

    def __init__(self):
        self.world: int | None = None
        self.positions: dict[str, list[int]] = {}

    def update(self, batch: dict) -> None:
        gid, world, epoch, position = batch["state"]
        self.world = int(world)
        self.positions[str(int(gid))] = [int(epoch), int(position)]

    def state_dict(self) -> dict:
        return {"world": self.world, "positions": dict(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        """Continue tracking from a saved state (so a second interruption resumes correctly)."""
        self.world = state.get("world")
        self.positions = {str(gid): list(pos) for gid, pos in state.get("positions", {}).items()}


def pack_folder(root: str | Path, out: str | Path, shard_size: int = 1000, seed: int = 0,
                cache: bool | str | Path = True) -> tuple[list[Path], int]:
    """Write a folder dataset as shuffled tar shards ``OUT/shard-000000.tar`` of ``shard_size``
    samples; the bytes are copied unchanged. Returns (shard paths, samples written).

    Repeat folders (``N_name``) are not expanded: each image is written once.
    """
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be a positive number of samples, got {shard_size}")
    tar_writer = require("webdataset.writer", "data", "webdataset").TarWriter
    root, out = Path(root), Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise HomediffError(f"{out}: not empty; pack into a new folder (shards already there would "
                            "be read as part of the data set)")
    entries = scan_folder(root, cache)
    if not entries:
        raise HomediffError(f"{root}: no images to pack")
    out.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist()
    paths, written = [], 0
    bar = progress(f"packing {root}", len(order), "image")
    for start in range(0, len(order), shard_size):
        path = out / f"shard-{len(paths):06d}.tar"
        with tar_writer(str(path), encoder=False, mtime=0) as writer:
            for index in order[start:start + shard_size]:
                entry = entries[index]
                try:
                    sample = {"__key__": f"{index:09d}", "path": entry.image.encode(),
                              os.path.splitext(entry.image)[1][1:].lower():
                                  (root / entry.image).read_bytes()}
                    if entry.caption:
                        sample["txt"] = (root / entry.caption).read_bytes()
                except OSError as err:
                    logger.warning("%s: skipped, cannot read it (%s)", root / entry.image, err)
                    continue
                writer.write(sample)
                written += 1
                bar.update()
        paths.append(path)
    bar.close()
    return paths, written
