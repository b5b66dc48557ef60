import copy
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_components import (OFFICIAL_SMALL, RELEASE_MEAN, RELEASE_STD, hdm_release, qwen_folder,
                             tiny_vae, tiny_xut)

from homediff.diffusion.samplers import euler, guided_denoiser, time_grid
from homediff.encoders.autoencoders import KLAutoencoder, PixelAutoencoder
from homediff.encoders.text import TextEncoder
from homediff.errors import CheckpointError, ConfigError
from homediff.figures import image_grid
from homediff.geometry import canonical_grid
from homediff.pipeline import HomeDiffPipeline

SIZE = dict(height=16, width=24)
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return qwen_folder(tmp_path_factory.mktemp("qwen"))


def text_encoder(qwen_dir, dtype=torch.float32):
    return TextEncoder.from_pretrained(qwen_dir, dtype="float32").to(dtype=dtype)


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    pipe = HomeDiffPipeline(tiny_xut(), text_encoder(qwen_dir), KLAutoencoder(tiny_vae()), sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe64(qwen_dir):
    """The same pipeline with its transformer and text encoder in float64, for tests that compare
    two ways of computing the same thing: they then differ by float64 rounding only."""
    pipe = HomeDiffPipeline(tiny_xut().double(), text_encoder(qwen_dir, torch.float64),
                            KLAutoencoder(tiny_vae()), sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler_tolerance(latents, steps):
    """How far two Euler runs in float32 may end apart when their float64 velocities agree.

    ``samplers.euler`` keeps x in float32, so a velocity that differs in its 15th digit can still
    round to the neighbouring float32, and so can the sum x + Δ·v: 2 ulps of |x| per step; the next
    velocity moves with x by at most about as much again (the tiny model's gain is near 1): ×2.
    """
    return steps * 2 * 2 * EPS32 * latents.abs().max()


def seed(n=0):
    return torch.Generator().manual_seed(n)


def run(pipe, prompt="a cat", **kwargs):
    options = dict(SIZE, num_inference_steps=3, generator=seed(), output_type="pt") | kwargs
    return pipe(prompt, **options).images


def test_output_types(pipe):
    pil = run(pipe, output_type="pil", num_images_per_prompt=2)
    assert len(pil) == 2 and pil[0].size == (24, 16) and pil[0].mode == "RGB"
    array = run(pipe, output_type="np")
    assert array.shape == (1, 16, 24, 3) and 0 <= array.min() and array.max() <= 1
    tensor = run(pipe)
    assert tensor.shape == (1, 3, 16, 24)
    assert np.allclose(np.asarray(pil[0]), (tensor[0].permute(1, 2, 0).numpy() * 255).round(), atol=1)
    assert run(pipe, output_type="latent").shape == (1, 4, 8, 12)
    assert run(pipe, height=None, width=None).shape == (1, 3, 16, 16)  # sample_size


def test_fixed_seed_repeats_routing_guidance_included(pipe):
    kwargs = dict(tread_gamma=(0.0, 0.5), guidance_scale=2.0)
    first = run(pipe, **kwargs)
    assert torch.equal(first, run(pipe, **kwargs))
    assert not torch.equal(first, run(pipe, generator=seed(1), **kwargs))


def test_scale_one_is_the_conditional_branch(pipe64):
    """Guidance scale 1 samples with the conditional velocity alone (the negative prompt is unused)."""
    image = run(pipe64, negative_prompt="a dog", guidance_scale=1.0, output_type="latent")
    assert torch.equal(image, run(pipe64, negative_prompt="", guidance_scale=1.0, output_type="latent"))
    ctx = pipe64.text_encoder.encode("a cat")
    aspect, pos = math.log(24 / 16), pipe64.position_map(16, 24)

    def conditional(x, t):
        return pipe64.transformer(x.double(), t, ctx, pos_map=pos, aspect=aspect)

    expected = euler(conditional, pipe64.noise(1, 16, 24, seed()), time_grid(3))
    assert (image - expected).abs().max() <= euler_tolerance(expected, steps=3)


def test_gamma_zero_is_no_routing_and_gamma_routes(pipe64):
    """With γ = (0, 0) the result is that of the unrouted model; γ_u = 0.5 changes it."""
    ctx, uncond = pipe64.text_encoder.encode("a cat"), pipe64.text_encoder.encode("")
    pos = pipe64.position_map(16, 24)

    def unrouted(x, t, c, rate):
        return pipe64.transformer(x.double(), t, c, pos_map=pos.expand(x.shape[0], -1, -1),
                                  aspect=math.log(1.5))

    expected = euler(guided_denoiser(unrouted, ctx, uncond, 2.0, batch=False),
                     pipe64.noise(1, 16, 24, seed()), time_grid(3))
    latents = run(pipe64, guidance_scale=2.0, output_type="latent")
    # guidance 2 samples v = 2·v_c − v_u, which moves by up to 2 + 1 = 3 times as much as a
    # branch does when x moves
    assert (latents - expected).abs().max() <= 3 * euler_tolerance(expected, steps=3)
    routed = run(pipe64, guidance_scale=2.0, tread_gamma=(0.0, 0.5), output_type="latent")
    assert (routed - latents).abs().max() > 1e-3


def test_batched_guidance_equals_separate_branches(pipe64):
    """Both branches as one batch of 4 give the velocities of two batches of 2.

    In float64 the two differ only in the summation order inside the transformer's matrix
    products. A product of K terms rounds by at most K ulps of its scale (K ≤ 64 here, the MLP
    width); 16 such layers in a row at unit gain make 1024 ulps; guidance v_u + 3·(v_c − v_u)
    weighs each branch's error by at most |1 − 3| + 3 = 5.
    """
    cond, uncond = torch.randn(2, 5, 32, generator=seed(1)), torch.randn(2, 5, 32, generator=seed(2))
    x, t = torch.randn(2, 4, 8, 12, generator=seed(3)), torch.tensor(0.7)
    batched = pipe64.denoiser(cond, uncond, **SIZE, guidance_scale=3.0)(x, t)
    separate = pipe64.denoiser(cond, uncond, **SIZE, guidance_scale=3.0, batch=False)(x, t)
    assert batched.dtype == torch.float64
    tolerance = 5 * 1024 * EPS64 * separate.abs().max()
    assert (batched - separate).abs().max() <= tolerance


def test_camera_edits_the_latent_position_map(pipe):
    grid = canonical_grid(8, 12)
    assert torch.equal(pipe.position_map(16, 24, {"zoom": 1, "x_shift": 0, "y_shift": 0})[0], grid)
    edited = pipe.position_map(16, 24, {"zoom": 2.0, "x_shift": 0.5})[0]
    assert torch.allclose(edited[:, 1], (grid[:, 1] + 0.5) / 2)
    assert torch.allclose(edited[:, 0], grid[:, 0] / 2)

    def extents(pos):  # (x, y) spans of cell centres
        return float(np.ptp(pos[:, 1].numpy())), float(np.ptp(pos[:, 0].numpy()))

    wide = pipe.position_map(16, 48)[0]
    assert wide.shape == (8 * 24, 2)
    # the long side spans [-1, 1] and the short side ±short/long, less half a cell at each end
    # coordinates within [-1, 1] are each a few float32 roundings from exact: 4 ulps of 1
    assert extents(wide) == pytest.approx((2 - 2 / 24, 2 / 3 * (1 - 1 / 8)), abs=4 * EPS32)
    assert extents(grid) == pytest.approx((2 - 2 / 12, 4 / 3 * (1 - 1 / 8)), abs=4 * EPS32)
    changed = run(pipe, camera={"zoom": 1.5, "x_shift": 0.3})
    assert not torch.allclose(changed, run(pipe))


def test_batches_of_prompts(pipe):
    images = run(pipe, prompt=["a cat", "a blue square"], negative_prompt=["", "a dog"],
                 num_images_per_prompt=3, num_inference_steps=2)
    assert images.shape == (6, 3, 16, 24)
    assert not torch.equal(images[0], images[1])
    with pytest.raises(ConfigError, match="got 3 negative prompts for 2 prompts"):
        run(pipe, prompt=["a", "b"], negative_prompt=["", "", ""])


def test_save_and_load_give_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["homediff", "XUT"] and index["vae"] == ["homediff", "KLAutoencoder"]
    for part in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/config.json", "text_encoder/model.safetensors"):
        assert (tmp_path / part).is_file(), part
    loaded = HomeDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(tread_gamma=(0.0, 0.5), camera={"zoom": 1.2})
    assert torch.equal(run(loaded, **kwargs), run(pipe, **kwargs))
    with pytest.raises(CheckpointError, match="not a homediff pipeline folder"):
        HomeDiffPipeline.from_pretrained(tmp_path / "transformer")


def test_pixel_space_pipeline(qwen_dir, tmp_path):
    pipe = HomeDiffPipeline(tiny_xut(in_channels=12), text_encoder(qwen_dir),
                            PixelAutoencoder(factor=2), sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.size_multiple == 4 and run(pipe, output_type="latent").shape == (1, 12, 8, 12)
    pipe.save_pretrained(tmp_path)
    loaded = HomeDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, PixelAutoencoder)
    assert torch.equal(run(loaded), run(pipe))


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=18), r"height 18 is not a positive multiple of 4 .*nearest valid sizes: 16 or 20"),
    (dict(width=0), "width 0 is not a positive multiple of 4"),
    (dict(num_inference_steps=0), "number of sampling steps must be a positive integer"),
    (dict(guidance_scale=-1.0), "guidance scale must be a number >= 0"),
    (dict(sampler="ddim"), "unknown sampler 'ddim'"),
    (dict(output_type="jpeg"), "output_type must be one of"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(camera={"zoom": 0}), "camera zoom must be positive"),
    (dict(camera={"pan": 1}), r"unknown camera key\(s\) \['pan'\]"),
    (dict(tread_gamma=(0.0, 1.5)), r"tread_gamma rates must be in \[0, 1\)"),
])
def test_invalid_arguments_raise_clear_errors(pipe, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        run(pipe, **kwargs)


def test_components_must_fit(qwen_dir):
    with pytest.raises(ConfigError, match="32-d states but the transformer expects ctx_dim 48"):
        HomeDiffPipeline(tiny_xut(ctx_dim=48), text_encoder(qwen_dir), KLAutoencoder(tiny_vae()))


def test_progress_bar_can_be_turned_off(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    run(pipe, num_inference_steps=2)
    assert "sampling" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    run(pipe, num_inference_steps=2)
    assert capsys.readouterr().err == ""


def test_image_grid():
    Image = pytest.importorskip("PIL.Image")
    tiles = [Image.new("RGB", (4, 3), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(tiles)
    assert grid.size == (12, 6) and grid.getpixel((4, 3)) == (160, 0, 0)


# --- released single-file checkpoints (hdm-spec §7) -----------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    files = hdm_release(tmp_path_factory.mktemp("release"))
    pipe = HomeDiffPipeline.from_hdm_release(files.checkpoint, text_encoder=files.text_encoder,
                                             vae=files.vae_config, arch=files.arch,
                                             text_encoder_options={"dtype": "float32"})
    pipe.set_progress_bar_config(disable=True)
    return pipe, files


def test_release_components_are_imported(release):
    pipe, files = release
    backbone, vae, te = files.backbone, files.vae, files.te
    weights = pipe.transformer.state_dict()
    assert torch.equal(weights["ctx_proj.weight"], backbone["ctx_proj.weight"].float())
    assert torch.equal(pipe.vae.vae.state_dict()["decoder.conv_out.weight"],
                       vae.state_dict()["decoder.conv_out.weight"].half().float())
    assert torch.equal(pipe.vae.mean.flatten(), torch.tensor(RELEASE_MEAN))
    assert torch.equal(pipe.vae.std.flatten(), torch.tensor(RELEASE_STD))
    assert torch.equal(pipe.text_encoder.model.state_dict()["norm.weight"], te["norm.weight"])
    assert pipe.text_encoder.config.padding == "longest" and pipe.sample_size == 1024
    images = pipe("a cat", height=24, width=32, num_inference_steps=2, tread_gamma=(0.0, 0.5),
                  generator=seed(), output_type="np").images
    assert images.shape == (1, 24, 32, 3) and np.isfinite(images).all()


def assert_one_euler_step(denoise, x, ts, velocity):
    """euler(denoise, x, ts) over one step is x + Δ·v for the recorded velocity v.

    The transformer runs in float64, so what separates the two is (1) the recording's own float32
    rounding: the original's forward pass has about 64 matrix products and normalisations in a
    row, each adding at most an ulp of relative error in norm, 64·eps32·‖v‖ in all (the same bound
    as tests/models/test_xut.py); (2) the sampler rounding v and then x + Δ·v to float32: ½ ulp
    each, eps32·(|Δ|·‖v‖ + ‖x‖) in norm. Δ is the step as the sampler takes it, t₁ − t₀ in float32.
    """
    step = (ts[1] - ts[0]).double()
    expected = x.double() + step * velocity.double()
    result = euler(denoise, x, ts)
    bound = EPS32 * (64 * step.abs() * velocity.norm() + step.abs() * velocity.norm() + x.norm())
    assert (result.double() - expected).norm() <= bound


@pytest.mark.parametrize("sample", [0, 1])
def test_release_first_euler_step_matches_the_original(release, sample):
    """The fixture's x, t, ctx as one Euler step with guidance 1 (hdm-spec §6.1): x − Δ·v."""
    pipe = copy.deepcopy(release[0])
    pipe.transformer.double()  # float64: only the recording's rounding is left to compare
    io = load_file(OFFICIAL_SMALL / "io.safetensors")
    camera = json.loads((OFFICIAL_SMALL / "meta.json").read_text())["camera"]
    x, ctx, t = (io[k][sample:sample + 1] for k in ("x", "ctx", "t"))
    ts = torch.cat((t, t - 1 / 16))
    height, width = 12 * pipe.vae.factor, 16 * pipe.vae.factor
    pos = pipe.position_map(height, width, camera)[0]
    assert torch.equal(pos, io["pos_camera"][sample])  # the same float32 formula as the original

    denoise = pipe.denoiser(ctx, None, height=height, width=width, guidance_scale=1.0, camera=camera)
    assert_one_euler_step(denoise, x, ts, io["out_camera"][sample:sample + 1])

    def velocity(x, t, c, rate):  # no position map: the grid at patch resolution
        return pipe.transformer(x.double(), t, c.double(), tread_rate=rate)

    plain = guided_denoiser(velocity, ctx, None, 1.0)
    assert_one_euler_step(plain, x, ts, io["out_default"][sample:sample + 1])
