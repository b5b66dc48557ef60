"""kohya's dataset conventions: the caption extension, extensions in any case, keep_tokens, caption
prefix and suffix, and a loud stop when most images have no caption."""

import pytest
import torch
from imagefiles import save_image

from homediff.app.cli import main
from homediff.data import DataConfig, FolderDataset
from homediff.data.captions import process_caption
from homediff.data.folder import scan_folder
from homediff.data.options import CaptionConfig
from homediff.errors import ConfigError


def test_caption_extension_and_any_case(tmp_path):
    save_image(tmp_path / "a.PNG", 8, 8)
    (tmp_path / "a.caption").write_text("from a .caption file")
    (tmp_path / "a.txt").write_text("from a .txt file")
    save_image(tmp_path / "b.png", 8, 8)
    (tmp_path / "b.TXT").write_text("upper-case extension")
    by_txt = {e.image: e.caption for e in scan_folder(tmp_path, cache=False)}
    assert by_txt == {"a.PNG": "a.txt", "b.png": "b.TXT"}
    by_caption = {e.image: e.caption for e in scan_folder(tmp_path, cache=False, caption_extension=".caption")}
    assert by_caption == {"a.PNG": "a.caption", "b.png": None}
    dataset = FolderDataset(tmp_path, DataConfig(size=8, caption_extension=".caption",
                                                 captions=CaptionConfig(caption_dropout=0.0)), cache=False)
    assert dataset[0]["caption"] == "from a .caption file"
    with pytest.raises(ConfigError, match="caption_extension must look like"):
        DataConfig(caption_extension="txt")


def test_keep_tokens_stay_first_in_order_and_prefix_and_suffix_are_added():
    config = CaptionConfig(keep_tokens=2, shuffle_tags=True, tag_dropout=0.5, caption_dropout=0.0,
                           prefix="sks, ", suffix=", best quality")
    seen = set()
    for seed in range(40):
        tags = process_caption("1girl, red hair, smile, outdoors", config,
                               torch.Generator().manual_seed(seed)).split(", ")
        assert tags[:2] == ["sks", "1girl"]  # the prefix counts as a tag, as in kohya
        assert set(tags[2:]) <= {"red hair", "smile", "outdoors", "best quality"}
        seen.add(tuple(tags[2:]))
    assert len(seen) > 5  # the rest is shuffled and dropped
    with pytest.raises(ConfigError, match="keep_tokens must be >= 0"):
        CaptionConfig(keep_tokens=-1)


def test_a_folder_where_most_captions_are_missing_stops_training_and_warns_in_check(tmp_path, capsys):
    from homediff.training.batches import BatchStream
    from homediff.training.config import DatasetSection

    for i in range(4):
        save_image(tmp_path / f"{i}.png", 8, 8, seed=i)
        (tmp_path / f"{i}.caption").write_text(f"image {i}")
    save_image(tmp_path / "4.png", 8, 8, caption="the only .txt")
    with pytest.raises(ConfigError, match=r"4 of 5 images \(80%\) have no .txt caption file: set "
                                          r"dataset.options.caption_extension"):
        BatchStream(DatasetSection(path=str(tmp_path), workers=0), 8, 2, seed=0)
    assert BatchStream(DatasetSection(path=str(tmp_path), workers=0,
                                      options=DataConfig(caption_extension=".caption")), 8, 2, seed=0)
    lenient = DataConfig(max_missing_captions=1.0)
    assert BatchStream(DatasetSection(path=str(tmp_path), workers=0, options=lenient), 8, 2, seed=0)
    assert main(["data", "check", str(tmp_path), "--workers", "1"]) == 0
    assert "WARNING: 4 of 5 images (80%) have no .txt caption file" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path), "--workers", "1", "--caption-extension", ".caption"]) == 0
    assert "WARNING" not in capsys.readouterr().err
