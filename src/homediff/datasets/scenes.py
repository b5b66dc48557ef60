"""Wide scenes of coloured shapes (``homediff data scenes``): the data on which camera control
(shifting and zooming the position map at inference) should emerge from shifted square crops.

Canvas: the short side is ``size`` pixels, the long side follows the scene's aspect W:H. A build
mixes the aspects of ``aspects`` in their shares (default ``ASPECTS``: 1:1, 3:2, 2:3, 2:1 and 1:2, a
fifth each), each holding its share of the scenes rounded by largest remainder; the long side is
at most twice the short one. Keep 1:1 in any mix: the scale of the canonical square view is learnt
from square scenes only.

Objects: the shapes vocabulary (``homediff.datasets.shapes``: 6 colours, 3 shapes), each object of a
different colour, so that a colour names one object of a scene. For a long/short ratio r a scene
holds ceil(1.5·r) to ceil(2·r) + 1 objects, as many as fit (2–3 on a square, 3–4 at 3:2, 3–5 at
2:1). Sides are ``SIDES`` of the short side (at least 6 px at a 24 px crop). Objects follow each
other along the long side with ``GAP`` between them there and ``MARGIN`` from the edges, at random
places across the short side; the spare length is spread at random. Every square window of a
scene holds at least one whole object (layouts are drawn again until it does), so every crop shows
content and, mostly, parts of its neighbours.

Captions name the objects in order along the long side: left to right on landscape and square
canvases, top to bottom on portrait ones: "a red circle and a blue square", "a red circle, a blue
square and a yellow triangle". Five objects make at most 22 all-MiniLM-L6-v2 tokens with [CLS]
and [SEP]. ``parse_scene_caption`` reads one back.

Background: neutral grey, a gentle diagonal gradient over the canonical position of
``homediff.geometry`` (x, y, long side in [−1, 1]): grey = 250 − 40·(x + y + 2)/4, lighter at the
top left. The background of any crop thus shows where the crop lies in its scene, which rewards
reading the position map, and a camera edit shows even where no object is. Having no chroma, it
is background to the shapes checker (``homediff.evaluation.shape_checker``).

Held-out split, as the shapes set's: the (colour, shape) pairs of ``shapes.HELDOUT_PAIRS`` never
appear in training scenes; every held-out scene holds at least one (each colour and shape is still
seen in training).

Layout records (OUT/scenes.jsonl for every scene, split.json for the held-out ones): each object in
caption order with its centre (x, y) as fractions of the canvas width and height and its side as a
fraction of the short side.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from homediff.datasets.shapes import (COLOURS, HELDOUT_PAIRS, SHAPES, SUPERSAMPLE, Shape, draw_objects,
                                  prepare_build)
from homediff.errors import ConfigError, HomediffError
from homediff.geometry import canonical_grid

logger = logging.getLogger(__name__)

ASPECTS = {"1:1": 0.2, "3:2": 0.2, "2:3": 0.2, "2:1": 0.2, "1:2": 0.2}  # W:H → share of the scenes
MAX_RATIO = 2  # the long side is at most this many times the short one
SIDES = (0.26, 0.36)  # an object's side, as a share of the short side
GAP = 0.05  # the least gap between neighbours along the long side (share of the short side)
MARGIN = 0.04  # the least distance from an object to the canvas edge (share of the short side)
GREY, DROP = 250, 40  # the background's grey at the top left, and its fall to the bottom right
ORDER = ("objects in caption order along the long side: left to right on landscape and square "
         "canvases, top to bottom on portrait ones")
_OBJECT = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")


@dataclass(frozen=True)
class Scene:
    """A canvas of ``width × height`` pixels and its objects in caption order; the objects' centres
    and sides are in units of the short side."""

    width: int
    height: int
    objects: tuple[Shape, ...]

    @property
    def caption(self) -> str:
        words = [f"a {o.colour} {o.shape}" for o in self.objects]
        return f"{', '.join(words[:-1])} and {words[-1]}"

    def record(self) -> dict:
        """The layout: centres as fractions of the canvas, sides as fractions of the short side."""
        short = min(self.width, self.height)
        objects = [{"colour": o.colour, "shape": o.shape, "x": round(o.cx * short / self.width, 4),
                    "y": round(o.cy * short / self.height, 4), "side": round(o.side, 4)}
                   for o in self.objects]
        return {"width": self.width, "height": self.height, "caption": self.caption,
                "objects": objects}


def parse_scene_caption(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a scene caption names, in its order; a HomediffError otherwise."""
    head, _, last = text.strip().lower().rpartition(" and ")
    matches = [_OBJECT.fullmatch(word) for word in (*head.split(", "), last)] if head else [None]
    if not all(matches):
        raise HomediffError(f"{text!r} is not a scenes caption (e.g. 'a red circle, a blue square "
                            "and a yellow triangle')")
    return [match.groups() for match in matches]


