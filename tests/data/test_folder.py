import os

import pytest
import torch
from imagefiles import save_image
from PIL import Image

from homediff.data import DataConfig, FolderDataset, scan_folder
from homediff.data import folder as folder_module
from homediff.data.check import check_folder
from homediff.errors import HomediffError

CONFIG = DataConfig(size=16, captions={"caption_dropout": 0.0})


def kohya_tree(root):
    save_image(root / "top.png", caption="top")
    save_image(root / "UPPER.JPG", caption="upper")
    save_image(root / "3_cats" / "cat.jpeg", caption="cat")
    save_image(root / "3_cats" / "deeper" / "kitten.webp")  # no caption
    save_image(root / "2_dogs" / "1_pup" / "pup.bmp", caption="pup")
    save_image(root / "0_none" / "zero.png", caption="zero")
    save_image(root / ".hidden" / "secret.png", caption="hidden")
    (root / "readme.md").write_text("not data")
    (root / "orphan.txt").write_text("a caption without an image")
    return root


def test_scan_finds_images_recursively_with_captions_and_repeats(tmp_path):
    entries = {e.image: e for e in scan_folder(kohya_tree(tmp_path), cache=False)}
    assert sorted(entries) == ["0_none/zero.png", "2_dogs/1_pup/pup.bmp", "3_cats/cat.jpeg",
                               "3_cats/deeper/kitten.webp", "UPPER.JPG", "top.png"]
    assert entries["3_cats/cat.jpeg"].caption == "3_cats/cat.txt"
    assert entries["3_cats/deeper/kitten.webp"].caption is None
    assert entries["3_cats/deeper/kitten.webp"].repeats == 3  # nearest N_ folder above
    assert entries["2_dogs/1_pup/pup.bmp"].repeats == 1
    assert entries["0_none/zero.png"].repeats == 1  # 0 is no repeat count
    assert entries["top.png"].repeats == 1 and entries["UPPER.JPG"].caption == "UPPER.txt"


def test_repeat_folders_repeat_their_images(tmp_path):
    dataset = FolderDataset(kohya_tree(tmp_path), CONFIG, cache=False)
    assert len(dataset) == 1 + 1 + 3 + 3 + 1 + 1
    shown = [dataset.entries[dataset.entry(i)].image for i in range(len(dataset))]
    assert shown.count("3_cats/cat.jpeg") == 3 and shown.count("top.png") == 1
    captions = {dataset[i]["caption"] for i in range(len(dataset))}
    assert captions == {"top", "upper", "cat", "", "pup", "zero"}


def test_index_is_cached_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = kohya_tree(tmp_path / "data")
    cache = tmp_path / "index"
    first = scan_folder(root, cache)
    assert len(list(cache.iterdir())) == 1

    def no_walk(_root):
        raise AssertionError("the cache should have been used")
    with monkeypatch.context() as patch:
        patch.setattr(folder_module, "_walk", no_walk)
        assert scan_folder(root, cache) == first
    save_image(root / "3_cats" / "deeper" / "new.png")
    assert len(scan_folder(root, cache)) == len(first) + 1
    os.remove(root / "top.png")
    assert "top.png" not in {e.image for e in scan_folder(root, cache)}


def test_default_cache_folder_and_a_corrupt_cache(tmp_path):
    root = kohya_tree(tmp_path / "data")
    entries = scan_folder(root)  # conftest points XDG_CACHE_HOME into tmp_path
    (cache_file,) = (tmp_path / "cache" / "homediff" / "index").iterdir()
    cache_file.write_text("{not json")
    assert scan_folder(root) == entries


def test_index_of_many_files_takes_one_listing_not_a_call_per_file(tmp_path, monkeypatch):
    """What keeps indexing fast on a large folder: one directory listing, no stat of each file
    (pathlib's exists/is_file/stat all go through os.stat) and no image opened; a second scan
    reads the index cache and checks it with a stat of each folder."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3000):
        (data / f"{i:05d}.jpg").touch()
        if i % 2:
            (data / f"{i:05d}.txt").touch()
    calls = {"stat": 0, "open image": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(os, "stat", counted("stat", os.stat))
    monkeypatch.setattr(Image, "open", counted("open image", Image.open))
    entries = scan_folder(data, tmp_path / "cache-dir")
    assert len(entries) == 3000 and sum(e.caption is not None for e in entries) == 1500
    assert calls["stat"] <= 10 and calls["open image"] == 0, calls  # a few, not 3000
    calls["stat"] = 0
    assert scan_folder(data, tmp_path / "cache-dir") == entries
    assert calls["stat"] <= 10 and calls["open image"] == 0, calls


def test_samples_have_the_documented_shapes(tmp_path):
    save_image(tmp_path / "wide.png", 20, 40, caption="wide")
    sample = FolderDataset(tmp_path, CONFIG, cache=False)[0]
    assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.float32
    assert sample["pos"].shape == (256, 2)
    assert sample["aspect"] == pytest.approx(0.6931, abs=1e-4)
    assert sample["caption"] == "wide" and sample["key"].endswith("wide.png")
    assert sample["problems"] == []


def test_crops_repeat_per_index_and_change_across_epochs(tmp_path):
    save_image(tmp_path / "wide.png", 16, 64, caption="wide")
    dataset = FolderDataset(tmp_path, CONFIG, seed=7, cache=False)
    again = FolderDataset(tmp_path, CONFIG, seed=7, cache=False)
    assert torch.equal(dataset[0]["pos"], again[0]["pos"])
    offsets = {dataset[epoch * len(dataset)]["pos"][0, 1].item() for epoch in range(12)}
    assert len(offsets) > 3


def test_missing_or_empty_folder_raises(tmp_path):
    with pytest.raises(HomediffError, match="not a folder"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(HomediffError, match="no images found"):
        FolderDataset(tmp_path, cache=False)


def test_symlinked_folders_are_followed_once(tmp_path):
    save_image(tmp_path / "real" / "a.png", caption="a")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    found = [e.image for e in scan_folder(tmp_path, cache=False)]
    assert found in (["alias/a.png"], ["real/a.png"])


def test_folder_links_out_of_the_data_set_are_counted_named_and_not_scanned(tmp_path, caplog):
    data, system = tmp_path / "data", tmp_path / "system"
    save_image(data / "good.png", caption="good")
    (system / "lib").mkdir(parents=True)
    for i in range(3):
        (system / "lib" / f"{i}.png").touch()  # listed by a scan, never opened
    (data / "sys").symlink_to(system)
    (data / "sub").mkdir()
    (data / "sub" / "lib").symlink_to(system / "lib")
    cache = tmp_path / "index"
    for _ in range(2):  # scanned, then read from the index: said both times
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert [e.image for e in scan_folder(data, cache)] == ["good.png"]
        real = system.resolve()
        assert (f"{data.resolve()}: not scanned, 2 link(s) to folders outside it (sub/lib → "
                f"{real / 'lib'}, sys → {real}); set allow_outside_links") in caplog.text
    followed = [e.image for e in scan_folder(data, cache, outside_links=True)]
    assert followed == ["good.png", "sub/lib/0.png", "sub/lib/1.png", "sub/lib/2.png"] or \
        followed == ["good.png", "sys/lib/0.png", "sys/lib/1.png", "sys/lib/2.png"]
    config = DataConfig(size=16, allow_outside_links=True)
    assert len(FolderDataset(data, config, cache=False)) == 4
    assert len(FolderDataset(data, CONFIG, cache=False)) == 1
    assert check_folder(data, config, cache=False).samples == 4  # homediff data check
