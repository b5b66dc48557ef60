import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from homediff import shapes
from homediff.errors import HomediffError


def scenes(count: int, seed: int = 0):
    """(spec, objects) of random scenes, one in five from the held-out pairs."""
    rng = random.Random(seed)
    specs = [shapes.random_spec(rng, heldout=i % 5 == 0) for i in range(count)]
    return [(spec, shapes.layout(spec, rng)) for spec in specs]


def rates(results):
    out = {}
    for name in shapes.PROPERTIES:
        values = [r[name] for r in results if r[name] is not None]
        out[name] = sum(values) / len(values)
    return out


@pytest.mark.parametrize("text, groups, relation", [
    ("a red circle", ((1, "red", "circle"),), None),
    ("three cyan triangles", ((3, "cyan", "triangle"),), None),
    ("a blue square to the left of a yellow circle",
     ((1, "blue", "square"), (1, "yellow", "circle")), "left"),
    ("a purple triangle below a green square", ((1, "purple", "triangle"), (1, "green", "square")),
     "below"),
])
def test_captions_parse_and_print_back(text, groups, relation):
    spec = shapes.parse_caption(text)
    assert spec == shapes.Spec(groups, relation)
    assert shapes.caption(spec) == text


@pytest.mark.parametrize("text", ["a red cat", "two red circle to the left of", "four red circles"])
def test_other_text_is_refused(text):
    with pytest.raises(HomediffError, match="not a shapes caption"):
        shapes.parse_caption(text)


def test_the_heldout_pairs_never_reach_training():
    rng = random.Random(0)
    for heldout in (False, True):
        for _ in range(500):
            spec = shapes.random_spec(rng, heldout)
            pairs = {(c, s) for _, c, s in spec.groups}
            assert bool(pairs & set(shapes.HELDOUT_PAIRS)) == heldout


def test_layouts_keep_gaps_and_state_relations_clearly():
    for spec, objects in scenes(300, seed=1):
        assert len(objects) == sum(n for n, _, _ in spec.groups)
        for i, a in enumerate(objects):
            assert a.side / 2 < a.cx < 1 - a.side / 2 and a.side / 2 < a.cy < 1 - a.side / 2
            assert all(shapes._apart(a, b) for b in objects[i + 1:])
        if spec.relation:
            assert shapes._holds(spec.relation, *objects)


def test_detect_reads_a_drawn_scene():
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse([4, 24, 22, 42], fill=shapes.COLOURS["red"])
    draw.rectangle([40, 8, 58, 26], fill=shapes.COLOURS["blue"])
    draw.polygon([(49, 38), (58, 56), (40, 56)], fill=shapes.COLOURS["yellow"])
    found = {(d.colour, d.shape): d for d in shapes.detect(image)}
    assert set(found) == {("red", "circle"), ("blue", "square"), ("yellow", "triangle")}
    assert found["red", "circle"].cx == pytest.approx(13.5 / 64, abs=0.01)
    assert found["blue", "square"].area == 19 * 19
    result = shapes.check(image, "a red circle to the left of a blue square")
    assert result == {"colour": False, "shape": False, "count": False, "objects": False,
                      "relation": True, "all": False}  # the yellow triangle was not asked for
    assert shapes.check(image, "a blue square above a yellow triangle")["relation"] is True
    assert shapes.check(image, "a blue square below a yellow triangle")["relation"] is False


@pytest.mark.parametrize("size", [32, 64])
def test_the_checker_reads_clean_scenes_back(size):
    results = [shapes.score(spec, shapes.detect(shapes.render(objects, size)))
               for spec, objects in scenes(300 if size == 32 else 120)]
    measured = rates(results)
    assert measured["colour"] >= 0.95 and measured["shape"] >= 0.95  # 100% when measured
    assert measured["all"] >= 0.95


def test_the_checker_tolerates_pixel_noise():
    generator = np.random.default_rng(0)
    results = []
    for spec, objects in scenes(150, seed=4):
        pixels = np.asarray(shapes.render(objects, 32)) / 255
        noisy = (pixels + generator.normal(0, 0.1, pixels.shape)).clip(0, 1)
        results.append(shapes.score(spec, shapes.detect(noisy)))
    measured = rates(results)
    assert measured["colour"] >= 0.95 and measured["shape"] >= 0.95  # 100% and 99% measured


def test_scrambled_captions_score_at_chance():
    """Pair each scene with another's caption: each property is right about as often as the two
    scenes' ground truth agree on it (computed from the specs, not from the checker)."""
    pairs = scenes(300, seed=2)
    images = [shapes.render(objects, 32) for _, objects in pairs]
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    results = [shapes.score(pairs[other[i]][0], shapes.detect(image))
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


def test_build_writes_a_folder_dataset_with_a_heldout_split(tmp_path):
    summary = shapes.build_shapes_dataset(tmp_path / "s", size=32, count=40, heldout=10, seed=3)
    assert (summary["train"], summary["heldout"]) == (40, 10)
    split = json.loads((tmp_path / "s/split.json").read_text())
    assert [e["file"] for e in split["heldout"]] == [f"heldout/shapes-{i:06d}.png" for i in range(10)]
    for part, count in (("train", 40), ("heldout", 10)):
        captions = sorted((tmp_path / "s" / part).glob("*.txt"))
        assert len(captions) == count == len(list((tmp_path / "s" / part).glob("*.png")))
        for path in captions:
            spec = shapes.parse_caption(path.read_text())
            used = {(c, s) for _, c, s in spec.groups}
            assert bool(used & set(shapes.HELDOUT_PAIRS)) == (part == "heldout")
    record = json.loads((tmp_path / "s/scenes.jsonl").read_text().splitlines()[0])
    image = Image.open(tmp_path / "s" / record["file"])
    assert image.size == (32, 32)
    assert shapes.check(image, record["caption"])["all"]
    shapes.build_shapes_dataset(tmp_path / "s", size=32, count=5, heldout=2)  # rebuild in place
    assert len(list((tmp_path / "s/train").glob("*.png"))) == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other/keep.txt").write_text("mine")
    with pytest.raises(HomediffError, match="not a shapes build"):
        shapes.build_shapes_dataset(tmp_path / "other", count=5)
