"""``homediff data check`` and ``pack`` through the library and the command line."""

import pytest
from imagefiles import save_image
from PIL import Image

from homediff.app.cli import main
from homediff.data.check import check_folder


def mixed_folder(root):
    save_image(root / "good.jpg", 40, 60, caption="good")
    save_image(root / "sub" / "small.png", 8, 8, caption="small")
    save_image(root / "nocap.png", 40, 40)
    Image.new("CMYK", (40, 40), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    (root / "cmyk.txt").write_text("magenta")
    (root / "zero.webp").write_bytes(b"")
    (root / "fake.png").write_text("not an image")
    return root


def test_check_folder_lists_every_problem_with_its_path(tmp_path):
    report = check_folder(mixed_folder(tmp_path), size=16, cache=False)
    assert report.samples == 6 and report.usable == 4
    found = {(f.path.removeprefix(str(tmp_path) + "/"), f.kind, f.skipped) for f in report.findings}
    assert found == {("sub/small.png", "upscaled", False), ("nocap.png", "missing-caption", False),
                     ("cmyk.jpg", "converted", False), ("zero.webp", "empty", True),
                     ("fake.png", "not-an-image", True)}
    assert check_folder(tmp_path, size=None, workers=2, cache=False).counts()["upscaled"] == 0


def test_cli_check_prints_problems_and_a_summary(tmp_path, capsys):
    assert main(["data", "check", str(mixed_folder(tmp_path)), "--size", "16",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'zero.webp'}: SKIPPED: empty: the file has zero bytes" in out
    assert f"{tmp_path / 'cmyk.jpg'}: fixed: converted: CMYK converted to RGB" in out
    assert "6 samples: 4 usable, 2 skipped, 5 problems" in out
    assert "  empty: 1" in out


def test_cli_check_fails_when_nothing_is_usable(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"")
    save_image(tmp_path / "b.png")  # no caption: unusable with --skip-missing-captions
    assert main(["data", "check", str(tmp_path), "--skip-missing-captions", "--workers", "1"]) == 1
    assert "2 samples: 0 usable, 2 skipped" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "check", str(empty), "--summary"]) == 1


def test_cli_check_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_pack_then_check_the_shards(tmp_path, capsys):
    pytest.importorskip("webdataset")
    source = mixed_folder(tmp_path / "src")
    assert main(["data", "pack", str(source), str(tmp_path / "shards"), "--shard-size", "4"]) == 0
    assert "wrote 6 samples in 2 shards" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "shards"), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "6 samples: 4 usable, 2 skipped" in out
    assert "shard-00000" in out and "zero.webp: SKIPPED: empty" in out


def test_the_progress_bar_counts_usable_and_skipped_files():
    from homediff.data.check import CheckReport
    from homediff.data.problems import BadSample

    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, None

        def update(self):
            self.n += 1

        def set_postfix(self, refresh=True, **counts):
            self.postfix = counts

    bar, report = Bar(), CheckReport()
    for i in range(150):
        report.add(f"{i}.png", ([], BadSample("empty", "zero bytes") if i in (3, 120) else None), bar)
    assert bar.n == 150 and bar.postfix == {"usable": 119, "skipped": 2}  # as of the last skip (121st)
