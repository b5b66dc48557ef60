"""CUDA checks (``pytest -m gpu``, skipped without a CUDA device), and the dry run of
benchmarks/gpu.py on the CPU, which runs in every test session so that the GPU script cannot rot."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.encoders.autoencoders import PixelAutoencoder
from homediff.encoders.text import TextEncoder
from homediff.models import XUT
from homediff.pipeline import HomeDiffPipeline
from homediff.training.components import Builders, build_optimizer
from homediff.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BF16_ROUNDOFF = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def _tensors_of(optimizer) -> list[torch.Tensor]:
    state = getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps it
    return [v for entry in state.values() for v in entry.values() if isinstance(v, torch.Tensor)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("mixed", ["bf16", "fp16"])
def test_training_steps_on_cuda_keep_every_tensor_there(tmp_path, mixed, optimizer):
    if mixed == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    config = tiny_config(square_folder(tmp_path / "sq"), text_encoder_folder(tmp_path / "te"),
                         train={"mixed_precision": mixed}, optimizer={"name": optimizer},
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 4, "tread_rate": 0.5}])
    built = []
    trainer = Trainer(config, tmp_path / "run", builders=Builders(
        optimizer=lambda *args: built.append(build_optimizer(*args)) or built[-1]))
    trainer.run()
    assert trainer.device.type == "cuda"
    assert trainer.progress.step == 4
    assert all(math.isfinite(loss) for _, loss in trainer.progress.losses)
    assert trainer.precision.autocast == {"bf16": "bfloat16", "fp16": "float16"}[mixed]
    if mixed == "fp16":  # loss scaling
        scaler = trainer.accelerator.scaler
        assert scaler is not None and 0 < scaler.get_scale() < math.inf
    state = _tensors_of(built[-1])
    assert state  # the optimizer has taken steps
    tensors = {**{f"model {k}": v for k, v in trainer.unwrapped.state_dict().items()},
               **{f"EMA {k}": v for k, v in trainer.ema.shadow.items()},
               **{f"optimizer state {i}": v for i, v in enumerate(state)}}
    elsewhere = [name for name, v in tensors.items() if v.device.type != "cuda"]
    assert not elsewhere, elsewhere[:5]
    assert trainer.text_encoder.device.type == "cuda"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])  # xut-base's and xut-large's
def test_attention_can_use_the_flash_kernel(monkeypatch, head_dim):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the flash attention kernel needs compute capability 8.0 or newer")
    model = XUT.from_preset("xut-tiny", dim=2 * head_dim, head_dim=head_dim).cuda().train()
    calls = []
    attend = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.dtype, k.dtype, v.dtype))
        return attend(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 4, 16, 16, device="cuda", generator=g)
    ctx = torch.randn(2, 8, model.config.ctx_dim, device="cuda", generator=g)
    t = torch.rand(2, device="cuda", generator=g)
    # only the flash kernel allowed: a call it cannot take raises "No available kernel"
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, ctx, tread_rate=0.5, generator=g)
        out.float().square().mean().backward()
    assert calls and all(dtypes == (torch.bfloat16,) * 3 for dtypes in calls)


def _random_pipeline(tmp_path: Path) -> HomeDiffPipeline:
    """A tiny pipeline whose zero-initialised layers are made random (else it predicts zero)."""
    text = TextEncoder.from_pretrained(text_encoder_folder(tmp_path / "te"), padding="max_length",
                                       max_length=6, dtype="float32")
    torch.manual_seed(0)
    model = XUT.from_preset("xut-tiny", dim=32, head_dim=16, mlp_dim=64, depth=1, dec_blocks=1,
                            in_channels=3, ctx_dim=text.dim)
    draw = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02, generator=draw)
    pipe = HomeDiffPipeline(model, text, PixelAutoencoder(), sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.gpu
@needs_cuda
def test_sampling_on_cuda_matches_the_cpu(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    pipe = _random_pipeline(tmp_path)
    scale, steps = 3.0, 4

    def sample(p: HomeDiffPipeline) -> torch.Tensor:
        return p("a red square", num_inference_steps=steps, guidance_scale=scale, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images.float().cpu()

    reference = sample(pipe)  # float32 on the CPU
    on_cuda = sample(copy.deepcopy(pipe).to("cuda", dtype=torch.bfloat16))
    noise = pipe.noise(1, 16, 16, torch.Generator().manual_seed(0))
    # Each bf16 matrix product rounds to BF16_ROUNDOFF relative; the error can grow by one such
    # rounding per layer along the network (its blocks, the patch embedding and the output), and
    # guidance v_u + s(v_c - v_u) multiplies it by up to 2s - 1. The Euler steps' |dt| sum to 1, so
    # the final error is bounded by that times the largest velocity, ~max |x_0 - noise|.
    c = pipe.transformer.config
    layers = (c.tread_pre_blocks + sum(c.block_counts("enc_blocks")) + sum(c.block_counts("dec_blocks"))
              + c.tread_post_blocks + 2)
    tolerance = BF16_ROUNDOFF * layers * (2 * scale - 1) * (reference - noise).abs().max().item()
    assert (on_cuda - reference).abs().max().item() <= tolerance


@pytest.mark.gpu
@needs_cuda
def test_model_cpu_offload_keeps_only_the_running_component_on_cuda(tmp_path):
    """Offloaded, the transformer runs on CUDA while the text encoder waits in CPU memory, everything is back in CPU memory afterwards, and the images are those of the
    pipeline moved to CUDA whole (the same kernels on the same device)."""
    pipe = _random_pipeline(tmp_path)
    whole = copy.deepcopy(pipe).to("cuda")
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(
        (next(module.parameters()).device.type, args[0].device.type, pipe.text_encoder.device.type)))
    pipe.enable_model_cpu_offload()

    def sample(p):
        return p("a red square", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images

    assert torch.equal(sample(pipe), sample(whole))
    assert set(seen) == {("cuda", "cuda", "cpu")}
    assert next(pipe.transformer.parameters()).device.type == "cpu" and pipe.text_encoder.device.type == "cpu"


def test_gpu_benchmark_dry_run_prints_its_table():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "# python benchmarks/gpu.py --dry"
    assert "| part | setting | speed | TFLOP/s | MFU | peak memory | check |" in lines
    parts = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ")]
    assert parts[1:] == ["tiny-emoji train", "xut-tiny train", "xut-tiny train", "xut-tiny sample",
                         "tiny-emoji rehearsal", "tiny-emoji rehearsal"]
    rehearsals = [line for line in lines if line.startswith("| tiny-emoji rehearsal")]
    assert all("predicted" in line and "checkpoint" in line for line in rehearsals)
    assert "FAILED" not in done.stdout
