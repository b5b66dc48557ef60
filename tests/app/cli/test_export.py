"""``homediff export --format hdm``: the original HDM's single file and arch JSON."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_components import (
    bert_folder,
    qwen_folder,
    tiny_pipeline_folder,
    tiny_vae,
    tiny_xut,
)

from homediff.app.cli import main
from homediff.encoders.autoencoders import KLAutoencoder, PixelAutoencoder
from homediff.encoders.text import TextEncoder
from homediff.models import XUT
from homediff.pipeline import HomeDiffPipeline

pytest.importorskip("diffusers")
EPS32 = torch.finfo(torch.float32).eps
PREFIXES = ("unet.model.", "vae.", "te.text_models.0.")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("export"))


def export(model, out, *extra):
    return main(["export", str(model), str(out), "--format", "hdm", *extra])


def released(out, model):
    """The exported file opened as homediff opens an original HDM file, with the folder's own
    text-encoder options and VAE config; the arch is the JSON the export wrote beside the file."""
    options = dataclasses.asdict(HomeDiffPipeline.from_pretrained(model).text_encoder.config)
    return HomeDiffPipeline.from_hdm_release(out, text_encoder=model / "text_encoder", vae=model / "vae",
                                             text_encoder_options=options, sample_size=16)


def images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cat", negative_prompt="blurry", num_inference_steps=2,
                generator=torch.Generator().manual_seed(3), output_type="pt").images


def test_the_original_layout_gives_the_same_images(model_dir, tmp_path, capsys):
    out = tmp_path / "hdm.safetensors"
    assert export(model_dir, out, "--dtype", "float32") == 0
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".json")),
                                               str(tmp_path / "hdm-vae")]
    own = HomeDiffPipeline.from_pretrained(model_dir)
    assert json.loads(out.with_suffix(".json").read_text()) == own.transformer.config.to_hdm_config()
    tensors = load_file(out)
    assert all(k.startswith(PREFIXES) or k in ("vae_mean", "vae_std") for k in tensors)
    for prefix, state in (("unet.model.", own.transformer.state_dict()),
                          ("vae.", own.vae.vae.state_dict()),
                          ("te.text_models.0.", own.text_encoder.model.state_dict())):
        assert {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)} == set(state)
    assert "unet.model.in_patch.proj.weight" in tensors and "unet.model.time_emb.freqs" in tensors
    assert tensors["vae_mean"].shape == tensors["vae_std"].shape == (1, 4, 1, 1)
    assert torch.equal(images(released(out, model_dir)), images(own))


def test_float16_is_the_rounding_of_the_weights(model_dir, tmp_path):
    assert export(model_dir, tmp_path / "f32.safetensors", "--dtype", "float32") == 0
    assert export(model_dir, tmp_path / "f16.safetensors") == 0  # the default
    full, half = load_file(tmp_path / "f32.safetensors"), load_file(tmp_path / "f16.safetensors")
    assert full.keys() == half.keys()
    kept = {"vae_mean", "vae_std", "unet.model.time_emb.freqs"}  # float32 in either
    for key, value in full.items():
        assert torch.equal(half[key], value if key in kept else value.half()), key


def test_without_the_text_encoder(model_dir, tmp_path):
    out = tmp_path / "hdm.safetensors"
    assert export(model_dir, out, "--no-text-encoder") == 0
    keys = load_file(out).keys()
    assert not any(k.startswith("te.") for k in keys) and "unet.model.ctx_proj.weight" in keys


def test_existing_files_are_kept_without_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "hdm.safetensors"
    out.write_bytes(b"old")
    assert export(model_dir, out) == 2
    assert "hdm.safetensors exists: pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"old"
    assert export(model_dir, out, "--overwrite") == 0 and "vae_mean" in load_file(out)
    out.unlink()  # the arch JSON alone counts too
    assert export(model_dir, out) == 2
    assert "hdm.json exists" in capsys.readouterr().err


def test_output_must_be_safetensors(model_dir, tmp_path, capsys):
    assert export(model_dir, tmp_path / "hdm.ckpt") == 2
    assert "hdm.ckpt: the output must be a .safetensors file" in capsys.readouterr().err


def test_a_pixel_model_is_refused(tmp_path, capsys):
    encoder = TextEncoder.from_pretrained(qwen_folder(tmp_path / "qwen"), dtype="float32")
    HomeDiffPipeline(tiny_xut(in_channels=3), encoder, PixelAutoencoder(), sample_size=16).save_pretrained(
        tmp_path / "pixel")
    assert export(tmp_path / "pixel", tmp_path / "hdm.safetensors") == 2
    err = capsys.readouterr().err
    assert "pixel: its autoencoder is PixelAutoencoder" in err and "VAE latents" in err
    assert not (tmp_path / "hdm.safetensors").exists()


def test_a_backbone_the_original_cannot_build_is_refused(tmp_path, capsys):
    encoder = TextEncoder.from_pretrained(qwen_folder(tmp_path / "qwen"), dtype="float32")
    config = dataclasses.replace(tiny_xut().config, skip="mirror")
    HomeDiffPipeline(XUT(config), encoder, KLAutoencoder(tiny_vae()), sample_size=16).save_pretrained(
        tmp_path / "mirror")
    assert export(tmp_path / "mirror", tmp_path / "hdm.safetensors") == 2
    assert "mirror: model.skip='mirror' cannot be written" in capsys.readouterr().err


def test_differences_from_the_original_are_warned(model_dir, tmp_path, capsys):
    folder = shutil.copytree(model_dir, tmp_path / "model")
    record = folder / "text_encoder" / "homediff_text_encoder.json"
    options = json.loads(record.read_text())
    options["config"] |= {"padding": "max_length", "layer": -2}
    record.write_text(json.dumps(options))
    assert export(folder, tmp_path / "hdm.safetensors") == 0
    err = capsys.readouterr().err
    for part in ("pads every prompt to 256 tokens", "cuts prompts after 256 tokens",
                 "hidden layer -2", "not Qwen3-0.6B", "not the SDXL VAE", "latent statistics"):
        assert part in err


def test_the_vae_folder_carries_the_latent_statistics(model_dir, tmp_path):
    """Beside the file, the VAE as a diffusers folder whose config holds the statistics the model
    was trained with (latents_mean/latents_std, which the original reads from the VAE's config)."""
    from diffusers import AutoencoderKL

    out = tmp_path / "hdm.safetensors"
    assert export(model_dir, out, "--dtype", "float32") == 0
    own = HomeDiffPipeline.from_pretrained(model_dir)
    vae = AutoencoderKL.from_pretrained(tmp_path / "hdm-vae")
    assert vae.config.latents_mean == own.vae.mean.flatten().tolist()
    assert vae.config.latents_std == own.vae.std.flatten().tolist()
    assert own.vae.vae.config.latents_mean is None  # the folder's VAE config did not have them
    state = own.vae.vae.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
    opened = KLAutoencoder.from_pretrained(str(tmp_path / "hdm-vae"))
    assert torch.equal(opened.mean, own.vae.mean) and torch.equal(opened.std, own.vae.std)
    assert export(model_dir, out, "--overwrite") == 0  # float16 now, replacing the folder
    weights = load_file(tmp_path / "hdm-vae" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}


def test_hdm_ext_is_said_not_to_load_a_backbone_other_than_xut_base(model_dir, tmp_path, capsys):
    from homediff.models import XUTConfig
    from homediff.models.release import loads_in_hdm_ext

    assert export(model_dir, tmp_path / "hdm.safetensors") == 0
    err = capsys.readouterr().err
    assert "not XUT-base: HDM-ext (ComfyUI) always builds XUT-base and will not load it" in err
    assert "the original code loads it with hdm.json" in err
    assert loads_in_hdm_ext(XUTConfig.preset("xut-base"))
    assert not loads_in_hdm_ext(XUTConfig.preset("xut-base", mlp_dim=2048))


def test_a_backbone_without_the_aspect_embedding_is_refused(tmp_path, capsys):
    encoder = TextEncoder.from_pretrained(qwen_folder(tmp_path / "qwen"), dtype="float32")
    config = dataclasses.replace(tiny_xut().config, aspect_embedding=False)
    HomeDiffPipeline(XUT(config), encoder, KLAutoencoder(tiny_vae()), sample_size=16).save_pretrained(
        tmp_path / "square")
    assert export(tmp_path / "square", tmp_path / "hdm.safetensors") == 2
    err = capsys.readouterr().err
    assert "square: the backbone has no aspect embedding" in err and "addon_info_embs_dim" in err
    assert not (tmp_path / "hdm.safetensors").exists()


def test_a_text_encoder_other_than_qwen3_is_left_out(tmp_path, capsys):
    encoder = TextEncoder.from_pretrained(bert_folder(tmp_path / "bert"), dtype="float32", max_length=64)
    HomeDiffPipeline(tiny_xut(), encoder, KLAutoencoder(tiny_vae()), sample_size=16).save_pretrained(
        tmp_path / "bert-model")
    assert export(tmp_path / "bert-model", tmp_path / "hdm.safetensors") == 0
    assert "BertModel, not Qwen3: te.* is left out" in capsys.readouterr().err
    assert not any(k.startswith("te.") for k in load_file(tmp_path / "hdm.safetensors"))


def test_adapters_are_fused_into_the_backbone(model_dir, tmp_path, capsys):
    """The exported backbone is the folder's with its adapter fused at its scale: the same images
    as the folder fused in homediff, and each weight W + s·(α/r)·B·A up to float32 rounding."""
    from homediff.models import lora

    base = HomeDiffPipeline.from_pretrained(model_dir)
    settings = lora.LoraSettings(rank=2, alpha=4.0, targets=("attention", "mlp", "text"))
    lora.add_adapter(base.transformer, settings, "style")
    with torch.no_grad():
        for name, p in base.transformer.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    styled = HomeDiffPipeline(base.transformer, base.text_encoder, base.vae, sample_size=16,
                              adapters={"style": settings})
    styled.set_adapters(["style"], [0.5])
    styled.save_pretrained(tmp_path / "styled")

    out = tmp_path / "hdm.safetensors"
    assert export(tmp_path / "styled", out, "--dtype", "float32") == 0
    assert "fused into the backbone (the original has no LoRA): style at scale 0.5" in capsys.readouterr().out
    own = HomeDiffPipeline.from_pretrained(tmp_path / "styled")
    own.fuse_lora()
    exported = images(released(out, tmp_path / "styled"))
    assert torch.equal(exported, images(own))
    assert not torch.equal(exported, images(HomeDiffPipeline.from_pretrained(model_dir)))

    tensors, plain = load_file(out), load_file(model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    adapter = load_file(tmp_path / "styled" / "lora" / "style.safetensors")
    scaling = 0.5 * settings.alpha / settings.rank
    for layer in {k.rsplit(".lora_", 1)[0] for k in adapter}:
        a, b = adapter[f"{layer}.lora_A.weight"].double(), adapter[f"{layer}.lora_B.weight"].double()
        delta = scaling * b @ a
        expected = plain[f"{layer}.weight"].double() + delta
        # rounding of B·A (rank terms), of the scaling product and of the sum, each under eps32
        bound = EPS32 * (expected.abs() + delta.abs() + settings.rank * scaling * (b.abs() @ a.abs()))
        assert ((tensors[f"unet.model.{layer}.weight"].double() - expected).abs() <= bound).all(), layer
