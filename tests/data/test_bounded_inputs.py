"""Inputs that would cost unbounded time or memory, or reach outside the data set, are named skips
on which ``data check`` and training agree."""

import os
import subprocess
import sys

import pytest
import torch
from imagefiles import save_image
from PIL import Image

from homediff.app.cli import main
from homediff.data import DataConfig, FolderDataset
from homediff.data.captions import decode_caption
from homediff.data.check import check_folder
from homediff.data.shards import dataset_kind
from homediff.errors import ConfigError


def strip(path, width, height):
    Image.new("RGB", (width, height), "white").save(path)  # a 20000×1 PNG is about 100 bytes


def findings(folder, **options) -> dict[str, set]:
    """Each file's (kind, skipped) findings from ``data check`` at crop size 8."""
    report = check_folder(folder, DataConfig(**options), size=8, workers=1, cache=False)
    found: dict[str, set] = {}
    for f in report.findings:
        found.setdefault(os.path.basename(f.path), set()).add((f.kind, f.skipped))
    return found


def trained_on(folder, **options) -> set[str]:
    """The files a training epoch over ``folder`` reads, and the skips it counts."""
    dataset = FolderDataset(folder, DataConfig(size=8, **options), cache=False)
    keys = {os.path.basename(dataset[i]["key"]) for i in range(len(dataset))}
    return keys, dict(dataset.problems.counts)


def test_an_extreme_strip_is_skipped_by_check_and_training_alike(tmp_path):
    strip(tmp_path / "strip.png", 20000, 1)
    save_image(tmp_path / "good.png", 16, 16)
    assert ("extreme-aspect", True) in findings(tmp_path)["strip.png"]
    keys, counts = trained_on(tmp_path)
    assert keys == {"good.png"} and counts["extreme-aspect"] >= 1
    allowed = findings(tmp_path, max_aspect=30000)["strip.png"]  # allowed when asked: upscaled
    assert ("upscaled", False) in allowed and not any(skipped for _, skipped in allowed)


def test_the_position_map_is_built_for_the_crop_window_only(tmp_path):
    """A 20000×4 strip allowed through: the sample's map is the window's 8×8, equal to that window
    of the whole image's canonical grid (built here only to compare)."""
    from homediff.data.crop import resized_size, shifted_square_crop
    from homediff.geometry import canonical_grid, crop_window

    image = Image.new("RGB", (20000, 4), "white")
    crop = shifted_square_crop(image, 8, "center")
    full_h, full_w = resized_size(4, 20000, 8)
    assert crop.pos.shape == (64, 2)
    left = (full_w - 8) // 2
    whole = canonical_grid(full_h, full_w).view(full_h, full_w, 2)[:, left:left + 8].reshape(-1, 2)
    assert torch.equal(crop.pos, whole)
    assert torch.equal(crop_window(6, 9, 1, 2, 4, 5),
                       canonical_grid(6, 9).view(6, 9, 2)[1:5, 2:7].reshape(-1, 2))


def test_a_fifo_named_like_an_image_is_never_read(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the check runs in a child process
    with a deadline, and must finish (it opens without blocking and refuses what is not a file)."""
    save_image(tmp_path / "good.png", 16, 16)
    os.mkfifo(tmp_path / "x.png")
    result = subprocess.run([sys.executable, "-m", "homediff", "data", "check", str(tmp_path),
                             "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert "x.png: SKIPPED: not-a-file" in result.stdout, result.stdout + result.stderr
    assert "1 usable, 1 skipped" in result.stdout


def test_links_out_of_the_data_set_are_refused(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    save_image(data / "good.png", 16, 16, caption="a good one")
    save_image(elsewhere / "private.png", 16, 16)
    (elsewhere / "secret.txt").write_text("a system file's contents")
    os.symlink(elsewhere / "private.png", data / "linked.png")
    os.symlink("/dev/zero", data / "zero.png")
    save_image(data / "captioned.png", 16, 16)
    os.symlink(elsewhere / "secret.txt", data / "captioned.txt")
    found = findings(data)
    for name in ("linked.png", "zero.png", "captioned.png"):
        assert ("outside-root", True) in found[name], name
    keys, _ = trained_on(data)
    assert keys == {"good.png"}
    allowed = findings(data, allow_outside_links=True)
    assert not any(skipped for _, skipped in allowed.get("linked.png", ()))
    assert ("not-a-file", True) in allowed["zero.png"]


def test_files_over_the_byte_limit_are_skipped_without_reading_them_whole(tmp_path):
    save_image(tmp_path / "big.png", 64, 64, seed=3)
    save_image(tmp_path / "small.png", 8, 8)
    limit = os.path.getsize(tmp_path / "small.png") + 1
    assert ("file-too-big", True) in findings(tmp_path, max_file_bytes=limit)["big.png"]


@pytest.mark.parametrize("order", ["utf-16-le", "utf-16-be"])
def test_a_utf16_caption_without_a_byte_order_mark_is_decoded(order):
    notes = []
    assert decode_caption("a red fox, snow".encode(order), notes) == "a red fox, snow"
    assert notes == [("caption-utf16", f"no byte-order mark, decoded as {order.upper()}")]
    notes = []
    text = decode_caption(b"a\x00b", notes)  # odd length: not UTF-16 either
    assert "\x00" not in text and notes[0][0] == "caption-not-utf8"


def test_a_folder_with_both_images_and_shards_says_which_to_choose(tmp_path, capsys):
    save_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "stray.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match='both .tar shards and images: say which to read with '
                                          'dataset.kind = "shards" or "folder"'):
        dataset_kind(tmp_path)
    assert dataset_kind(tmp_path, "folder") == "folder"
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "both .tar shards and images" in capsys.readouterr().err


def test_shards_apply_the_same_limits(tmp_path):
    from homediff.data import pack_folder
    from homediff.data.check import check_shards

    folder = tmp_path / "folder"
    folder.mkdir()
    strip(folder / "strip.png", 20000, 1)
    save_image(folder / "good.png", 16, 16, caption="good")
    save_image(folder / "chatty.png", 16, 16)
    (folder / "chatty.txt").write_bytes(b"word, " * 200_000)  # a 1.2 MB caption
    pack_folder(folder, tmp_path / "shards", shard_size=2)
    report = check_shards(tmp_path / "shards", DataConfig(), size=8)
    kinds = {f.path.rsplit(":", 1)[1]: (f.kind, f.skipped) for f in report.findings}
    assert kinds == {"strip.png": ("extreme-aspect", True), "chatty.png": ("file-too-big", True)}
    assert report.usable == 1
