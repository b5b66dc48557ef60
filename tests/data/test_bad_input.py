"""Point 6 of issue 3: every kind of bad input, as a real malformed file, never stops a run."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from imagefiles import save_image
from PIL import Image

from homediff.data import DataConfig, FolderDataset, make_loader
from homediff.data.problems import BadSample
from homediff.data.transform import load

CONFIG = DataConfig(size=16)


def load_file(path, config=CONFIG, caption=b"a caption", size=16):
    notes = []
    image, text = load(path.read_bytes(), caption, config, notes, size)
    return np.asarray(image), text, notes


def kinds(notes):
    return [kind for kind, _ in notes]


def skip_kind(path, config=CONFIG, caption=b"a caption"):
    with pytest.raises(BadSample) as info:
        load(path.read_bytes(), caption, config, [], 16)
    return info.value.kind


def png_with_header(width, height):
    """A PNG whose header claims width × height (the pixel data is a few bytes)."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


def test_zero_byte_file_is_skipped(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert skip_kind(path) == "empty"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_is_skipped(tmp_path, suffix):
    path = save_image(tmp_path / f"cut{suffix}", 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert skip_kind(path) == "truncated"


def test_non_image_with_image_extension_is_skipped(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert skip_kind(path) == "not-an-image"


def test_unreadable_file_is_skipped(tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing-target.png")
    save_image(tmp_path / "ok.png")
    dataset = FolderDataset(tmp_path, CONFIG, cache=False)
    assert [e.image for e in dataset.entries] == ["gone.png", "ok.png"]
    for index in range(20):
        assert dataset[index]["key"].endswith("ok.png")
    assert dataset.problems.counts["unreadable"] >= 1


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    pixels, _, notes = load_file(path)
    assert np.abs(pixels.astype(int) - [255, 0, 0]).max() < 8
    assert kinds(notes) == ["converted"] and "CMYK" in notes[0][1]


def test_grey_l_becomes_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (16, 16), 100).save(path)
    pixels, _, notes = load_file(path)
    assert (pixels == 100).all() and pixels.shape == (16, 16, 3)
    assert kinds(notes) == ["converted"]


def test_la_transparent_is_composited_on_white(tmp_path):
    path = tmp_path / "la.png"
    image = Image.new("LA", (16, 16), (0, 255))
    image.paste((0, 0), (0, 0, 8, 16))  # left half transparent black
    image.save(path)
    pixels, _, notes = load_file(path)
    assert (pixels[:, :8] == 255).all() and (pixels[:, 8:] == 0).all()
    assert "transparency" in notes[0][1]


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 8, 16))
    image.save(path, transparency=0)
    pixels, _, notes = load_file(path)
    assert (pixels[:, :8] == 255).all()
    assert (pixels[:, 8:] == [255, 0, 0]).all()
    assert kinds(notes) == ["converted"] and notes[0][1].startswith("P ")


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, 8:] = 65535
    values[:8, :8] = 32896  # 128 · 257
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    pixels, _, notes = load_file(path)
    assert (pixels[8:, :8] == 0).all() and (pixels[:8, :8] == 128).all()
    assert (pixels[:, 8:] == 255).all()
    assert "I;16" in notes[0][1]


def test_rgba_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, 4:8, 3] = 255
    rgba[:, 8:, 3] = 128
    Image.fromarray(rgba).save(path)
    pixels, _, _ = load_file(path)
    assert (pixels[:, :4] == 255).all()  # transparent → white
    assert (pixels[:, 4:8] == [255, 0, 0]).all()
    assert np.abs(pixels[:, 8:].astype(int) - [255, 127, 127]).max() <= 1


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    image.save(path, exif=exif.tobytes(), quality=95)
    pixels, _, notes = load_file(path)
    assert pixels.shape == (40, 20, 3)  # portrait once rotated
    assert pixels[5, 10, 0] > 200 and pixels[35, 10, 2] > 200  # red on top, blue below
    assert kinds(notes) == ["exif-rotated"]
    crop = FolderDataset(tmp_path, DataConfig(size=16, captions={"caption_dropout": 0}),
                         cache=False)[0]
    assert crop["aspect"] == pytest.approx(np.log(20 / 40))


