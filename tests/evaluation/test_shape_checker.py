import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from homediff.datasets import shapes
from homediff.evaluation.shape_checker import PROPERTIES, check, detect, score


def rates(results):
    out = {}
    for name in PROPERTIES:
        values = [r[name] for r in results if r[name] is not None]
        out[name] = sum(values) / len(values)
    return out


def test_detect_reads_a_drawn_scene():
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse([4, 24, 22, 42], fill=shapes.COLOURS["red"])
    draw.rectangle([40, 8, 58, 26], fill=shapes.COLOURS["blue"])
    draw.polygon([(49, 38), (58, 56), (40, 56)], fill=shapes.COLOURS["yellow"])
    found = {(d.colour, d.shape): d for d in detect(image)}
    assert set(found) == {("red", "circle"), ("blue", "square"), ("yellow", "triangle")}
    assert found["red", "circle"].cx == pytest.approx(13.5 / 64, abs=0.01)
    assert found["blue", "square"].area == 19 * 19
    result = check(image, "a red circle to the left of a blue square")
    assert result == {"colour": False, "shape": False, "count": False, "objects": False,
                      "relation": True, "all": False}  # the yellow triangle was not asked for
    assert check(image, "a blue square above a yellow triangle")["relation"] is True
    assert check(image, "a blue square below a yellow triangle")["relation"] is False


@pytest.mark.parametrize("size", [32, 64])
def test_the_checker_reads_clean_scenes_back(size, shape_scenes):
    results = [score(spec, detect(shapes.render(objects, size)))
               for spec, objects in shape_scenes(300 if size == 32 else 120)]
    measured = rates(results)
    assert measured["colour"] >= 0.95 and measured["shape"] >= 0.95  # 100% when measured
    assert measured["all"] >= 0.95


def test_the_checker_tolerates_pixel_noise(shape_scenes):
    generator = np.random.default_rng(0)
    results = []
    for spec, objects in shape_scenes(150, seed=4):
        pixels = np.asarray(shapes.render(objects, 32)) / 255
        noisy = (pixels + generator.normal(0, 0.1, pixels.shape)).clip(0, 1)
        results.append(score(spec, detect(noisy)))
    measured = rates(results)
    assert measured["colour"] >= 0.95 and measured["shape"] >= 0.95  # 100% and 99% measured


def test_scrambled_captions_score_at_chance(shape_scenes):
    """Pair each scene with another's caption: each property is right about as often as the two
    scenes' ground truth agree on it (computed from the specs, not from the checker)."""
    pairs = shape_scenes(300, seed=2)
    images = [shapes.render(objects, 32) for _, objects in pairs]
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    results = [score(pairs[other[i]][0], detect(image))
               for i, image in enumerate(images)]

    def agree(a, b, key):
        return sorted({key(g) for g in a.groups}) == sorted({key(g) for g in b.groups})

    expected = {
        "colour": sum(agree(pairs[i][0], pairs[other[i]][0], lambda g: g[1]) for i in order),
        "shape": sum(agree(pairs[i][0], pairs[other[i]][0], lambda g: g[2]) for i in order)}
    measured = rates(results)
    for name, hits in expected.items():
        assert measured[name] == pytest.approx(hits / len(pairs), abs=0.02)
        assert measured[name] < 0.5
    assert measured["all"] < 0.05
