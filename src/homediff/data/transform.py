"""One sample from raw bytes: decode, crop, flip and caption, following the bad-input policy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from homediff.data.captions import CaptionConfig, decode_caption, process_caption
from homediff.data.crop import CROP_MODES, shifted_square_crop
from homediff.data.images import DEFAULT_MAX_PIXELS, Image, decode_image
from homediff.data.loader import hflip
from homediff.data.problems import BadSample, Note
from homediff.errors import ConfigError

MISSING_CAPTION = ("empty", "skip")


@dataclass
class DataConfig:
    """How images and captions become training samples.

    size: crop side in pixels. crop: "random" (shifted square crop), "center" or "none".
    flip: probability of a horizontal flip. min_size: skip images whose short side is smaller
    (0: upscale every small image). max_pixels: refuse larger images. missing_caption: "empty" (use
    the empty caption) or "skip".
    """

    size: int = 256
    crop: str = "random"
    flip: float = 0.0
    min_size: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    missing_caption: str = "empty"
    captions: CaptionConfig = field(default_factory=CaptionConfig)

    def __post_init__(self):
        if isinstance(self.captions, dict):
            self.captions = CaptionConfig(**self.captions)
        if self.size < 1:
            raise ConfigError(f"data.size must be a positive number of pixels, got {self.size}")
        if self.crop not in CROP_MODES:
            raise ConfigError(
                f"data.crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if not 0.0 <= self.flip <= 1.0:
            raise ConfigError(f"data.flip must be a probability in [0, 1], got {self.flip}")
        if self.missing_caption not in MISSING_CAPTION:
            raise ConfigError(f"data.missing_caption must be 'empty' or 'skip', "
                              f"got {self.missing_caption!r}")


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (base seed, epoch, index ...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def load(image_bytes: bytes, caption_bytes: bytes | None, config: DataConfig, notes: list[Note],
         size: int | None = None) -> tuple[Image.Image, str]:
    """Decode an image and its caption, checking them against the config; raises BadSample.

    ``size``: the crop size, or None to skip the "upscaled" check (and decode JPEGs at full size).
    """
    draft = max(size, config.min_size) if size else None
    image = decode_image(image_bytes, notes, config.max_pixels, draft_short=draft)
    short = min(image.size)
    if short < config.min_size:
        raise BadSample("too-small", f"short side {short} px is under min_size {config.min_size}")
    if size is not None and short < size:
        notes.append(("upscaled", f"short side {short} px upscaled to {size}"))
    if caption_bytes is None:
        if config.missing_caption == "skip":
            raise BadSample("no-caption", "no caption file (missing_caption = 'skip')")
        notes.append(("missing-caption", "no caption file: empty caption"))
        return image, ""
    return image, decode_caption(caption_bytes, notes)


def make_sample(image_bytes: bytes, caption_bytes: bytes | None, key: str, config: DataConfig,
                generator: torch.Generator) -> tuple[dict, list[Note]]:
    """A training sample dict (image, pos, aspect, caption, key) and the fixes applied.

    Raises BadSample when the sample must be skipped. Every random choice uses ``generator``.
    """
    notes: list[Note] = []
    image, caption = load(image_bytes, caption_bytes, config, notes, config.size)
    crop = shifted_square_crop(image, config.size, config.crop, generator)
    pixels, pos = crop.image, crop.pos
    if config.flip and float(torch.rand((), generator=generator)) < config.flip:
        pixels, pos = hflip(pixels, pos)
    sample = {"image": pixels, "pos": pos, "aspect": crop.aspect, "key": key,
              "caption": process_caption(caption, config.captions, generator)}
    return sample, notes