def test_small_image_is_upscaled_or_skipped_by_min_size(tmp_path):
    path = save_image(tmp_path / "tiny.png", 8, 12)
    pixels, _, notes = load_file(path)
    assert kinds(notes) == ["upscaled"]
    assert skip_kind(path, DataConfig(size=16, min_size=10)) == "too-small"
    sample = FolderDataset(tmp_path, CONFIG, cache=False)[0]
    assert sample["image"].shape == (3, 16, 16) and "upscaled" in sample["problems"]


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    huge = tmp_path / "bomb.png"
    huge.write_bytes(png_with_header(30_000, 30_000))  # over Pillow's own hard limit
    assert skip_kind(huge) == "too-large"
    large = tmp_path / "large.png"
    large.write_bytes(png_with_header(9_000, 9_000))  # 81 Mpx: over our 67 Mpx default
    assert skip_kind(large) == "too-large"
    small = save_image(tmp_path / "limit.png", 100, 100)
    assert skip_kind(small, DataConfig(size=16, max_pixels=5_000)) == "too-large"


def test_missing_caption_is_empty_or_skipped(tmp_path):
    path = save_image(tmp_path / "bare.png")
    _, text, notes = load_file(path, caption=None)
    assert text == "" and kinds(notes) == ["missing-caption"]
    skip = DataConfig(size=16, missing_caption="skip")
    assert skip_kind(path, skip, caption=None) == "no-caption"


def test_caption_not_utf8_is_decoded_with_replacement(tmp_path):
    path = save_image(tmp_path / "latin1.png")
    path.with_suffix(".txt").write_bytes("café au lait".encode("latin-1"))
    config = DataConfig(size=16, captions={"caption_dropout": 0})
    sample = FolderDataset(tmp_path, config, cache=False)[0]
    assert sample["caption"] == "caf\ufffd au lait"
    assert sample["problems"] == ["caption-not-utf8"]


def bad_folder(root):
    for i in range(3):
        save_image(root / f"good{i}.jpg", 20, 30, seed=i, caption=f"good {i}")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("hello")
    data = save_image(root / "cut.jpg", 64, 64).read_bytes()
    (root / "cut.jpg").write_bytes(data[:300])
    (root / "bomb.png").write_bytes(png_with_header(30_000, 30_000))
    (root / "link.png").symlink_to(root / "nowhere.png")
    return root


def test_skipped_samples_are_replaced_so_batches_stay_full(tmp_path):
    dataset = FolderDataset(bad_folder(tmp_path), CONFIG, cache=False)
    assert len(dataset) == 8
    loader = make_loader(dataset, batch_size=4, workers=0)
    skipped = 0
    for _ in range(3):  # epochs
        for batch in loader:
            assert batch["image"].shape == (4, 3, 16, 16)
            assert all("good" in key for key in batch["key"])
            skipped += sum(batch["problems"].get(k, 0) for k in
                           ("empty", "not-an-image", "truncated", "too-large", "unreadable"))
    assert skipped >= 5  # each bad file counted, the first time at least
    assert set(dataset.problems.counts) == {"empty", "not-an-image", "truncated", "too-large",
                                            "unreadable"}


def test_each_bad_file_is_logged_once_with_its_path(tmp_path, caplog):
    dataset = FolderDataset(bad_folder(tmp_path), CONFIG, cache=False)
    dataset._bad.clear()
    empty = next(i for i, e in enumerate(dataset.entries) if e.image == "empty.png")
    with caplog.at_level(logging.WARNING, logger="homediff.data"):
        for _ in range(3):
            dataset._bad.clear()
            dataset[empty]
    messages = [r.getMessage() for r in caplog.records if "empty.png" in r.getMessage()]
    assert len(messages) == 1 and str(tmp_path / "empty.png") in messages[0]
    assert dataset.problems.counts["empty"] == 3


def test_all_bad_raises_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("no")
    dataset = FolderDataset(tmp_path, CONFIG, cache=False, max_tries=10)
    with pytest.raises(Exception, match="homediff data check"):
        dataset[0]


def test_decoding_from_bytes_matches_reading_the_file(tmp_path):
    path = save_image(tmp_path / "x.webp", 30, 20, lossless=True)
    image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
    pixels, _, notes = load_file(path)
    assert np.array_equal(pixels, np.asarray(image)) and notes == []
    assert torch.is_tensor(FolderDataset(tmp_path, CONFIG, cache=False)[0]["image"])
