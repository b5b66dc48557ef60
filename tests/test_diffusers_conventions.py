"""The pipeline in diffusers' conventions: out[0] and return_dict=False, torch_dtype and
pipe.to(dtype), latents=, prompt_embeds=, callback_on_step_end, a generator per image, model CPU
offload, the VAE's force_upcast, and diffusers' own loader reading a homediff folder."""

import pytest
import torch
from tiny_components import random_adapter, tiny_pipeline_folder

from homediff.errors import ConfigError
from homediff.pipeline import HomeDiffPipeline

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = HomeDiffPipeline.from_pretrained(tiny_pipeline_folder(tmp_path_factory.mktemp("conventions")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **options):
    return pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                output_type="pt", **options)


def test_outputs_index_like_diffusers_and_return_dict_false_gives_a_tuple(pipe):
    out = run(pipe)
    assert out[0] is out.images and out["images"] is out.images and out.to_tuple() == (out.images,)
    (images,) = run(pipe, return_dict=False)
    assert torch.equal(images, out.images)


def test_latents_and_prompt_embeds_stand_in_for_the_generator_and_the_prompt(pipe):
    base = run(pipe).images
    noise = pipe.noise(1, 16, 16, torch.Generator().manual_seed(3))
    assert torch.equal(pipe("a red cat", num_inference_steps=2, latents=noise, output_type="pt",
                            generator=torch.Generator().manual_seed(99)).images, base)
    embeds = pipe.text_encoder.encode(["a red cat"])
    negative = pipe.text_encoder.encode([""])
    again = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.equal(again, base)
    with pytest.raises(ConfigError, match="latents must have the shape"):
        run(pipe, latents=torch.zeros(1, 4, 3, 3))


def test_callback_on_step_end_sees_every_step_and_can_replace_the_latents(pipe):
    seen = []

    def watch(p, step, t, tensors):
        seen.append((step, float(t), tensors["latents"].shape))
    run(pipe, callback_on_step_end=watch)
    assert [s for s, _, _ in seen] == [0, 1] and seen[-1][1] == 0.0
    zeroed = pipe("a red cat", num_inference_steps=2, output_type="latent",
                  callback_on_step_end=lambda p, step, t, tensors: {
                      "latents": torch.zeros_like(tensors["latents"])}).images
    assert torch.equal(zeroed, torch.zeros_like(zeroed))


def test_torch_dtype_and_to_dtype(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    half = HomeDiffPipeline.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert half.to(torch.float32).dtype == torch.float32


def draw(pipe, seeds, **options):
    """Images of one prompt, image i from a generator seeded ``seeds[i]``."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    options = {"num_images_per_prompt": len(seeds), **options}
    return pipe("a red cat", num_inference_steps=3, generator=generators, tread_gamma=(0.25, 0.5),
                guidance_scale=2.0, output_type="latent", **options).images


def test_a_generator_per_image_makes_each_image_of_a_batch_its_seed_alone(pipe):
    """Noise and routing of image i come from generator i alone. Batched and single runs differ only
    in the rounding of the batched products; a few hundred float32 ulps of the latents' scale over
    3 steps covers it, while another seed moves the latents by their own scale."""
    batch = draw(pipe, [5, 6, 7])
    alone = torch.cat([draw(pipe, [s]) for s in (5, 6, 7)])
    scale = alone.abs().max()
    assert (batch - alone).abs().max() <= 256 * EPS32 * scale
    assert (draw(pipe, [8]) - alone[:1]).abs().max() > 0.1 * scale
    single = pipe("a red cat", num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                  tread_gamma=(0.25, 0.5), guidance_scale=2.0, output_type="latent").images
    assert torch.equal(single, alone[:1])  # one generator for one image = a list of one
    with pytest.raises(ConfigError, match="got 2 generators for 3 images"):
        draw(pipe, [1, 2], num_images_per_prompt=3)


def test_model_cpu_offload_moves_each_component_only_while_it_runs(pipe, monkeypatch):
    """Offload moves the text encoder, then the transformer, then the autoencoder to the device and
    back (on this CPU the device is the CPU, so the moves are recorded) and changes no pixel."""
    base = run(pipe).images
    moves = []
    for name in ("text_encoder", "transformer", "vae"):
        component = getattr(pipe, name)
        original = component.to

        def recorded(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(kwargs.get("device", args[0] if args else None))))
            return _original(*args, **kwargs)
        monkeypatch.setattr(component, "to", recorded)
    pipe.enable_model_cpu_offload(device="cpu")
    moves.clear()
    try:
        assert torch.equal(run(pipe).images, base)
    finally:
        pipe._offload_device = None
    assert moves == [("text_encoder", "cpu"), ("text_encoder", "cpu"), ("transformer", "cpu"),
                     ("transformer", "cpu"), ("vae", "cpu"), ("vae", "cpu")]


def test_force_upcast_decodes_a_float16_vae_in_float32(tmp_path):
    from tiny_components import tiny_vae

    from homediff.encoders.autoencoders import KLAutoencoder

    seen = []
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for upcast in (True, False):
        vae = KLAutoencoder(tiny_vae(force_upcast=upcast).half())
        vae.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        images = vae.decode(latents)
        assert vae.vae.dtype == torch.float16 and images.dtype == torch.float32
    assert seen == [torch.float32, torch.float16]
    reference = KLAutoencoder(tiny_vae()).decode(latents)  # float32 weights: fp16 ones are their rounding
    assert (KLAutoencoder(tiny_vae(force_upcast=True).half()).decode(latents) - reference).abs().max() < 0.05


def test_diffusers_loads_a_homediff_folder(pipe, tmp_path):
    """DiffusionPipeline.from_pretrained reads a saved folder once homediff.diffusers_pipeline is
    imported: the same images, its dtype, and the folder's LoRA adapters."""
    pytest.importorskip("diffusers")
    from diffusers import DiffusionPipeline

    import homediff.diffusers_pipeline as registered
    from homediff.models.lora import LoraSettings

    pipe.save_pretrained(tmp_path / "plain")
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "plain"))
    assert isinstance(loaded, registered.HomeDiffDiffusersPipeline)
    assert set(loaded.components) == {"transformer", "text_encoder", "vae"}
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(loaded).images, run(pipe).images)
    assert DiffusionPipeline.from_pretrained(str(tmp_path / "plain"), dtype=torch.float64).dtype == torch.float64

    with_lora = HomeDiffPipeline.from_pretrained(tmp_path / "plain")
    with_lora.set_progress_bar_config(disable=True)
    with_lora.load_lora_weights(random_adapter(tmp_path / "a.safetensors", LoraSettings(rank=2), 1), "style", 0.5)
    with_lora.save_pretrained(tmp_path / "lora")
    through_diffusers = DiffusionPipeline.from_pretrained(str(tmp_path / "lora"))
    assert torch.equal(run(through_diffusers).images, run(with_lora).images)
    assert through_diffusers.homediff.lora_scales == {"style": 0.5}
