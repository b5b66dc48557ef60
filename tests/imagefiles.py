"""Real image files for the data and datasets tests, made on the spot."""

from __future__ import annotations

import numpy as np
from PIL import Image


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB test pattern (uint8, H × W × 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * x + 4 * y + phase) for phase in rng.uniform(0, 6, 3)]
    return ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)


def save_image(path, height: int = 32, width: int = 48, seed: int = 0, caption: str | None = None,
               **options):
    """Write a pattern image (format from the extension) and, if given, its .txt caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern(height, width, seed)).save(path, **options)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path
