"""The training loop's view of the data: one resumable stream of batches per stage.

Folder datasets resume at (epoch, sample): the sampler's order is a function of the seed and the
epoch, so dealing on from the samples all processes together have taken continues with the
samples the interrupted run would have taken next, in as many processes or another number. A
folder smaller than a batch of every process (twenty images of a concept, say) fills each batch
from the next shuffled epochs. Shard datasets resume at each loader worker's stream position.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterator

from homediff.data import FolderDataset, ShardDataset, ShardProgress, make_loader
from homediff.data.folder import missing_captions
from homediff.data.loader import distributed_rank
from homediff.data.shards import dataset_kind
from homediff.errors import ConfigError
from homediff.training.config import DatasetSection

logger = logging.getLogger(__name__)


class BatchStream:
    """Batches of ``batch_size`` crops at ``resolution`` for one stage."""

    def __init__(self, section: DatasetSection, resolution: int, batch_size: int, seed: int,
                 pin_memory: bool = False):
        if not section.path:
            raise ConfigError("dataset.path is empty: point it at an image folder or tar shards "
                              "(`homediff data emoji data/emoji` builds the built-in set)")
        self.kind = dataset_kind(section.path, section.kind)
        if self.kind == "folder" and not Path(section.path).is_dir():
            raise ConfigError(f"dataset.path {section.path} is not a folder")
        options = dataclasses.replace(section.options, size=resolution)
        if self.kind == "folder":
            self.dataset = FolderDataset(section.path, options, seed=seed)
            problem = missing_captions(self.dataset.entries, options)
            if problem:  # most likely the wrong caption_extension: stop before training on nothing
                raise ConfigError(f"dataset.path {section.path}: {problem}")
        else:
            self.dataset = ShardDataset(section.path, options, seed=seed)
        self.section, self.batch_size, self.seed = section, batch_size, seed
        self.pin_memory = pin_memory  # page-locked batches copy to a GPU without blocking
        self.shard_progress = ShardProgress()
        self.loader = None
        processes = distributed_rank()[1]
        if self.kind == "folder" and len(self.dataset) < batch_size * processes:
            logger.warning("dataset.path %s: an epoch of %d samples is smaller than a batch of %d "
                           "(batch_size %d × %d process%s): each batch goes on into the next shuffled "
                           "epoch, and a stage given in epochs counts one batch an epoch", section.path,
                           len(self.dataset), batch_size * processes, batch_size, processes,
                           "es" if processes > 1 else "")

    def __len__(self) -> int:
        """Batches per epoch of this rank (folder datasets only), at least one: a folder smaller
        than a batch of every process fills its batch from the next epochs."""
        if self.kind != "folder":
            raise ConfigError("a stage over tar shards must give `steps`, not `epochs`")
        return max(1, len(self.dataset) // self.batch_size // distributed_rank()[1])

    def _make_loader(self):
        return make_loader(self.dataset, self.batch_size, workers=self.section.workers, seed=self.seed,
                           pin_memory=self.pin_memory)

    def epoch(self, epoch: int, start: int):
        """Batches of one epoch from its sample ``start`` on, counted over all processes (shards:
        the stream from where it stood)."""
        if self.loader is None:
            self.loader = self._make_loader()
        if self.kind == "folder":
            self.loader.sampler.set_epoch(epoch, start=start)
        for batch in self.loader:
            if self.kind == "shards":
                self.shard_progress.update(batch)
            yield batch

    def close(self) -> None:
        """Stop the loader's worker processes now: persistent workers live as long as their loader,
        which a compiled model's references can keep past the run, and a worker still running at
        exit keeps the process waiting for it."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader = None

    def state_dict(self) -> dict | None:
        return self.shard_progress.state_dict() if self.kind == "shards" else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.kind == "shards" and state:
            self.dataset.load_state_dict(state)
            self.shard_progress.positions.update(state["positions"])


def step_batches(stream: BatchStream, progress, accumulate: int, processes: int, waiting,
                 seen: Callable[[dict], None]) -> Iterator[list[dict]]:
    """The micro-batches of each optimiser step, epoch after epoch from ``progress``'s position,
    which moves on in samples of all ``processes`` together (a resume in another number of them
    deals on from there). ``waiting(between_steps)`` wraps every wait for a batch (a stop signal
    may end one between steps at once); ``seen`` sees every batch as it arrives."""
    group, taken = [], stream.batch_size * processes
    folder_size = len(stream.dataset) if stream.kind == "folder" else None
    while True:
        epoch, start, count = progress.epoch, progress.samples, 0
        batches = stream.epoch(epoch, start)
        while True:
            with waiting(not group):
                batch = next(batches, None)
            if batch is None:
                break
            seen(batch)
            progress.advance(taken, folder_size)
            count += 1
            group.append(batch)
            if len(group) == accumulate:
                yield group
                group = []
        if not count and not start:
            raise ConfigError(f"{stream.section.path}: an epoch gave no batch (fewer usable images "
                              "than the batch size?)")
        if progress.epoch == epoch:  # the epoch's rest, too few for a batch, is left out
            progress.epoch, progress.samples = epoch + 1, 0
