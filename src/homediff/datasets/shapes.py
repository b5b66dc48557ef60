"""Synthetic scenes of coloured shapes with captions that state them (``homediff data shapes``);
``homediff.evaluation.shape_checker`` reads an image back and scores each stated property.

Scenes (white background) hold 1–3 objects of 6 colours (red, yellow, green, cyan, blue, purple:
hues 45–80° apart) and 3 shapes (circle, square, up-pointing triangle), with captions in a
small grammar, one of three kinds::

    single    "a red circle"
    count     "two blue squares", "three green triangles"   (same colour and shape)
    relation  "a red circle to the left of a blue square"   (also: to the right of, above, below)

Objects never overlap and keep a gap of 10% of the image side; in a relation scene the offset
along the stated axis is at least 25% of the side and at least twice the offset across it.
Shapes are drawn at 4× and box-filtered down, so edges are antialiased.

Held-out split: the (colour, shape) pairs in ``HELDOUT_PAIRS`` never appear in training scenes;
every held-out scene contains at least one of them (each colour and shape is still seen).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from homediff.errors import ConfigError, HomediffError

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 40, 40), "yellow": (230, 200, 20), "green": (40, 170, 60),
           "cyan": (30, 190, 200), "blue": (40, 70, 220), "purple": (150, 50, 200)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above",
             "below": "below"}
NUMBERS = {1: "a", 2: "two", 3: "three"}
HELDOUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
KINDS = {"single": 0.25, "count": 0.25, "relation": 0.5}  # share of each kind in a build
GAP = 0.1  # the least gap between objects, as a share of the image side
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One object: colour, shape, centre (cx, cy) and side, as fractions of the image side (of
    the short side on a non-square canvas: ``homediff.datasets.scenes``)."""

    colour: str
    shape: str
    cx: float
    cy: float
    side: float


@dataclass(frozen=True)
class Spec:
    """What a caption states: groups of (count, colour, shape) and a relation of group 0 to 1."""

    groups: tuple[tuple[int, str, str], ...]
    relation: str | None = None

    @property
    def kind(self) -> str:
        return "relation" if self.relation else "count" if self.groups[0][0] > 1 else "single"


# --- captions -----------------------------------------------------------------------------------

def _phrase(count: int, colour: str, shape: str) -> str:
    return f"{NUMBERS[count]} {colour} {shape}{'s' if count > 1 else ''}"


def caption(spec: Spec) -> str:
    """The caption of a spec, e.g. "a red circle to the left of a blue square"."""
    words = [_phrase(*group) for group in spec.groups]
    return f"{words[0]} {RELATIONS[spec.relation]} {words[1]}" if spec.relation else words[0]


_OBJECT = (rf"(a|two|three) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?")
_CAPTION = re.compile(rf"^{_OBJECT}(?: ({'|'.join(RELATIONS.values())}) {_OBJECT})?$")


def parse_caption(text: str) -> Spec:
    """The spec a caption of this grammar states; a HomediffError for any other text."""
    match = _CAPTION.match(text.strip().lower())
    if not match:
        raise HomediffError(f"{text!r} is not a shapes caption (e.g. 'a red circle', 'two blue "
                            "squares', 'a red circle to the left of a blue square')")
    counts = {word: n for n, word in NUMBERS.items()}
    groups = [(counts[match[1]], match[2], match[3])]
    relation = None
    if match[4]:
        groups.append((counts[match[5]], match[6], match[7]))
        relation = next(key for key, words in RELATIONS.items() if words == match[4])
    return Spec(tuple(groups), relation)


# --- scenes -------------------------------------------------------------------------------------

def _apart(a: Shape, b: Shape) -> bool:
    return max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= (a.side + b.side) / 2 + GAP


def _place(rng: random.Random, colour: str, shape: str, low: float, high: float) -> Shape:
    side = rng.uniform(low, high)
    return Shape(colour, shape, rng.uniform(side / 2 + 0.04, 1 - side / 2 - 0.04),
                 rng.uniform(side / 2 + 0.04, 1 - side / 2 - 0.04), side)


def _holds(relation: str, a: Shape, b: Shape) -> bool:
    """Whether a's centre is clearly ``relation`` of b's: offset ≥ 0.25 and ≥ 2× the other one."""
    along, across = (b.cx - a.cx, b.cy - a.cy) if relation in ("left", "right") else (
        b.cy - a.cy, b.cx - a.cx)
    along = along if relation in ("left", "above") else -along
    return along >= 0.25 and along >= 2 * abs(across)


