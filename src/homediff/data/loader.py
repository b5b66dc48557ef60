"""Batches: collate, the epoch sampler and the DataLoader factory."""

from __future__ import annotations

import os
import random
import signal
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from homediff.errors import ConfigError, HomediffError


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; in a loader worker, straight into shared memory (saves a copy on the way)."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)
    out = first.new(storage).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch.

    image (B, 3, H, W) in [−1, 1]; pos (B, H·W, 2) (y, x); aspect (B,) = ln(W/H) of the full images;
    caption and key: lists; problems: counts of the skips and fixes behind this batch; state: the
    stream position after this batch (shard datasets only).
    """
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise HomediffError(f"images in one batch differ in size {sorted(shapes)}: crop mode "
                            "'none' needs batch size 1 or images of one aspect ratio")
    problems: Counter[str] = Counter()
    for sample in samples:
        problems.update(sample.get("problems", ()))
    batch = {
        "image": _stack([s["image"] for s in samples]),
        "pos": _stack([s["pos"] for s in samples]),
        "aspect": torch.tensor([s["aspect"] for s in samples], dtype=torch.float32),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "problems": dict(problems),
    }
    if "state" in samples[-1]:
        batch["state"] = samples[-1]["state"]
    return batch


def distributed_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's, else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size} processes")
    return rank, world_size


class EpochSampler(Sampler[int]):
    """Indices of a map-style dataset, a new permutation each epoch, dealt out to the ranks.

    Yields ``epoch · n + i`` so that the dataset (even in persistent workers) knows the epoch and
    draws fresh crops. Rank r takes positions start + r, start + r + world_size, … of the epoch's
    order, as many as every other rank, so that the ranks' first k batches of b together are the
    k · b · world_size positions from ``start`` on. The order depends only on (seed, epoch), so
    ``set_epoch(epoch, start)`` resumes inside an epoch, with this number of ranks or another.

    With ``batch_size``, an epoch too small to give every rank a batch (n < batch_size ·
    world_size) gives one batch per rank instead, dealt the same way from the epochs' orders laid
    end to end (position ``start`` of epoch e is position e · n + start there), as a small folder
    repeated would; the next pass goes on from where it ended.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, epoch: int = 0, batch_size: int | None = None):
        self.n, self.seed, self.shuffle, self.epoch, self.start = n, seed, shuffle, epoch, 0
        self.rank, self.world_size = distributed_rank(rank, world_size)
        self.fill = batch_size if batch_size and n < batch_size * self.world_size else 0
        if n < 1 or (n < self.world_size and not self.fill):
            raise ConfigError(f"{n} samples cannot be split across {self.world_size} ranks")

    def __len__(self) -> int:
        """Indices the next pass yields on this rank."""
        return self.fill or (self.n - self.start) // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next pass epoch ``epoch`` from position ``start`` of its order on: the samples
        that every rank together has taken, however many ranks there were."""
        if not 0 <= start <= self.n:
            raise ConfigError(f"cannot start at sample {start} of an epoch of {self.n}: the "
                              "dataset has fewer images than the run that saved this position")
        self.epoch, self.start = epoch, start

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch))

    def __iter__(self):
        first = self.epoch * self.n + self.start  # positions in the epochs laid end to end
        positions = torch.arange(len(self)) * self.world_size + first + self.rank
        epochs = positions // self.n
        indices = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mine = epochs == epoch
            indices[mine] = self._order(epoch)[positions[mine] % self.n] + epoch * self.n
        if self.fill:
            self.epoch, self.start = divmod(first + self.fill * self.world_size, self.n)
        else:
            self.epoch, self.start = self.epoch + 1, 0
        return iter(indices.tolist())


def init_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators from the worker's torch seed (set per worker), and
    leave Ctrl-C and SIGTERM to the main process, which finishes its step and checkpoints first."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, workers: int = 2, seed: int = 0, shuffle: bool = True,
                persistent_workers: bool = True, drop_last: bool = True, pin_memory: bool = False,
                prefetch_factor: int | None = None, rank: int | None = None,
                world_size: int | None = None) -> DataLoader:
    """A DataLoader over a folder or shard dataset.

    Map-style datasets get an ``EpochSampler`` (seeded shuffle, split across ranks, batches filled
    from the next epochs where one epoch is smaller than a batch of every rank); shard datasets
    split themselves. Workers each get their own seed; batches are always full (``drop_last``).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = EpochSampler(len(dataset), seed, shuffle, rank, world_size, batch_size=batch_size)
    options = {}
    if workers > 0:
        options.update(persistent_workers=persistent_workers, worker_init_fn=init_worker,
                       prefetch_factor=prefetch_factor)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), **options)
