import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.caching import TensorShards
from homediff.errors import ConfigError
from homediff.training.loop import Trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def test_training_with_caches_matches_training_without(assets, tmp_path, caplog):
    plain = Trainer(tiny_config(*assets), tmp_path / "plain")
    plain.run()
    config = tiny_config(*assets, train={"cache_text": True, "cache_latents": True, "sample_prompts": []})
    with caplog.at_level("INFO"):
        cached = Trainer(config, tmp_path / "cached")
        cached.run()
    assert "caching latents" in caplog.text and "KiB per entry" in caplog.text
    text = TensorShards(tmp_path / "cached" / "cache" / "text-rank0")
    latents = TensorShards(tmp_path / "cached" / "cache" / "latents-rank0")
    assert len(text) == 8 + 1  # eight captions and the empty one (caption dropout)
    assert len(latents) > 8  # one per image and crop window
    a = [loss for _, loss in plain.progress.losses]
    b = [loss for _, loss in cached.progress.losses]
    # The caches store text states and latents in float16, each within ½ ulp (eps16 / 2) of the
    # float32 value; a squared error doubles that: ≤ eps16 of the loss at the first step. Each of
    # the 10 steps trains on such inputs and can add as much again: 10·eps16, 16·eps16 ≈ 1.6 %.
    assert b == pytest.approx(a, rel=16 * torch.finfo(torch.float16).eps)


def test_text_cache_needs_fixed_length_padding(assets):
    options = {"padding": "longest", "max_length": 6, "dtype": "float32"}
    with pytest.raises(ConfigError, match="max_length"):
        tiny_config(*assets, train={"cache_text": True},
                    text_encoder={"name": str(assets[1]), "options": options})