def layout(spec: Spec, rng: random.Random) -> list[Shape]:
    """Random non-overlapping objects that satisfy ``spec`` (rejection sampling)."""
    for _ in range(10_000):
        if spec.relation:
            (_, ca, sa), (_, cb, sb) = spec.groups
            a, b = _place(rng, ca, sa, 0.22, 0.34), _place(rng, cb, sb, 0.22, 0.34)
            if _apart(a, b) and _holds(spec.relation, a, b):
                return [a, b]
            continue
        count, colour, shape = spec.groups[0]
        low, high = (0.28, 0.42) if count == 1 else (0.22, 0.3)
        objects = [_place(rng, colour, shape, low, high) for _ in range(count)]
        if all(_apart(p, q) for i, p in enumerate(objects) for q in objects[i + 1:]):
            return objects
    raise HomediffError(f"cannot lay out {caption(spec)!r}")  # not reached with these sizes


def random_spec(rng: random.Random, heldout: bool = False) -> Spec:
    """A random spec; without ``heldout`` it avoids HELDOUT_PAIRS, with it it uses at least one."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    while True:
        pairs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(2)]
        if heldout:
            pairs[rng.randrange(2 if kind == "relation" else 1)] = rng.choice(HELDOUT_PAIRS)
        used = pairs if kind == "relation" else pairs[:1]
        if kind == "relation" and used[0] == used[1]:
            continue
        if any(p in HELDOUT_PAIRS for p in used) == heldout:
            break
    if kind == "relation":
        return Spec(((1, *used[0]), (1, *used[1])), rng.choice(list(RELATIONS)))
    return Spec(((1 if kind == "single" else rng.choice((2, 3)), *used[0]),))


def draw_objects(image: Image.Image, objects: list[Shape], unit: float) -> None:
    """Draw the objects on ``image``; their centres and sides are in units of ``unit`` pixels."""
    draw = ImageDraw.Draw(image)
    for o in objects:
        half = o.side * unit / 2
        x, y = o.cx * unit, o.cy * unit
        box = [x - half, y - half, x + half, y + half]
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=fill)


def render(objects: list[Shape], size: int) -> Image.Image:
    """An RGB ``size × size`` image of the objects on white (drawn at 4×, box-filtered down)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), (255, 255, 255))
    draw_objects(image, objects, big)
    return image.reduce(SUPERSAMPLE)


def prepare_build(out: Path, kind: str) -> None:
    """Make ``out`` ready for a build of ``kind``: new, empty, or an earlier build (whose train/
    and heldout/ are removed); any other folder is an error."""
    if out.exists() and any(out.iterdir()):
        if not (out / "split.json").is_file():
            raise HomediffError(f"{out} exists and is not a {kind} build: give a new or empty folder")
        for part in ("train", "heldout"):
            shutil.rmtree(out / part, ignore_errors=True)


def build_shapes_dataset(out: str | Path, size: int = 64, count: int = 10_000,
                         heldout: int | None = None, seed: int = 0) -> dict:
    """Write ``count`` training scenes to OUT/train and ``heldout`` (default count/20, at least
    50) to OUT/heldout as PNG + same-stem .txt caption, with OUT/split.json (the held-out rule and
    list) and OUT/scenes.jsonl (every scene's objects). Returns a summary."""
    if size < 16 or count < 1:
        raise ConfigError(f"need size >= 16 and count >= 1, got size {size}, count {count}")
    heldout = max(50, count // 20) if heldout is None else heldout
    out, started, rng = Path(out), time.perf_counter(), random.Random(seed)
    prepare_build(out, "shapes")
    records, listed = [], []
    for split, number in (("train", count), ("heldout", heldout)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i in range(number):
            spec = random_spec(rng, heldout=split == "heldout")
            objects, text, stem = layout(spec, rng), caption(spec), f"{split}/shapes-{i:06d}"
            render(objects, size).save(out / f"{stem}.png")
            (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
            records.append({"file": f"{stem}.png", "caption": text,
                            "objects": [asdict(o) for o in objects]})
            if split == "heldout":
                listed.append({"file": f"{stem}.png", "caption": text})
    split = {"size": size, "seed": seed, "counts": {"train": count, "heldout": heldout},
             "colours": {name: "#%02x%02x%02x" % rgb for name, rgb in COLOURS.items()},
             "shapes": list(SHAPES), "heldout_pairs": HELDOUT_PAIRS,
             "rule": "held-out scenes contain a (colour, shape) pair of heldout_pairs; training "
                     "scenes never do", "heldout": listed}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    with open(out / "scenes.jsonl", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(r) + "\n" for r in records)
    seconds = round(time.perf_counter() - started, 1)
    logger.info("%s: %d training and %d held-out scenes at %d px in %.1f s", out, count, heldout,
                size, seconds)
    return {"train": count, "heldout": heldout, "seconds": seconds}
