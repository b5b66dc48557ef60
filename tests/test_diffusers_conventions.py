"""The pipeline in diffusers' conventions: out[0] and return_dict=False, torch_dtype and
pipe.to(dtype), latents=, prompt_embeds=, callback_on_step_end."""

import pytest
import torch
from tiny_components import tiny_pipeline_folder

from homediff.errors import ConfigError
from homediff.pipeline import HomeDiffPipeline


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
    assert out[0] is out.images and out["images"] is out.images
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
