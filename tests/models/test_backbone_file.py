"""The backbone in one file (``RUN/model.safetensors``): written, recognised and read back."""

import torch
from tiny_components import hdm_release, tiny_xut

from homediff.models.backbone_file import is_backbone_file, load_backbone_file, save_backbone_file


def test_the_file_reads_back_as_the_same_backbone(tmp_path):
    model = tiny_xut(seed=3)
    save_backbone_file(tmp_path / "model.safetensors", model)
    loaded = load_backbone_file(tmp_path / "model.safetensors")
    assert loaded.config == model.config and not loaded.training
    state = model.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in loaded.state_dict().items())


def test_only_a_file_with_the_config_is_recognised(tmp_path):
    save_backbone_file(tmp_path / "model.safetensors", tiny_xut())
    assert is_backbone_file(tmp_path / "model.safetensors")
    assert not is_backbone_file(hdm_release(tmp_path / "release").checkpoint)
    assert not is_backbone_file(tmp_path / "missing.safetensors") and not is_backbone_file(tmp_path)
