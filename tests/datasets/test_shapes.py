import json
import random

import pytest
from PIL import Image

from homediff.datasets import shapes
from homediff.errors import HomediffError
from homediff.evaluation.shape_checker import check


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


def test_layouts_keep_gaps_and_state_relations_clearly(shape_scenes):
    for spec, objects in shape_scenes(300, seed=1):
        assert len(objects) == sum(n for n, _, _ in spec.groups)
        for i, a in enumerate(objects):
            assert a.side / 2 < a.cx < 1 - a.side / 2 and a.side / 2 < a.cy < 1 - a.side / 2
            assert all(shapes._apart(a, b) for b in objects[i + 1:])
        if spec.relation:
            assert shapes._holds(spec.relation, *objects)


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
    assert check(image, record["caption"])["all"]
    shapes.build_shapes_dataset(tmp_path / "s", size=32, count=5, heldout=2)  # rebuild in place
    assert len(list((tmp_path / "s/train").glob("*.png"))) == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other/keep.txt").write_text("mine")
    with pytest.raises(HomediffError, match="not a shapes build"):
        shapes.build_shapes_dataset(tmp_path / "other", count=5)
