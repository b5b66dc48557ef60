"""Caches: one key scheme and one interface (``get`` a value or None, ``put`` one, ``flush``).

Every cache is keyed by ``cache_key(*parts)``, a hash of everything that determines the value
(a caption and its token length; an image file, its crop and resolution; a folder's path). Three
stores implement the interface:

- ``MemoryCache``: the newest ``capacity`` values in memory (the text encoder's prompt states);
- ``FileCache``: one file per key in a folder, for a few large values (a data folder's index,
  the reference features of an evaluation), under ``user_cache_dir`` by default;
- ``TensorShards``: many small tensors in safetensors shards with an index (the training caches of
  text states and latents, millions of entries on a large data set).

A disk cache is an optimisation: an unreadable entry reads as a miss and a folder that cannot be
written is skipped with a log line, never a failed run. Writes are atomic (temporary file, rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from homediff.atomic import write_atomically

logger = logging.getLogger(__name__)


def cache_key(*parts) -> str:
    """The key of a value determined by ``parts`` (JSON-able values; other objects by ``str``)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def user_cache_dir(kind: str) -> Path:
    """``$XDG_CACHE_HOME/homediff/KIND``, else ``~/.cache/homediff/KIND``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "homediff" / kind


class MemoryCache:
    """The ``capacity`` most recently used values (0: none kept)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.values: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.values)

    def get(self, key: str):
        if key in self.values:
            self.values.move_to_end(key)
        return self.values.get(key)

    def put(self, key: str, value) -> None:
        if self.capacity <= 0:
            return
        self.values[key] = value
        self.values.move_to_end(key)
        while len(self.values) > self.capacity:
            self.values.popitem(last=False)

    def flush(self) -> None:
        """Nothing to write."""

    def clear(self) -> None:
        self.values.clear()


class FileCache:
    """One file ``KEY-PREFIX.SUFFIX`` per value in ``folder``, read by ``load(path)`` and written by
    ``save(value, path)``."""

    def __init__(self, folder: str | Path, suffix: str, load: Callable[[Path], Any],
                 save: Callable[[Any, Path], None]):
        self.folder, self.suffix, self.load, self.save = Path(folder), suffix, load, save

    def path(self, key: str) -> Path:
        return self.folder / f"{key[:32]}{self.suffix}"

    def get(self, key: str):
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return self.load(path)
        except Exception as err:  # a damaged entry is a miss; the next put replaces it
            logger.info("%s: unreadable cache entry, computing it again (%s)", path, err)
            return None

    def put(self, key: str, value) -> None:
        path = self.path(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda temporary: self.save(value, temporary))
        except OSError as err:
            logger.info("%s: cannot write the cache (%s); going on without it", path, err)

    def flush(self) -> None:
        """Every put is written at once."""


def json_file_cache(folder: str | Path) -> FileCache:
    return FileCache(folder, ".json", lambda p: json.loads(p.read_text(encoding="utf-8")),
                     lambda value, p: p.write_text(json.dumps(value, separators=(",", ":")),
                                                   encoding="utf-8"))


def tensor_file_cache(folder: str | Path) -> FileCache:
    from safetensors.torch import load_file, save_file

    return FileCache(folder, ".safetensors", lambda p: load_file(p)["value"],
                     lambda value, p: save_file({"value": value.contiguous().cpu()}, str(p)))


class TensorShards:
    """Small tensors stored in float16, ``shard_size`` to a safetensors shard; ``index.json`` says
    which shard holds which key, so a later or resumed run finds them again. New entries wait in
    memory until a shard is full or ``flush`` is called."""

    def __init__(self, folder: str | Path, shard_size: int = 2048):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        index = self.folder / "index.json"
        self.index: dict[str, str] = json.loads(index.read_text()) if index.is_file() else {}
        self.pending: dict = {}
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.index) + len(self.pending)

    def get(self, key: str):
        if key in self.pending:
            return self.pending[key]
        shard = self.index.get(key)
        if shard is None:
            return None
        if shard not in self._open:
            from safetensors import safe_open

            self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._open[shard].get_tensor(key)

    def put(self, key: str, value) -> None:
        import torch

        self.pending[key] = value.detach().to("cpu", torch.float16).contiguous()
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as a new shard, then the index (each atomically)."""
        if not self.pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(list(self.folder.glob('shard-*.safetensors'))):06d}.safetensors"
        write_atomically(self.folder / name, lambda p: save_file(self.pending, str(p)))
        self.index.update(dict.fromkeys(self.pending, name))
        write_atomically(self.folder / "index.json", lambda p: p.write_text(json.dumps(self.index)))
        self.pending = {}


def cached_rows(cache, keys: list[str], compute):
    """The stacked rows for ``keys``, computing the missing ones with ``compute(indices)`` (which
    returns their rows in that order) and storing them."""
    import torch

    rows = [cache.get(k) for k in keys]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        for i, row in zip(missing, compute(missing)):
            cache.put(keys[i], row)
            stored = cache.get(keys[i])  # as a later hit will read it (float16 in TensorShards)
            rows[i] = row if stored is None else stored
    return torch.stack(rows)
