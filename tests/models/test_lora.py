"""LoRA adapters on the backbone and in the pipeline: scale 0 is the base model bit for bit, saved
adapters load back exactly, fused equals unfused within float32 round-off, several adapters mix."""

import pytest
import torch
from tiny_components import qwen_folder, random_adapter, tiny_vae, tiny_xut

from homediff.encoders.autoencoders import KLAutoencoder
from homediff.encoders.text import TextEncoder
from homediff.errors import CheckpointError, ConfigError
from homediff.models import lora
from homediff.pipeline import HomeDiffPipeline

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return TextEncoder.from_pretrained(qwen_folder(tmp_path_factory.mktemp("lora") / "qwen"), dtype="float32")


def pipeline(encoder) -> HomeDiffPipeline:
    return HomeDiffPipeline(tiny_xut(), encoder, KLAutoencoder(tiny_vae()), sample_size=16)


def image(pipe, seed=0) -> torch.Tensor:
    return pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


SETTINGS = lora.LoraSettings(rank=4, alpha=4.0, targets=("attention", "cross_attention", "mlp", "adaln", "text"))


def test_targets_select_the_named_layers():
    model = tiny_xut()
    names = lora.target_modules(model, ["attention"])
    assert names and all(n.endswith(("attn.qkv", "attn.out")) and ".xattn." not in n for n in names)
    assert lora.target_modules(model, ["text"]) == ["ctx_proj"]
    assert all("shared_adaln" in n for n in lora.target_modules(model, ["adaln"]))
    with pytest.raises(ConfigError, match="LoRA targets must be some of"):
        lora.LoraSettings(targets=("attention", "everything"))


def test_a_new_adapter_changes_nothing_and_only_it_trains():
    model, base = tiny_xut(), tiny_xut()
    lora.add_adapter(model, SETTINGS)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 32)
    assert torch.equal(model(x, t, ctx), base(x, t, ctx))  # B starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert lora.base_state(model).keys() == base.state_dict().keys()


def test_scale_zero_is_the_base_model_bit_for_bit_and_unload_restores_it(encoder, tmp_path):
    pipe = pipeline(encoder)
    base = image(pipe)
    pipe.load_lora_weights(random_adapter(tmp_path / "a.safetensors", SETTINGS, 1), scale=0.0)
    assert torch.equal(image(pipe), base)
    pipe.set_adapters(["adapter_0"], [1.0])
    assert not torch.equal(image(pipe), base)
    pipe.unload_lora_weights()
    assert torch.equal(image(pipe), base) and pipe.get_active_adapters() == []


def test_saved_adapters_load_back_exactly(encoder, tmp_path):
    pipe = pipeline(encoder)
    path = random_adapter(tmp_path / "a.safetensors", SETTINGS, 2)
    settings, state = lora.read_adapter(path)
    assert settings == SETTINGS
    name = pipe.load_lora_weights(path, adapter_name="style", scale=0.7)
    again = lora.adapter_state(pipe.transformer, name)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    first = image(pipe)
    pipe.save_pretrained(tmp_path / "folder")
    loaded = HomeDiffPipeline.from_pretrained(tmp_path / "folder")
    assert loaded.get_active_adapters() == ["style"] and loaded.lora_scales == {"style": 0.7}
    assert torch.equal(image(loaded), first)


def test_fused_equals_unfused_within_float32_roundoff(encoder, tmp_path):
    pipe = pipeline(encoder)
    pipe.load_lora_weights(random_adapter(tmp_path / "a.safetensors", SETTINGS, 3), scale=0.8)
    pipe.load_lora_weights(random_adapter(tmp_path / "b.safetensors", SETTINGS, 4), scale=-0.5)
    unfused = image(pipe)
    pipe.fuse_lora()
    fused = image(pipe)
    # a fused weight is W + ΔW rounded once instead of two products added: each output differs
    # by a few ulps, which two sampling steps and the decoder carry to the image
    assert (fused - unfused).abs().max() <= 2**10 * EPS32
    with pytest.raises(ConfigError, match="adapters are fused"):
        pipe.save_pretrained(tmp_path / "nope")
    pipe.unfuse_lora()
    assert (image(pipe) - unfused).abs().max() <= 2**10 * EPS32


def test_several_adapters_mix_with_their_own_scales(encoder, tmp_path):
    a = random_adapter(tmp_path / "a.safetensors", SETTINGS, 5)
    b = random_adapter(tmp_path / "b.safetensors", SETTINGS, 6)
    only_a = pipeline(encoder)
    only_a.load_lora_weights(a, scale=0.5)
    both = pipeline(encoder)
    both.load_lora_weights(a, scale=0.5)
    both.load_lora_weights(b, scale=0.0)
    assert torch.equal(image(both), image(only_a))  # b at scale 0 adds exactly nothing
    both.set_adapters(["adapter_0", "adapter_1"], [0.5, 1.0])
    assert not torch.equal(image(both), image(only_a))


def test_default_adapter_names_are_never_reused(encoder, tmp_path):
    """Names stay unique for the pipeline's life: after set_adapters drops one, and after unloading."""
    pipe = pipeline(encoder)
    files = [random_adapter(tmp_path / f"{i}.safetensors", SETTINGS, 10 + i) for i in range(4)]
    assert [pipe.load_lora_weights(files[i]) for i in range(2)] == ["adapter_0", "adapter_1"]
    pipe.set_adapters(["adapter_0"])
    assert pipe.load_lora_weights(files[2]) == "adapter_2"
    assert pipe.get_active_adapters() == ["adapter_0", "adapter_2"]
    pipe.unload_lora_weights()
    assert pipe.load_lora_weights(files[3], adapter_name="adapter_4") == "adapter_4"
    assert pipe.load_lora_weights(files[0]) == "adapter_3"
    assert pipe.load_lora_weights(files[1]) == "adapter_5"  # adapter_4 was taken by name


def test_a_damaged_or_foreign_adapter_file_is_a_clear_error(encoder, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    pipe = pipeline(encoder)
    with pytest.raises(CheckpointError, match="cannot read the adapter"):
        pipe.load_lora_weights(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a homediff LoRA file"):
        pipe.load_lora_weights(tmp_path / "plain.safetensors")
