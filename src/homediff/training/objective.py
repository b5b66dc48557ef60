"""The training loss: a pure function of a batch, the components and a random generator.

    loss = training_loss(batch, components, LossSettings.of(config, stage, autocast), generator)

A data batch (crops in [−1, 1], their pixel position maps, captions) becomes latents and text
states (through the disk caches when the run keeps them), then the rectified-flow loss of the
backbone's velocity at logit-normal times (``flow``), with a random share of image tokens routed
past the middle blocks (TREAD). Every random draw (latent sample, times, noise, routing) comes
from ``generator``, which also names the device the step runs on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from homediff.caching import cache_key, cached_rows
from homediff.diffusion import flow

if TYPE_CHECKING:
    from homediff.training.components import Components
    from homediff.training.config import StageConfig, TrainConfig


@dataclass(frozen=True)
class LossSettings:
    time_mean: float = 0.0  # times t = sigmoid(mean + std·N(0, 1))
    time_std: float = 1.0
    time_shift_base: int = 0  # > 0: times shifted towards noise by √(H·W)/base
    contrastive_weight: float = 0.0
    tread_rate: float = 0.0
    align_weight: float = 0.0  # the representation alignment's λ (``training.alignment``)
    autocast: torch.dtype | None = None  # None: no autocast

    @classmethod
    def of(cls, config: TrainConfig, stage: StageConfig, autocast: torch.dtype | None) -> "LossSettings":
        train = config.train
        return cls(train.time_mean, train.time_std, train.time_shift_base, train.contrastive_weight,
                   stage.tread_rate, train.align_weight, autocast)


def flow_matching_loss(model, x0: torch.Tensor, ctx: torch.Tensor, settings: LossSettings,
                       generator: torch.Generator, *, pos: torch.Tensor | None = None,
                       aspect: torch.Tensor | None = None, shift: float = 1.0,
                       features: list | None = None) -> torch.Tensor:
    """The rectified-flow loss of ``model`` on clean latents ``x0`` with text states ``ctx``,
    its times shifted by ``shift``; ``features`` gets the model's middle tokens (``XUT``)."""
    device = generator.device
    t = flow.sample_time(x0.shape[0], mean=settings.time_mean, std=settings.time_std,
                         generator=generator, device=device, shift=shift)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    dtype = settings.autocast  # None leaves autocast as the caller set it
    with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        prediction = model(flow.add_noise(x0, noise, t), t, ctx.to(device, torch.float32), pos_map=pos,
                           aspect=aspect, tread_rate=settings.tread_rate, generator=generator,
                           **({"features": features} if features is not None else {}))
    return flow.flow_loss(prediction, x0, noise, settings.contrastive_weight)


def training_loss(batch: dict, parts: Components, settings: LossSettings,
                  generator: torch.Generator) -> torch.Tensor:
    """The loss of one data batch (see the module's docstring)."""
    device = generator.device
    images = batch["image"].to(device, non_blocking=True)
    pos = batch["pos"].to(device, non_blocking=True)
    with torch.no_grad():
        x0 = parts.autoencoder.latents_from(_moments(parts, images, pos, batch["key"]), generator)
        ctx = _text_states(parts, batch["caption"])
    base = settings.time_shift_base  # the shift follows the image's size in pixels
    features = [] if parts.aligner else None
    loss = flow_matching_loss(parts.model, x0, ctx, settings, generator,
                              pos=latent_positions(pos, images.shape[-1], images.shape[-1] // x0.shape[-1]),
                              aspect=batch["aspect"].to(device),
                              shift=flow.resolution_shift(*images.shape[-2:], base) if base else 1.0,
                              features=features)
    if parts.aligner:
        loss = loss + settings.align_weight * parts.aligner.loss(features[0], images, pos, batch["key"])
    return loss


def latent_positions(pos: torch.Tensor, side: int, factor: int) -> torch.Tensor:
    """A square crop's pixel position map (B, side², 2) averaged over each ``factor``² latent cell."""
    if factor == 1:
        return pos
    grid = pos.transpose(1, 2).reshape(-1, 2, side, side)
    return F.avg_pool2d(grid, factor).flatten(2).transpose(1, 2)


def _moments(parts: Components, images: torch.Tensor, pos: torch.Tensor, keys: list[str]) -> torch.Tensor:
    cache = parts.caches.get("latents")
    if cache is None:
        return parts.autoencoder.moments(images)
    keys = [cache_key("latents", k, images.shape[-1], p[0].tolist(), p[-1].tolist())
            for k, p in zip(keys, pos)]
    rows = cached_rows(cache, keys, lambda idx: parts.autoencoder.moments(images[idx]))
    return rows.to(images.device, torch.float32)


def _text_states(parts: Components, captions: list[str]) -> torch.Tensor:
    encoder = parts.text_encoder
    cache = parts.caches.get("text")
    if cache is None:
        return encoder.encode(captions)
    keys = [cache_key("text", c, encoder.config.max_length, encoder.source) for c in captions]
    rows = cached_rows(cache, keys, lambda idx: encoder.encode([captions[i] for i in idx]))
    return rows.to(encoder.device, encoder.model.dtype)
