"""Shifted square crop (hdm-spec §3): a square window of an image, with its window of the position
map.

The image is resized so its short side is ``size`` (long side ``round(size·long/short)``), with
Pillow's antialiased bicubic filter. A ``size × size`` window is taken along the long side: at a
uniformly random offset in ``[0, long − size]`` (every offset, the last included), or centred.
The window's position map is cut from the canonical grid of the whole resized image
(``homediff.geometry``), so the model sees where in the full picture the crop lies. "squash", the
naive baseline, resizes the whole image to ``size × size`` and gives it the square's grid.

Conventions: image (3, H, W) float in [−1, 1]; position map (H·W, 2) as (y, x), row-major;
aspect = ln(W/H) of the whole resized image (positive for landscape, 0 for square).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from homediff.data.images import Image
from homediff.data.options import CROP_MODES
from homediff.errors import ConfigError
from homediff.geometry import crop_window


class Crop(NamedTuple):
    image: torch.Tensor  # (3, H, W) in [−1, 1]
    pos: torch.Tensor  # (H·W, 2), (y, x)
    aspect: float  # ln(W/H) of the whole resized image


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) after resizing the short side to ``size``; the long side is rounded, never < size."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def crop_offset(length: int, size: int, mode: str, generator: torch.Generator | None) -> int:
    """Offset of a ``size`` window along a side of ``length``: uniform over [0, length − size]."""
    if mode == "center":
        return (length - size) // 2
    return int(torch.randint(0, length - size + 1, (1,), generator=generator))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB Pillow image → (3, H, W) float32 in [−1, 1]."""
    array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def shifted_square_crop(image: Image.Image, size: int, mode: str = "random",
                        generator: torch.Generator | None = None) -> Crop:
    """Resize the short side of an RGB image to ``size`` and crop (see the module docstring).

    ``mode``: "random" (shifted square crop), "center", "squash" (the whole image resized to the
    square, with the square's grid and the original aspect), or "none" (the whole resized image).
    """
    if mode not in CROP_MODES:
        raise ConfigError(f"unknown crop mode {mode!r}: use one of {', '.join(CROP_MODES)}")
    if size < 1:
        raise ConfigError(f"crop size must be positive, got {size}")
    if mode == "squash":
        window = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return Crop(to_tensor(window), crop_window(size, size, 0, 0, size, size),
                    math.log(image.width / image.height))
    full_h, full_w = resized_size(image.height, image.width, size)
    top = left = 0
    crop_h, crop_w = (full_h, full_w) if mode == "none" else (size, size)
    if full_h > crop_h:
        top = crop_offset(full_h, crop_h, mode, generator)
    elif full_w > crop_w:
        left = crop_offset(full_w, crop_w, mode, generator)
    # Resizing only the window's source box gives the same pixels as resizing the whole image and
    # cropping (Pillow filters with the neighbours outside the box), for less work.
    sy, sx = image.height / full_h, image.width / full_w
    box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
    if (crop_w, crop_h) == image.size and box == (0, 0, image.width, image.height):
        window = image
    else:
        window = image.resize((crop_w, crop_h), Image.Resampling.BICUBIC, box=box,
                              reducing_gap=3.0)
    pos = crop_window(full_h, full_w, top, left, crop_h, crop_w)
    return Crop(to_tensor(window), pos, math.log(full_w / full_h))
