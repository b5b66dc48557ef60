"""Autoencoders: images (B, 3, H, W) in [−1, 1] ⇄ normalised latents (B, C, H/f, W/f).

Two kinds behind one interface (``encode``, ``decode``, ``channels``, ``factor``, ``save_pretrained``):

* ``PixelAutoencoder``: the identity on pixels, with an optional pixel-unshuffle by ``factor``
  (a 3-channel image becomes 3·f² channels at 1/f the size); no weights, for small models.
* ``KLAutoencoder``: a diffusers ``AutoencoderKL`` whose latents z are normalised per channel,
  z_n = (z − mean) / std. mean/std come from the VAE config's ``latents_mean``/``latents_std`` (HDM's
  EQ-SDXL VAE) or else from its ``scaling_factor``/``shift_factor`` (mean = shift, std = 1/scale).

``load_autoencoder(spec)`` opens ``"pixel"``, a folder written by ``save_pretrained``, or any
diffusers AutoencoderKL folder or hub id.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from homediff import hub
from homediff.errors import CheckpointError, ConfigError, check_keys
from homediff.extras import require

logger = logging.getLogger(__name__)

CONFIG_NAME = "autoencoder.json"


def _diffusers():
    return require("diffusers", "diffusers")


class Autoencoder(nn.Module):
    """The interface: ``channels`` latent channels, ``factor`` pixels per latent cell per side."""

    channels: int
    factor: int
    image_channels: int = 3

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of images in [−1, 1]: drawn from ``moments`` (which a cache may keep)."""
        return self.latents_from(self.moments(images), generator)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """What encoding determines (the posterior's parameters): deterministic, cacheable."""
        raise NotImplementedError

    def latents_from(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> None:
        raise NotImplementedError


class PixelAutoencoder(Autoencoder):
    """Pixels as latents, optionally pixel-unshuffled by ``factor``."""

    def __init__(self, factor: int = 1, image_channels: int = 3):
        super().__init__()
        if factor < 1 or image_channels < 1:
            raise ConfigError(f"pixel autoencoder factor and image_channels must be positive, got "
                              f"{factor} and {image_channels}")
        self.factor, self.image_channels = factor, image_channels
        self.channels = image_channels * factor**2

    def moments(self, images):
        return F.pixel_unshuffle(images.float(), self.factor)

    def latents_from(self, moments, generator=None):
        return moments.float()

    def decode(self, latents):
        return F.pixel_shuffle(latents.float(), self.factor)

    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        record = {"type": "pixel", "factor": self.factor, "image_channels": self.image_channels}
        Path(directory, CONFIG_NAME).write_text(json.dumps(record, indent=1))


class KLAutoencoder(Autoencoder):
    """A diffusers AutoencoderKL with per-channel latent normalisation; frozen, batched.

    ``sample``: encode draws from the posterior (as HDM trained) rather than taking its mode.
    """

    def __init__(self, vae, mean=None, std=None, *, sample: bool = True, batch_size: int = 4):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.channels = config.latent_channels
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.image_channels = config.in_channels
        default_mean, default_std = self.default_normalisation(config)
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() not in (1, self.channels) or std.numel() not in (1, self.channels):
            raise ConfigError(f"latent mean/std need 1 or {self.channels} values, got "
                              f"{mean.numel()} and {std.numel()}")
        # float32 whatever the VAE's dtype (not buffers, so that .to(dtype) leaves them alone)
        self.mean = mean.expand(self.channels).reshape(1, -1, 1, 1).clone()
        self.std = std.expand(self.channels).reshape(1, -1, 1, 1).clone()
        self.sample, self.batch_size = sample, batch_size

    @staticmethod
    def default_normalisation(config) -> tuple[list[float], list[float]]:
        """mean/std from latents_mean/latents_std, else from scaling_factor/shift_factor."""
        if getattr(config, "latents_mean", None) is not None:
            return list(config.latents_mean), list(config.latents_std)
        scale = getattr(config, "scaling_factor", None) or 1.0
        return [getattr(config, "shift_factor", None) or 0.0], [1.0 / scale]

    @classmethod
    def from_pretrained(cls, name_or_path: str, **options) -> "KLAutoencoder":
        """An AutoencoderKL folder or hub id; options: mean, std, sample, batch_size."""
        check_keys(cls, options, f"autoencoder {name_or_path}")
        diffusers = _diffusers()
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(str(hub.resolve(name_or_path, "VAE")))
        except (OSError, ValueError, CheckpointError) as err:
            raise CheckpointError(f"cannot load the VAE {name_or_path!r}: {err}\nGive a local "
                                  "diffusers AutoencoderKL folder or a reachable hub id") from err
        return cls(vae, **options)

    @classmethod
    def from_weights(cls, config_source: str, state: dict[str, torch.Tensor],
                     **options) -> "KLAutoencoder":
        """An AutoencoderKL built from the config at ``config_source`` holding the tensors ``state``."""
        diffusers = _diffusers()
        try:
            config = diffusers.AutoencoderKL.load_config(str(hub.resolve(config_source, "VAE")))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read the VAE config of {config_source!r}: {err}") from err
        vae = diffusers.AutoencoderKL.from_config(config)
        result = vae.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"the VAE weights do not fit the config of {config_source!r}: "
                                  f"missing {result.missing_keys[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")
        return cls(vae, **options)

    def save_pretrained(self, directory):
        self.vae.save_pretrained(str(directory))
        record = {"type": "diffusers-kl", "mean": self.mean.flatten().tolist(),
                  "std": self.std.flatten().tolist(), "sample": self.sample,
                  "batch_size": self.batch_size}
        Path(directory, CONFIG_NAME).write_text(json.dumps(record, indent=1))

    @torch.no_grad()
    def moments(self, images):
        """The posterior's mean and log-variance, concatenated on channels."""
        dtype = self.vae.dtype
        return torch.cat([self.vae.encode(chunk.to(dtype)).latent_dist.parameters
                          for chunk in images.split(self.batch_size)])

    @torch.no_grad()
    def latents_from(self, moments, generator=None):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = []
        for chunk in moments.split(self.batch_size):
            posterior = DiagonalGaussianDistribution(chunk.to(self.vae.dtype))
            z = posterior.sample(generator) if self.sample else posterior.mode()
            latents.append((z.float() - self.mean.to(z.device)) / self.std.to(z.device))
        return torch.cat(latents)

    @torch.no_grad()
    def decode(self, latents):
        with self._upcast():
            dtype = self.vae.dtype
            images = []
            for z in latents.split(self.batch_size):
                z = z.float() * self.std.to(z.device) + self.mean.to(z.device)
                images.append(self.vae.decode(z.to(dtype)).sample.float())
        return torch.cat(images)

    @contextlib.contextmanager
    def _upcast(self):
        """diffusers' ``force_upcast``: a float16 VAE whose config asks for it decodes in float32
        (the SDXL-family VAEs overflow in float16) and returns to float16 afterwards."""
        if self.vae.dtype != torch.float16 or not getattr(self.vae.config, "force_upcast", False):
            yield
            return
        self.vae.to(torch.float32)
        try:
            yield
        finally:
            self.vae.to(torch.float16)


def load_autoencoder(spec: str | Path, **options) -> Autoencoder:
    """``"pixel"`` (options: factor, image_channels), a ``save_pretrained`` folder, or a diffusers
    AutoencoderKL folder or hub id (options: mean, std, sample, batch_size)."""
    if str(spec) == "pixel":
        return PixelAutoencoder(**check_keys(PixelAutoencoder, options, "pixel autoencoder"))
    if hub.is_hub_id(str(spec)) and not Path(spec).exists():
        spec = hub.resolve(spec, "autoencoder")
    saved = Path(spec, CONFIG_NAME)
    if saved.is_file():
        try:
            record = json.loads(saved.read_text(encoding="utf-8"))
            kind = record.pop("type")
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{saved}: not a readable autoencoder record ({err!r})") from err
        if kind == "pixel":
            return PixelAutoencoder(**check_keys(PixelAutoencoder, {**record, **options}, str(saved)))
        if kind == "diffusers-kl":
            return KLAutoencoder.from_pretrained(spec, **{**record, **options})
        raise ConfigError(f"{saved}: unknown autoencoder type {kind!r} "
                          "(expected 'pixel' or 'diffusers-kl')")
    return KLAutoencoder.from_pretrained(spec, **options)
