"""An optional disk cache of text-encoder states and autoencoder moments, in safetensors shards.

Entries are keyed by a hash of what determines them (the caption and the text length; the image
file, the crop window and the resolution) and stored in float16. New entries collect in memory and
go to disk as a new shard every ``shard_size`` entries; ``index.json`` lists which shard holds
which key, so a later run (or a resumed one) finds them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def cache_key(*parts) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


class DiskCache:
    def __init__(self, folder: str | Path, shard_size: int = 2048):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        index = self.folder / "index.json"
        self.index: dict[str, str] = json.loads(index.read_text()) if index.is_file() else {}
        self.pending: dict[str, torch.Tensor] = {}
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.index) + len(self.pending)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.pending:
            return self.pending[key]
        shard = self.index.get(key)
        if shard is None:
            return None
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._open[shard].get_tensor(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.pending[key] = value.detach().to("cpu", torch.float16).contiguous()
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as a new shard, then the index (each atomically)."""
        if not self.pending:
            return
        name = f"shard-{len(list(self.folder.glob('shard-*.safetensors'))):06d}.safetensors"
        save_file(self.pending, str(self.folder / f"{name}.tmp"))
        os.replace(self.folder / f"{name}.tmp", self.folder / name)
        self.index.update(dict.fromkeys(self.pending, name))
        (self.folder / "index.json.tmp").write_text(json.dumps(self.index))
        os.replace(self.folder / "index.json.tmp", self.folder / "index.json")
        self.pending = {}


def cached_rows(cache: DiskCache, keys: list[str], compute) -> torch.Tensor:
    """Stack the rows for ``keys``, computing the missing ones with ``compute(indices)`` (which
    returns their rows in that order) and storing them."""
    rows = [cache.get(k) for k in keys]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        for i, row in zip(missing, compute(missing)):
            cache.put(keys[i], row)
            rows[i] = cache.get(keys[i])
    return torch.stack(rows)
