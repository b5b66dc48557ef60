"""Composition (``evaluate_shapes``): every generated image is read back against its prompt by
``homediff.evaluation.shape_checker.check``; ceiling: the caption's first reference image after the
round trip; chance: those references scored against another evaluation caption (a seeded
derangement).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path

from homediff.datasets.shapes import parse_caption
from homediff.evaluation.common import EvalSettings, generate, load_image, select
from homediff.evaluation.report import sample_rows, write_report
from homediff.evaluation.shape_checker import PROPERTIES, check


def _shuffled(count: int, seed: int) -> list[int]:
    """A seeded permutation without fixed points (for count > 1)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    target = [0] * count
    for i in range(count):
        target[order[i]] = order[(i + 1) % count]
    return target


def _rates(results: list[dict]) -> dict[str, float | None]:
    rates = {}
    for name in PROPERTIES:
        values = [r[name] for r in results if r[name] is not None]
        rates[name] = sum(values) / len(values) if values else None
    return rates


def evaluate_shapes(pipe, data: str | Path, settings: EvalSettings | None = None,
                    out: str | Path | None = None) -> dict:
    """Composition scores of a pipeline trained on shapes scenes (module docstring)."""
    started = time.perf_counter()
    s = select(pipe, data, settings)
    settings, size, train, held = s.settings, s.size, s.train, s.held
    seen, heldout = s.seen, s.heldout
    captions = seen + heldout
    for caption in captions:
        parse_caption(caption)  # a clear error for a data set that is not shapes
    tiles = [load_image(train[c][0], size) for c in seen]
    tiles += [load_image(held[c][0], size) for c in heldout]
    images = generate(pipe, captions, settings, size)
    generated = time.perf_counter()
    prompts = [c for c in captions for _ in range(settings.per_caption)]
    results = [check(image, c) for image, c in zip(images, prompts)]
    ceiling = [check(t, c) for t, c in zip(tiles, captions)]
    other = _shuffled(len(captions), settings.seed)
    chance = [check(tiles[other[i]], c) for i, c in enumerate(captions)]
    report = {"kind": "shapes", "data": str(data), "resolution": size,
              "settings": asdict(settings)}
    for name, split in (("seen", set(seen)), ("heldout", set(heldout))):
        mine = [(r, c) for r, c in zip(results, prompts) if c in split]
        kinds = {}
        for result, caption in mine:
            kinds.setdefault(parse_caption(caption).kind, []).append(result)
        report[name] = {"captions": len(split), "images": len(mine),
                        "rates": _rates([r for r, _ in mine]),
                        "ceiling": _rates([r for r, c in zip(ceiling, captions) if c in split]),
                        "by_kind": {kind: _rates(part) for kind, part in sorted(kinds.items())}}
    report["chance"] = _rates(chance)
    report["seconds"] = {"generation": round(generated - started, 1),
                         "total": round(time.perf_counter() - started, 1)}
    if out is not None:
        pairs = [(c, None) for c in captions]
        write_report(report, out, "shapes", sample_rows(seen, heldout, pairs, tiles, images,
                                                         settings.per_caption))
    return report
