"""What both evaluations share: their settings, the data split, the evaluation captions, reference
images and generation.

Data: a folder with ``train/`` and ``heldout/`` image-caption folders (``homediff data emoji``,
``homediff data shapes``, or your own). Evaluation captions: ``seen`` distinct captions of train/
and at most ``heldout`` of heldout/, drawn with the seed in proportion to their number of images, so
the mix follows the data (in the shapes set a single-object caption has many scenes, a relation
caption one or two); sorted first, so runs repeat. Each is generated ``per_caption`` times; images
repeat exactly for the same seed, captions and ``batch``.

Defaults (``EvalSettings``): 50 seen and at most 50 held-out captions, 2 images each, 16 Euler steps,
guidance 3, features at 224 px. Reference features are cached in the user cache folder
(``~/.cache/homediff/features``), so a second evaluation on the same data skips them.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from homediff.data.crop import shifted_square_crop
from homediff.data.folder import scan_folder
from homediff.errors import ConfigError, HomediffError
from homediff.evaluation.settings import EvalSettings
from homediff.generation import GenerationRequest, draw


def read_captions(folder: Path) -> dict[str, list[Path]]:
    """Caption → its image paths (file order) for an image-caption folder."""
    found: dict[str, list[Path]] = {}
    for entry in scan_folder(folder, cache=False):
        if entry.caption:
            text = (folder / entry.caption).read_text(encoding="utf-8").strip()
            if text:
                found.setdefault(text, []).append(folder / entry.image)
    return found


def read_split(data: str | Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """(train, heldout) caption → image paths of a data folder."""
    data = Path(data)
    for name in ("train", "heldout"):
        if not (data / name).is_dir():
            raise HomediffError(f"{data}: no {name}/ folder; give a data set built by `homediff "
                                "data emoji` or `homediff data shapes`, or any folder with train/ "
                                "and heldout/ image-caption folders")
    parts = [read_captions(data / name) for name in ("train", "heldout")]
    for name, part in zip(("train", "heldout"), parts):
        if not part:
            raise HomediffError(f"{data / name}: no captioned images found")
    return parts[0], parts[1]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w-]+", text.lower()))


def choose_captions(train: dict, held: dict, settings: EvalSettings):
    """(seen, held-out, distractor) caption lists; see the module docstring."""
    rng = random.Random(settings.seed)
    seen, heldout = _draw(train, settings.seen, rng), _draw(held, settings.heldout, rng)
    if not seen and not heldout:
        raise ConfigError("no evaluation captions: give --seen or --heldout a positive number")
    pool = [(c, _words(c)) for c in sorted(train)]
    chosen: set[str] = set()
    for caption in heldout:
        words = _words(caption)
        ranked = sorted(pool, key=lambda item: -len(words & item[1]) / len(words | item[1]))
        chosen.update(c for c, _ in ranked[:settings.distractors])
    return seen, heldout, sorted(chosen - set(seen))


def one_off_captions(captions: list[str], known: list[str]) -> set[str]:
    """The captions whose base (the text before a ":", as in "woman: dark skin tone") no other
    caption of ``known`` shares: one-off objects, where the rest come in variants (skin tones)
    that share most of their picture."""
    bases = Counter(caption.split(":")[0].strip() for caption in set(known))
    return {c for c in captions if bases[c.split(":")[0].strip()] <= 1}


def spread_captions(captions, count: int) -> list[str]:
    """``count`` captions spread evenly over the sorted ``captions`` (for sample sheets and the
    camera evaluation: a fixed, varied choice)."""
    ordered = sorted(captions)
    return ordered[:: max(1, len(ordered) // count)][:count]


def _draw(captions: dict, count: int, rng: random.Random) -> list[str]:
    """``count`` distinct captions, each drawn with probability proportional to its images."""
    tickets = [c for c in sorted(captions) for _ in range(max(1, len(captions[c])))]
    rng.shuffle(tickets)
    return sorted(list(dict.fromkeys(tickets))[:count])


def load_image(path: Path, size: int | None = None) -> torch.Tensor:
    """The centre square of an image as (3, S, S) in [−1, 1]; resized to ``size`` if given."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as err:
        raise HomediffError(f"{path}: cannot read the image ({err})") from err
    return shifted_square_crop(image, size or min(image.size), "center").image


def generate(pipe, captions: list[str], settings: EvalSettings, size: int) -> torch.Tensor:
    """``per_caption`` images per caption, caption-major, (N, 3, size, size) in [−1, 1]: one
    request (``generation``), image k from seed ``settings.seed`` + k, whole captions per batch."""
    from tqdm.auto import tqdm

    request = GenerationRequest(captions, seed=settings.seed, steps=settings.steps, cfg=settings.cfg,
                                height=size, width=size, num=settings.per_caption,
                                batch_size=max(settings.per_caption, settings.batch))
    previous = dict(getattr(pipe, "_progress", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        images = [image for image, _ in tqdm(draw(pipe, request, output_type="pt"), desc="generating",
                                             total=len(captions) * settings.per_caption,
                                             disable=not settings.progress)]
    finally:
        pipe.set_progress_bar_config(**previous)
    return torch.stack(images).float() * 2 - 1


@dataclass
class Selection:
    """What an evaluation works on: checked settings, the resolution, the split and its captions."""

    settings: EvalSettings
    size: int
    train: dict[str, list[Path]]
    held: dict[str, list[Path]]
    seen: list[str]
    heldout: list[str]
    distractors: list[str]


def select(pipe, data: str | Path, settings: EvalSettings | None) -> Selection:
    """Check the settings, fix the resolution (``size`` or the pipeline's), read the split and choose
    the evaluation captions."""
    settings = settings or EvalSettings()
    settings.check()
    size = settings.size or pipe.sample_size
    pipe.check_size(size, size)
    train, held = read_split(data)
    return Selection(settings, size, train, held, *choose_captions(train, held, settings))
