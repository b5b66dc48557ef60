"""The held-out validation loss: the training loss on images never trained on, with fixed draws.

    held = held_out_batches(config.dataset, resolution=32, batch_size=32, training=stream)
    loss = validation_loss(model, held, parts, settings, device)

The images come from ``dataset.val_path``, a folder apart from the training data (the emoji and
shapes sets build one: ``heldout/``); ``val_images`` of them, evenly spaced in path order, are
read once per stage, centre-cropped at the stage's resolution with their captions as written (no
dropout, no shuffled tags). Each batch's flow times, noise and latent sample come from a generator
seeded with ``VAL_SEED`` and the batch's index, and no tokens are routed, so the number depends on
the weights alone: it compares across steps, resumes and runs of one config.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from homediff.data import FolderDataset
from homediff.data.loader import collate
from homediff.errors import ConfigError
from homediff.training.components import Components
from homediff.training.config import DatasetSection
from homediff.training.objective import LossSettings, training_loss

VAL_SEED = 20_250_101


def stage_held_out(config, stage, stream, say, weights: str) -> list[dict] | None:
    """A stage's validation batches when ``dataset.val_path`` names a folder (None otherwise),
    with a line through ``say`` on what will be scored (``weights``: "EMA" or "trained")."""
    section = config.dataset
    if not section.val_path:
        return None
    held = held_out_batches(section, stage.resolution, stage.batch_size, stream)
    say(f"held-out loss of the {weights} weights every {config.train.val_every} steps on "
        f"{sum(len(b['key']) for b in held)} images of {section.val_path}")
    return held


def held_out_batches(section: DatasetSection, resolution: int, batch_size: int,
                     training=None) -> list[dict]:
    """The validation batches of ``section.val_path`` at ``resolution`` (see the module's
    docstring). ``training``, a stage's ``BatchStream`` over a folder, must share no image file
    with them."""
    options = section.options
    captions = dataclasses.replace(options.captions, caption_dropout=0.0, tag_dropout=0.0,
                                   group_dropout=0.0, shuffle_tags=False, shuffle_groups=False)
    options = dataclasses.replace(options, size=resolution, crop="center", flip=0.0, captions=captions)
    if not os.path.isdir(section.val_path):
        raise ConfigError(f"dataset.val_path {section.val_path} is not a folder: give a folder of "
                          "held-out images with captions, or \"\" for no validation loss")
    dataset = FolderDataset(section.val_path, options)
    if training is not None and training.kind == "folder":
        _refuse_shared_files(dataset, training.dataset)
    count = min(section.val_images, len(dataset))
    samples = [dataset[(2 * i + 1) * len(dataset) // (2 * count)] for i in range(count)]  # centres
    return [collate(samples[i:i + batch_size]) for i in range(0, count, batch_size)]


def _refuse_shared_files(held: FolderDataset, training: FolderDataset) -> None:
    """A held-out image must not be trained on: no file may be in both folders."""
    trained = {os.path.realpath(training.root / entry.image) for entry in training.entries}
    shared = [entry.image for entry in held.entries
              if os.path.realpath(held.root / entry.image) in trained]
    if shared:
        raise ConfigError(f"dataset.val_path {held.root} shares {len(shared)} images with "
                          f"dataset.path (e.g. {shared[0]}): held-out images must not be trained "
                          "on; give a folder outside dataset.path")


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[dict], parts: Components,
                    settings: LossSettings, device: torch.device) -> float:
    """The mean loss of ``model`` over the held-out ``batches`` (weighted by their sizes), with
    the training loss's settings but neither routing nor the contrastive term."""
    settings = dataclasses.replace(settings, tread_rate=0.0, contrastive_weight=0.0)
    parts = dataclasses.replace(parts, model=model, caches={})
    total, count = 0.0, 0
    for index, batch in enumerate(batches):
        generator = torch.Generator(device).manual_seed(VAL_SEED + index)
        size = len(batch["key"])
        total += training_loss(batch, parts, settings, generator).item() * size
        count += size
    return total / count
