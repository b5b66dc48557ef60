import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from homediff.errors import CheckpointError
from homediff.models import XUT, load_hdm_checkpoint


@pytest.fixture
def official(official_small):
    meta = json.loads((official_small / "meta.json").read_text())
    return meta["config"], load_file(official_small / "model.safetensors")


def save(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("prefix", ["unet.model.", "model."])
def test_prefixed_release_with_other_components(tmp_path, official, prefix, caplog):
    arch, state = official
    release = {prefix + k: v for k, v in state.items()}
    release.update({"vae.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3),
                    "te.text_models.0.norm.weight": torch.zeros(8),
                    "vae_mean": torch.zeros(1, 4, 1, 1), "vae_std": torch.ones(1, 4, 1, 1)})
    with caplog.at_level("INFO"):
        model = load_hdm_checkpoint(save(tmp_path / "release.safetensors", release), arch)
    assert "ignoring 4 tensors" in caplog.text
    assert torch.equal(model.state_dict()["ctx_proj.weight"], state["ctx_proj.weight"].float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_loads_any_float_dtype(tmp_path, official, dtype):
    arch, state = official
    path = save(tmp_path / "w.safetensors", {k: v.to(dtype) for k, v in state.items()})
    model = load_hdm_checkpoint(path, arch)
    assert model.in_patch.proj.weight.dtype == torch.float32
    assert not model.training


def test_lightning_style_torch_checkpoint(tmp_path, official):
    arch, state = official
    torch.save({"state_dict": {"unet.model." + k: v for k, v in state.items()}}, tmp_path / "a.ckpt")
    model = load_hdm_checkpoint(tmp_path / "a.ckpt", arch)
    assert torch.equal(model.state_dict()["out_patch.proj.bias"], state["out_patch.proj.bias"].float())


def test_missing_key_is_named(tmp_path, official):
    arch, state = official
    state = dict(state)
    del state["backbone.enc_blocks.0.0.attn.qkv.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): backbone.enc_blocks.0.0.attn.qkv"):
        load_hdm_checkpoint(save(tmp_path / "w.safetensors", state), arch)


def test_wrong_shape_is_named(tmp_path, official):
    arch, state = official
    state = dict(state, **{"ctx_proj.weight": torch.zeros(128, 95)})
    with pytest.raises(CheckpointError, match=r"ctx_proj.weight: file \(128, 95\) vs model \(128, 96\)"):
        load_hdm_checkpoint(save(tmp_path / "w.safetensors", state), arch)


def test_unexpected_key_is_named(tmp_path, official):
    arch, state = official
    state = dict(state, **{"backbone.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): backbone.extra.weight"):
        load_hdm_checkpoint(save(tmp_path / "w.safetensors", state), arch)


def test_unknown_prefix_is_named(tmp_path, official):
    arch, state = official
    state = {"diffusion_model." + k: v for k, v in state.items()}
    with pytest.raises(CheckpointError, match="unknown prefix 'diffusion_model.'"):
        load_hdm_checkpoint(save(tmp_path / "w.safetensors", state), arch)


def test_unreadable_file(tmp_path, official):
    arch, _ = official
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.safetensors: cannot read"):
        load_hdm_checkpoint(bad, arch)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_hdm_checkpoint(tmp_path / "absent.safetensors", arch)


def test_meta_file_and_json_path_as_arch(tmp_path, official_small):
    model = load_hdm_checkpoint(official_small / "model.safetensors", official_small / "meta.json")
    assert isinstance(model, XUT) and model.config.rope_init == "hdm"