# --- aspects ------------------------------------------------------------------------------------

def canvas(aspect: str, size: int) -> tuple[int, int]:
    """(width, height) in pixels of aspect "W:H" with short side ``size``."""
    try:
        w, h = (int(part) for part in aspect.split(":"))
    except ValueError:
        raise ConfigError(f"aspect {aspect!r} is not W:H in whole numbers, e.g. '3:2'") from None
    if min(w, h) < 1 or max(w, h) > MAX_RATIO * min(w, h):
        raise ConfigError(f"aspect {aspect!r} is out of range: use W:H from 1:{MAX_RATIO} to "
                          f"{MAX_RATIO}:1")
    return (round(size * w / h), size) if w >= h else (size, round(size * h / w))


def parse_aspects(text: str) -> dict[str, float]:
    """"1:1=0.4,2:1=0.6" → {"1:1": 0.4, "2:1": 0.6} (the command line's form)."""
    aspects = {}
    for item in text.split(","):
        aspect, _, share = item.partition("=")
        try:
            aspects[aspect.strip()] = float(share)
        except ValueError:
            raise ConfigError(f"{item!r} is not ASPECT=SHARE, e.g. '2:1=0.2'") from None
    return aspects


def aspect_counts(aspects: dict[str, float], total: int) -> dict[str, int]:
    """How many of ``total`` scenes take each aspect: its share of the shares' sum, the rest of the
    rounding going to the largest remainders."""
    if not aspects or any(share < 0 for share in aspects.values()) or not sum(aspects.values()) > 0:
        raise ConfigError(f"aspect shares must be >= 0 with a positive sum, got {aspects}")
    exact = {name: share * total / sum(aspects.values()) for name, share in aspects.items()}
    counts = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[:total - sum(counts.values())]:
        counts[name] += 1
    return counts


# --- layout -------------------------------------------------------------------------------------

def object_counts(length: float) -> tuple[int, int]:
    """The fewest and most objects of a scene whose long side is ``length`` short sides."""
    fit = math.floor((length - 2 * MARGIN + GAP) / (SIDES[0] + GAP))
    return math.ceil(1.5 * length), min(math.ceil(2 * length) + 1, fit, len(COLOURS))


def _along(rng: random.Random, sides: list[float], length: float) -> list[float]:
    """Centres along the long side: in order, GAP apart and MARGIN from the ends, with the spare
    length cut at random points into the spaces before, between and after the objects."""
    spare = length - 2 * MARGIN - sum(sides) - GAP * (len(sides) - 1)
    cuts = sorted(rng.uniform(0, spare) for _ in sides)
    return [MARGIN + cut + sum(sides[:i]) + GAP * i + side / 2
            for i, (cut, side) in enumerate(zip(cuts, sides))]


def _covered(centres: list[float], sides: list[float], length: float) -> bool:
    """Whether every unit window [o, o + 1], 0 ≤ o ≤ length − 1, holds a whole object: the offsets
    [end − 1, start] of the objects, in order, must leave no gap."""
    reach = 0.0  # the offsets up to here are covered
    for centre, side in zip(centres, sides):
        if centre + side / 2 - 1 > reach:
            return False
        reach = centre - side / 2
    return reach >= length - 1


def _pairs(rng: random.Random, count: int, heldout: bool) -> list[tuple[str, str]]:
    """``count`` (colour, shape) pairs of different colours in random order: in training none of
    HELDOUT_PAIRS, held out at least one."""
    if not heldout:
        return [(c, rng.choice([s for s in SHAPES if (c, s) not in HELDOUT_PAIRS]))
                for c in rng.sample(list(COLOURS), count)]
    first = rng.choice(HELDOUT_PAIRS)
    others = rng.sample([c for c in COLOURS if c != first[0]], count - 1)
    pairs = [first, *((c, rng.choice(SHAPES)) for c in others)]
    rng.shuffle(pairs)
    return pairs


