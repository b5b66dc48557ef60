"""The shapes checker: reads the objects of a shapes scene (``homediff.datasets.shapes``) back from an
image and scores each property its caption states, as GenEval does for real models, with rules
instead of a detector.

``detect`` then ``score``: pixels whose chroma (max − min of RGB in [0, 1]) is at least
0.25 are foreground and take the palette colour of nearest hue (blending with the white background
keeps hue, so antialiased edges keep their colour); each colour's 8-connected components of at least
1% of the image are objects. An object's coverage map is its chroma over its 90th percentile (so
soft, blurred edges count partly); each shape (rectangle, ellipse, up-pointing triangle) is placed
and sized from the map's weighted centroid and spread, and the shape of highest soft IoU (sum of
minima over sum of maxima) wins, "unknown" below 0.5.

The tests check that clean and noisy scenes read back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from homediff.datasets.shapes import COLOURS, SHAPES, Spec, parse_caption

PROPERTIES = ("colour", "shape", "count", "objects", "relation", "all")
CHROMA, MIN_AREA, MIN_IOU = 0.25, 0.01, 0.5


@dataclass(frozen=True)
class Detection:
    """An object read back: colour, shape, area (pixels), centre (fractions), template IoU."""

    colour: str
    shape: str
    area: int
    cx: float
    cy: float
    iou: float


def _hues() -> np.ndarray:
    rgb = np.array(list(COLOURS.values()), dtype=np.float64)[:, None, :] / 255
    return _hue(rgb)[:, 0]


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of (..., 3) RGB in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels with 0 = background, count)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:  # spread the largest label through each component until nothing changes
        padded = np.pad(labels, 1)
        h, w = mask.shape
        spread = np.max([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], 0)
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    values = np.unique(labels[labels > 0])
    remap = np.zeros(labels.max() + 1, dtype=np.int64)
    remap[values] = np.arange(1, len(values) + 1)
    return remap[labels], len(values)


def _template(shape: str, u: np.ndarray, v: np.ndarray, cx: float, cy: float,
              sx: float, sy: float) -> np.ndarray:
    """Coverage of ``shape`` whose weighted spread is (sx, sy) around (cx, cy), at subpixel
    points (u, v): the box follows from the shape's moments (square: side √12·σ; ellipse: 4σ;
    triangle: width √24·σx, height √18·σy, centroid 2/3 of the way down)."""
    if shape == "square":
        return (np.abs(u - cx) <= 3 ** 0.5 * sx) & (np.abs(v - cy) <= 3 ** 0.5 * sy)
    if shape == "circle":
        return ((u - cx) / (2 * sx)) ** 2 + ((v - cy) / (2 * sy)) ** 2 <= 1
    width, height = 24 ** 0.5 * sx, 18 ** 0.5 * sy
    depth = (v - cy) / height + 2 / 3  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(u - cx) <= depth * width / 2)


def _shape_ious(alpha: np.ndarray) -> dict[str, float]:
    """Soft IoU of a coverage map (H, W) in [0, 1] with each shape fitted to its moments."""
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    total = alpha.sum()
    cx, cy = (alpha * xs).sum() / total, (alpha * ys).sum() / total
    sx = max(np.sqrt((alpha * (xs - cx) ** 2).sum() / total), 0.3)
    sy = max(np.sqrt((alpha * (ys - cy) ** 2).sum() / total), 0.3)
    v, u = (np.mgrid[0:h * 4, 0:w * 4] + 0.5) / 4
    ious = {}
    for shape in SHAPES:
        cover = _template(shape, u, v, cx, cy, sx, sy).reshape(h, 4, w, 4).mean((1, 3))
        ious[shape] = float(np.minimum(alpha, cover).sum() / np.maximum(alpha, cover).sum())
    return ious


def to_array(image) -> np.ndarray:
    """A PIL image, (H, W, 3) uint8 array or (3, H, W) tensor in [−1, 1] → (H, W, 3) in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    if hasattr(image, "detach"):  # a torch tensor
        return ((image.detach().cpu().double().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    array = np.asarray(image)
    return array / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)


def detect(image) -> list[Detection]:
    """The objects in an image (see the module docstring), largest first."""
    rgb = to_array(image)
    height, width = rgb.shape[:2]
    spread = rgb.max(-1) - rgb.min(-1)  # chroma: 0 on white or grey
    foreground = spread >= CHROMA
    names = list(COLOURS)
    gap = np.abs(_hue(rgb)[..., None] - _hues())
    nearest = np.minimum(gap, 360 - gap).argmin(-1)
    found = []
    for index, colour in enumerate(names):
        labels, count = _components(foreground & (nearest == index))
        for label in range(1, count + 1):
            mask = labels == label
            area = int(mask.sum())
            if area < MIN_AREA * height * width:
                continue
            ys, xs = np.nonzero(mask)
            top, left = max(ys.min() - 1, 0), max(xs.min() - 1, 0)
            window = (slice(top, ys.max() + 2), slice(left, xs.max() + 2))
            chroma = np.where(mask, spread, 0.0)[window]
            alpha = np.clip(chroma / np.percentile(chroma[mask[window]], 90), 0, 1)
            ious = _shape_ious(alpha)
            shape = max(ious, key=ious.get)
            found.append(Detection(colour, shape if ious[shape] >= MIN_IOU else "unknown", area,
                                   float(xs.mean() + 0.5) / width,
                                   float(ys.mean() + 0.5) / height, round(ious[shape], 3)))
    return sorted(found, key=lambda d: -d.area)


def score(spec: Spec, found: list[Detection]) -> dict[str, bool | None]:
    """Each property of ``spec`` read back from ``found``: True, False, or None if not stated.

    colour: the detected colours are exactly the stated ones; shape: likewise for shapes; count:
    as many objects as stated; objects: the (colour, shape) multiset is exactly the stated one;
    relation: the largest object of each group's colour and shape (else colour) is in the stated
    relation, centre to centre, with a larger offset along the stated axis than across it;
    all: every stated property holds.
    """
    stated = [(c, s) for n, c, s in spec.groups for _ in range(n)]
    result = {"colour": {d.colour for d in found} == {c for c, _ in stated},
              "shape": {d.shape for d in found} == {s for _, s in stated},
              "count": len(found) == len(stated),
              "objects": sorted((d.colour, d.shape) for d in found) == sorted(stated),
              "relation": None}
    if spec.relation:
        picks = []
        for _, colour, shape in spec.groups:
            options = [d for d in found if d not in picks and d.colour == colour]
            exact = [d for d in options if d.shape == shape]
            picks.append((exact or options or [None])[0])
        a, b = picks
        result["relation"] = bool(a and b and _read_relation(spec.relation, a, b))
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def _read_relation(relation: str, a: Detection, b: Detection) -> bool:
    along, across = (b.cx - a.cx, b.cy - a.cy) if relation in ("left", "right") else (
        b.cy - a.cy, b.cx - a.cx)
    along = along if relation in ("left", "above") else -along
    return along > abs(across)


def check(image, text: str) -> dict[str, bool | None]:
    """Score an image against a shapes caption: ``score(parse_caption(text), detect(image))``."""
    return score(parse_caption(text), detect(image))
