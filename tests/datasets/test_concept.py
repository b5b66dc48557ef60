import json

import pytest
from imagefiles import save_image

from homediff.app.cli import main
from homediff.datasets.concept import build_concept_set
from homediff.data.folder import scan_folder
from homediff.errors import HomediffError


def test_a_concept_set_renames_the_concept_and_keeps_a_prior(tmp_path):
    source = tmp_path / "source"
    captions = ["black cat", "cat face", "red apple", "rocket", "catalogue", "grinning Cat"]
    for i, caption in enumerate(captions):
        save_image(source / f"{i}.png", 8, 8, seed=i, caption=caption)
    record = build_concept_set(source, tmp_path / "out", word="zorp", match="cat", prior=2, repeats=3)
    assert record["concept_images"] == 3 and record["prior_images"] == 2
    concept = sorted((tmp_path / "out" / "3_zorp").glob("*.txt"))
    assert sorted(p.read_text() for p in concept) == ["black zorp", "grinning zorp", "zorp face"]
    prior = [p.read_text() for p in (tmp_path / "out" / "1_prior").glob("*.txt")]
    assert len(prior) == 2 and not any("zorp" in text for text in prior)  # "catalogue" is no cat
    entries = scan_folder(tmp_path / "out", cache=False)
    assert sum(e.repeats for e in entries) == 3 * 3 + 2
    assert json.loads((tmp_path / "out" / "concept.json").read_text())["word"] == "zorp"
    with pytest.raises(HomediffError, match="not empty"):
        build_concept_set(source, tmp_path / "out", word="zorp", match="cat")
    assert main(["data", "concept", str(source), str(tmp_path / "none"), "--match", "dragon"]) == 2
