import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_components import OFFICIAL_SMALL

from homediff.errors import CheckpointError, ConfigError
from homediff.models import XUT, XUTConfig, load_hdm_checkpoint
from homediff.hdm_release import to_hdm_release


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


@pytest.mark.parametrize("key, kind", [("lycoris_model.unet_x.lora_down.weight", "LoCon"),
                                       ("lycoris_model.unet_x.hada_w1_a", "LoHa"),
                                       ("lycoris_model.unet_x.lokr_w1", "LoKr")])
def test_a_file_with_a_lycoris_fine_tune_is_refused(tmp_path, official, key, kind):
    """The original's LyCORIS fine-tunes keep their tensors beside the backbone: loading the file
    must fail, not give the base model."""
    arch, state = official
    release = {"unet.model." + k: v for k, v in state.items()} | {key: torch.zeros(2)}
    path = save(tmp_path / "ft.safetensors", release)
    with pytest.raises(CheckpointError, match=f"ft.safetensors holds a LyCORIS fine-tune \\({kind}: 1 tensors"):
        load_hdm_checkpoint(path, arch)


def test_meta_file_and_json_path_as_arch(tmp_path, official_small):
    model = load_hdm_checkpoint(official_small / "model.safetensors", official_small / "meta.json")
    assert isinstance(model, XUT) and model.config.rope_init == "hdm"


@pytest.mark.parametrize("overrides", [
    {}, {"enc_blocks": [1, 2, 1, 1], "dec_blocks": [3, 2, 2, 1], "in_channels": 16, "patch_size": 1},
    {"tread_pre_blocks": 0, "tread_post_blocks": 0, "tread_rate": 0.0, "aspect_embedding": False},
    {"tread_rate": 0.0, "rope_init": "spaced", "gradient_checkpointing": True}])
def test_hdm_arch_config_round_trips(overrides):
    config = XUTConfig(**overrides)
    back = XUTConfig.from_hdm_config(config.to_hdm_config())
    assert back == dataclasses.replace(config, rope_init="hdm", gradient_checkpointing=False)


def test_official_arch_config_is_written_back(official):
    arch, _ = official
    written = XUTConfig.from_hdm_config(arch).to_hdm_config()
    assert written == {k: v for k, v in arch.items() if k != "ctx_size"}  # ctx_size: left at default


@pytest.mark.parametrize("overrides, message", [({"skip": "mirror"}, "model.skip='mirror'"),
                                                ({"skip": "none"}, "model.skip='none'"),
                                                ({"pooled_text": True}, "pooled_text")])
def test_options_the_original_lacks_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        XUTConfig(**overrides).to_hdm_config()


def test_release_layout_uses_the_original_key_names(tmp_path, official):
    arch, state = official  # float16 weights, so the float16 export must give them back exactly
    model = load_hdm_checkpoint(OFFICIAL_SMALL / "model.safetensors", arch)
    mean, std = torch.arange(4.0), torch.arange(1.0, 5.0)
    tensors, written = to_hdm_release(model, {"decoder.conv_out.bias": torch.ones(3)}, mean, std,
                                      {"norm.weight": torch.ones(96)})
    assert written == model.config.to_hdm_config()
    backbone = {k.removeprefix("unet.model."): v for k, v in tensors.items() if k.startswith("unet.model.")}
    assert backbone.keys() == state.keys()
    assert all(torch.equal(backbone[k], v) and backbone[k].dtype == v.dtype for k, v in state.items())
    assert tensors["vae.decoder.conv_out.bias"].dtype == torch.float16
    assert tensors["te.text_models.0.norm.weight"].dtype == torch.float16
    assert torch.equal(tensors["vae_mean"], mean.view(1, 4, 1, 1))
    assert tensors["vae_std"].shape == (1, 4, 1, 1) and tensors["vae_std"].dtype == torch.float32
    again = load_hdm_checkpoint(save(tmp_path / "hdm.safetensors", tensors), written)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_release_layout_refuses_unfused_adapters(official):
    pytest.importorskip("peft")
    from homediff.models import lora

    model = XUT.from_hdm_config(official[0])
    lora.add_adapter(model, lora.LoraSettings(rank=2))
    with pytest.raises(ConfigError, match="LoRA adapters that are not fused"):
        to_hdm_release(model, {}, torch.zeros(4), torch.ones(4))
    lora.fuse(model)
    tensors, _ = to_hdm_release(model, {}, torch.zeros(4), torch.ones(4))
    assert "unet.model.backbone.enc_blocks.0.0.attn.qkv.weight" in tensors
    assert not any("lora_" in k or "base_layer" in k for k in tensors)
