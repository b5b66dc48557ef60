import pytest
import torch
from imagefiles import save_image

from homediff.data.transform import DataConfig, make_sample, sample_seed
from homediff.errors import ConfigError


@pytest.mark.parametrize("options,field", [({"size": 0}, "size"), ({"crop": "stretch"}, "crop"),
                                           ({"flip": 2.0}, "flip"),
                                           ({"missing_caption": "fail"}, "missing_caption"),
                                           ({"captions": {"tag_dropout": -1}}, "tag_dropout")])
def test_bad_config_values_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**options)


def test_sample_seeds_differ_per_part_and_repeat():
    seeds = {sample_seed(0, epoch, index) for epoch in range(20) for index in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(1, 3, 2)


def test_make_sample_repeats_with_the_generator(tmp_path):
    path = save_image(tmp_path / "x.jpg", 40, 90, caption="a, b, c, d")
    config = DataConfig(size=24, flip=0.5, captions={"tag_dropout": 0.3})
    data, caption = path.read_bytes(), path.with_suffix(".txt").read_bytes()

    def run(seed):
        return make_sample(data, caption, "x", config, torch.Generator().manual_seed(seed))[0]
    first, again = run(11), run(11)
    assert torch.equal(first["image"], again["image"]) and first["caption"] == again["caption"]
    assert first["image"].shape == (3, 24, 24) and first["pos"].shape == (576, 2)
    assert len({(run(s)["pos"][0, 1].item(), run(s)["caption"]) for s in range(10)}) > 3
