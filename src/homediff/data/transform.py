"""One sample from raw bytes: decode, crop, flip and caption, following the bad-input policy."""

from __future__ import annotations

import hashlib

import torch

from homediff.data.captions import decode_caption, process_caption
from homediff.data.crop import shifted_square_crop
from homediff.data.images import Image, decode_image
from homediff.data.options import MAX_CAPTION_BYTES, DataConfig
from homediff.data.problems import BadSample, Note


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (base seed, epoch, index ...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def hflip(image: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a (3, H, W) crop and its (H·W, 2) position map.

    The mirrored crop is the window of the mirrored full image, whose grid is the same canonical
    grid: columns are reversed and x is negated, so x still increases to the right.
    """
    height, width = image.shape[-2:]
    grid = pos.view(height, width, 2).flip(1)
    grid = grid * grid.new_tensor([1.0, -1.0])
    return image.flip(-1), grid.reshape(-1, 2)


def load(image_bytes: bytes, caption_bytes: bytes | None, config: DataConfig, notes: list[Note],
         size: int | None = None) -> tuple[Image.Image, str]:
    """Decode an image and its caption, checking them against the config; raises BadSample.

    ``size``: the crop size, or None to skip the "upscaled" check (and decode JPEGs at full size).
    """
    draft = max(size, config.min_size) if size else None
    if len(image_bytes) > config.max_file_bytes:
        raise BadSample("file-too-big", f"over {config.max_file_bytes:,} bytes (raise max_file_bytes "
                                        "to allow it)")
    if caption_bytes is not None and len(caption_bytes) > MAX_CAPTION_BYTES:
        raise BadSample("file-too-big", f"a caption over {MAX_CAPTION_BYTES:,} bytes")
    image = decode_image(image_bytes, notes, config.max_pixels, draft, config.max_aspect)
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
