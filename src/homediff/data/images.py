"""Safe image decoding: any bytes become an RGB Pillow image, or a ``BadSample`` saying why not."""

from __future__ import annotations

import io
import math

import numpy as np

from homediff.data.options import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS
from homediff.data.problems import BadSample, Note
from homediff.extras import require

Image = require("PIL.Image", "data", "pillow")
ImageOps = require("PIL.ImageOps", "data", "pillow")

WHITE = (255, 255, 255)


def decode_image(data: bytes, notes: list[Note], max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_short: int | None = None, max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Decode image bytes to RGB, applying EXIF orientation; fixes are appended to ``notes``.

    Images over ``max_pixels``, or longer than ``max_aspect`` times their short side, are refused
    from their header, before any pixel is decoded. With
    ``draft_short``, a JPEG is decoded at the smallest DCT scale whose short side stays at least
    ``draft_short`` (the later resize then does less work; quality is unchanged).
    """
    if not data:
        raise BadSample("empty", "the file has zero bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadSample("too-large", str(err)) from None
    except Exception as err:  # Pillow raises many types for foreign or broken bytes
        if "truncat" in str(err).lower():
            raise BadSample("truncated", f"the header ends early ({err})") from None
        raise BadSample("not-an-image", f"no known image format ({type(err).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("too-large", f"{width}x{height} is {width * height:,} pixels, over the "
                                     f"limit of {max_pixels:,} (raise max_pixels to allow it)")
    if max(width, height) > max_aspect * max(1, min(width, height)):
        raise BadSample("extreme-aspect", f"{width}x{height} is over {max_aspect:g}:1 (raise "
                                          "max_aspect to allow it)")
    if draft_short and image.format == "JPEG" and min(width, height) > draft_short:
        scale = draft_short / min(width, height)
        image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    try:
        image.load()
    except Exception as err:
        kind = "truncated" if "truncat" in str(err).lower() else "unreadable"
        raise BadSample(kind, f"cannot decode the pixels ({err})") from None
    return to_rgb(orient(image, notes), notes)


def orient(image: Image.Image, notes: list[Note]) -> Image.Image:
    """Apply the EXIF orientation tag, if any (a corrupt EXIF block is ignored)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        return image
    if orientation not in range(2, 9):
        return image
    notes.append(("exif-rotated", f"EXIF orientation {orientation} applied"))
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image, notes: list[Note]) -> Image.Image:
    """Convert any mode to RGB: alpha and palette transparency are composited on white, 16-bit
    grey is scaled to 8 bits (Pillow would clip it)."""
    mode = image.mode
    transparent = "A" in mode or "a" in mode or "transparency" in image.info
    if mode == "RGB" and not transparent:
        return image
    if transparent:
        rgba = image.convert("RGBA")
        out = Image.new("RGB", image.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        notes.append(("converted", f"{mode} with transparency composited on white"))
        return out
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))
    notes.append(("converted", f"{mode} converted to RGB"))
    return image.convert("RGB")