def plan_scene(rng: random.Random, width: int, height: int, heldout: bool = False) -> Scene:
    """A random scene on a ``width × height`` canvas (see the module docstring)."""
    length = max(width, height) / min(width, height)
    fewest, most = object_counts(length)
    for _ in range(10_000):
        count = rng.randint(fewest, most)
        room = (length - 2 * MARGIN - GAP * (count - 1)) / count  # the largest side that fits
        sides = [rng.uniform(SIDES[0], min(SIDES[1], room)) for _ in range(count)]
        along = _along(rng, sides, length)
        if _covered(along, sides, length):
            break
    else:
        raise HomediffError(f"cannot lay out a {width}x{height} scene")  # not reached in range
    across = [rng.uniform(MARGIN + side / 2, 1 - MARGIN - side / 2) for side in sides]
    landscape = width >= height
    objects = tuple(Shape(colour, shape, *((a, b) if landscape else (b, a)), side)
                    for (colour, shape), a, b, side in
                    zip(_pairs(rng, count, heldout), along, across, sides))
    return Scene(width, height, objects)


# --- images and the build -----------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _background(width: int, height: int) -> Image.Image:
    """The grey gradient over the canonical position of a ``width × height`` canvas."""
    y, x = canonical_grid(height, width).unbind(-1)
    grey = (GREY - DROP * (x + y + 2) / 4).round().byte().reshape(height, width)
    return Image.fromarray(grey.numpy()).convert("RGB")


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image (drawn at 4×, box-filtered down)."""
    image = _background(scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE).copy()
    draw_objects(image, list(scene.objects), min(scene.width, scene.height) * SUPERSAMPLE)
    return image.reduce(SUPERSAMPLE)


def _canvases(rng: random.Random, aspects: dict[str, float], number: int,
              size: int) -> list[tuple[int, int]]:
    """The canvases of ``number`` scenes, each aspect in its share, in random order."""
    sizes = [canvas(name, size) for name, n in aspect_counts(aspects, number).items()
             for _ in range(n)]
    rng.shuffle(sizes)
    return sizes


def build_scenes_dataset(out: str | Path, size: int = 64, count: int = 10_000,
                         heldout: int | None = None, seed: int = 0,
                         aspects: dict[str, float] | None = None) -> dict:
    """Write ``count`` training scenes to OUT/train and ``heldout`` (default count/20, at least
    50) to OUT/heldout as PNG + same-stem .txt caption, with OUT/split.json (the rules, aspects and
    held-out layouts) and OUT/scenes.jsonl (every scene's layout). ``size``: the short side in
    pixels; ``aspects``: "W:H" → share (default ``ASPECTS``). Returns a summary."""
    aspects = dict(ASPECTS if aspects is None else aspects)
    heldout = max(50, count // 20) if heldout is None else heldout
    if size < 16 or count < 1 or heldout < 0:
        raise ConfigError(f"need size >= 16, count >= 1 and heldout >= 0, got size {size}, count "
                          f"{count}, heldout {heldout}")
    for name in aspects:
        canvas(name, size)
    aspect_counts(aspects, count)  # checks the shares before anything is written
    out, started, rng = Path(out), time.perf_counter(), random.Random(seed)
    prepare_build(out, "scenes")
    records = []
    for split, number in (("train", count), ("heldout", heldout)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, (width, height) in enumerate(_canvases(rng, aspects, number, size)):
            scene = plan_scene(rng, width, height, heldout=split == "heldout")
            stem = f"{split}/scene-{i:06d}"
            render_scene(scene).save(out / f"{stem}.png")
            (out / f"{stem}.txt").write_text(scene.caption + "\n", encoding="utf-8")
            records.append({"file": f"{stem}.png", **scene.record()})
    _write_notes(out, size, seed, aspects, count, heldout, records)
    seconds = round(time.perf_counter() - started, 1)
    logger.info("%s: %d training and %d held-out scenes, short side %d px, in %.1f s", out, count,
                heldout, size, seconds)
    return {"train": count, "heldout": heldout, "seconds": seconds}


def _write_notes(out: Path, size: int, seed: int, aspects: dict[str, float], count: int,
                 heldout: int, records: list[dict]) -> None:
    split = {"size": size, "seed": seed, "counts": {"train": count, "heldout": heldout},
             "aspects": aspects, "aspect_counts": {"train": aspect_counts(aspects, count),
                                                   "heldout": aspect_counts(aspects, heldout)},
             "colours": {name: "#%02x%02x%02x" % rgb for name, rgb in COLOURS.items()},
             "shapes": list(SHAPES), "heldout_pairs": HELDOUT_PAIRS,
             "rule": "held-out scenes contain a (colour, shape) pair of heldout_pairs; training "
                     "scenes never do", "order": ORDER,
             "layout": "x, y: an object's centre as fractions of the canvas width and height; "
                       "side: a fraction of the short side",
             "heldout": [r for r in records if r["file"].startswith("heldout/")]}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    with open(out / "scenes.jsonl", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(r) + "\n" for r in records)
