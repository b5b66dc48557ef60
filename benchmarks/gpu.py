"""The GPU checks in one run, for one H100/H200-class GPU within about 12 minutes; one Markdown table.

    benchmarks/gpu.sh                        # --pytest: runs `pytest -m gpu` first
    python benchmarks/gpu.py [--pytest] [--peak-tflops N] [--batch N] [--data data/emoji]
    python benchmarks/gpu.py --dry           # every part at a tiny size on the CPU, in seconds

Parts:

* ``pytest -m gpu`` (``--pytest``): the GPU-marked tests of tests/test_gpu.py;
* ``tiny-emoji``: 200 steps of the packaged recipe on CUDA with bf16 mixed precision; checks that
  no step is non-finite and that the mean loss of the last 20 steps is below that of the first 20;
  steps/s after 10 steps of warm-up. The emoji set at ``--data`` is used, else built in a
  temporary folder, else (no cairo) the shapes set is used and the row says so;
* ``xut-base train``: a training step (forward, backward, fused AdamW; bf16 autocast over float32
  weights) at 256² images (32² latents of 4 channels) with the HDM recipe's text length at 256²,
  at routing 0.5 and 0: images/s, achieved TFLOP/s from the analytic FLOP count
  (``homediff.models.flops``), MFU against the card's peak dense bf16 rate (``PEAK_TFLOPS`` by
  name, or ``--peak-tflops``; else n/a) and peak memory. The batch halves until it fits;
* ``xut-base sample``: latency of one 1024² image (128² latents, the recipe's text length at
  1024²), 32 Euler steps with classifier-free guidance (both branches in one batch of 2), random
  bf16 weights and random context states of Qwen3-0.6B's width (1024);
* ``xut-base rehearsal``: ``homediff train configs/hdm-xut-base.toml --rehearse`` of the 256² and
  512² stages, with and without gradient checkpointing, 3 optimiser steps each at the micro-batch
  the rehearsal picks (the stage's batch, halved until the memory estimate fits): samples/s (after
  the first step), the TFLOP/s and MFU of the plan's FLOPs per sample (backbone, text encoder and
  VAE encoder) against the card's peak in ``homediff.planning.gpus`` (``--peak-tflops`` wins),
  measured against predicted peak memory; the check fails beyond ±25 %. A few minutes: each
  stage builds Qwen3-0.6B and the VAE with random weights and writes a 5 GiB checkpoint.

The exit code is 1 when a check fails or a part breaks.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from homediff.app.demo import recipe
from homediff.diffusion.samplers import euler, guided_denoiser, time_grid
from homediff.models import XUT, XUTConfig
from homediff.models.flops import forward_flops, train_step_flops
from homediff.training.components import adamw
from homediff.training.config import load_config

#: Peak dense bfloat16 tensor-core TFLOP/s (no sparsity) by a part of the CUDA device name; the
#: first match wins, so a more specific name comes before a shorter one.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("RTX 5090", 209.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0))
QWEN3_WIDTH = 1024  # hidden size of Qwen3-0.6B, the HDM recipe's text encoder
VAE_FACTOR = 8  # pixels per latent side of the recipe's EQ-SDXL VAE


@dataclass(frozen=True)
class Sizes:
    """What each part runs: ``FULL`` on a GPU, ``DRY`` on the CPU."""

    emoji_steps: int = 200
    emoji_batch: int | None = None  # None: the recipe's
    emoji_warmup: int = 10
    loss_window: int = 20
    preset: str = "xut-base"
    train_latent: int = 32
    train_text: int | None = None  # None: the HDM recipe's at this image size
    batch: int = 128
    warmup: int = 3
    timed: int = 10
    sample_latent: int = 128
    sample_text: int | None = None  # None: the HDM recipe's at this image size
    sample_steps: int = 32
    rehearsal_recipe: str = "hdm-xut-base"
    rehearsal_stages: tuple[str, ...] = ("256", "512")
    rehearsal_steps: int = 3


FULL = Sizes()
DRY = Sizes(emoji_steps=4, emoji_batch=8, emoji_warmup=1, preset="xut-tiny", train_latent=8,
            train_text=8, batch=2, warmup=1, timed=2, sample_latent=8, sample_text=8, sample_steps=2,
            rehearsal_recipe="tiny-emoji", rehearsal_stages=("32",), rehearsal_steps=2)
MEMORY_TARGET = 0.25  # predicted against measured peak memory


@dataclass
class Row:
    part: str
    setting: str
    speed: str = "-"
    tflops: float | None = None
    mfu: float | None = None
    memory_gib: float | None = None
    check: str = "-"
    ok: bool = True

    def markdown(self) -> str:
        tflops = ("-" if self.tflops is None else
                  f"{self.tflops:,.1f}" if self.tflops >= 1 else f"{self.tflops:.2g}")
        mfu = "-" if self.tflops is None else ("n/a" if self.mfu is None else f"{self.mfu:.1%}")
        memory = "-" if self.memory_gib is None else f"{self.memory_gib:.1f} GiB"
        cells = (self.part, self.setting, self.speed, tflops, mfu, memory, self.check)
        return "| " + " | ".join(cells) + " |"


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The peak to compute MFU against: ``given``, else the table's entry for the device's name."""
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_TFLOPS if part in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_length(resolution: int, given: int | None = None) -> int:
    """``given``, else the HDM recipe's text length at the stage of this resolution."""
    if given:
        return given
    config = load_config(recipe("hdm-xut-base"))
    stage = next(s for s in config.stages if s.resolution == resolution)
    return stage.text_length


def run_pytest() -> Row:
    """``pytest -m gpu`` on tests/test_gpu.py; the row carries pytest's summary line."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           str(root / "tests" / "test_gpu.py")], capture_output=True, text=True,
                          cwd=root, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-2000:])
    return Row("pytest -m gpu", "tests/test_gpu.py", check=summary, ok=done.returncode == 0)


def dataset(folder: Path | None, work: Path, dry: bool) -> tuple[Path, str]:
    """The training folder and its name: the emoji set (given, or built in ``work``), or the
    shapes set where the emoji set cannot be built (or in a dry run)."""
    from homediff.datasets.shapes import build_shapes_dataset
    from homediff.errors import HomediffError

    if not dry:
        if folder is not None and (folder / "train").is_dir():
            return folder / "train", "emoji"
        try:
            from homediff.datasets.emoji import build_emoji_dataset

            build_emoji_dataset(work / "emoji", size=64)
            return work / "emoji" / "train", "emoji"
        except (HomediffError, ImportError, OSError) as err:
            why = f"shapes (emoji set unavailable: {str(err).splitlines()[0][:60]})"
    else:
        why = "shapes"
    build_shapes_dataset(work / "shapes", size=32, count=64 if dry else 2000, heldout=8)
    return work / "shapes" / "train", why


def tiny_emoji(device: torch.device, sizes: Sizes, data: Path | None) -> Row:
    """The packaged tiny-emoji recipe for ``sizes.emoji_steps`` steps, bf16 on CUDA."""
    from homediff.training.loop import Trainer

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as work:
        train, data_name = dataset(data, Path(work), not cuda)
        overrides = [f"dataset.path={train}", f"train.mixed_precision={'bf16' if cuda else 'no'}"]
        if not cuda:  # fixed precisions: the dry run spends no time measuring them
            overrides += ["optimizer.muon_dtype=float32", "text_encoder.options.dtype=float32"]
        config = load_config(recipe("tiny-emoji"), overrides)
        config.train.sample_prompts = []
        if sizes.emoji_batch:
            config.stages[0].batch_size = sizes.emoji_batch
        stamps: list[float] = []
        trainer = Trainer(config, Path(work) / "run", max_steps=sizes.emoji_steps,
                          checkpoint_every=10**9)
        trainer.run(callback=lambda progress, batch: stamps.append(time.perf_counter()))
    steps = trainer.progress.step
    losses = [loss for _, loss in trainer.progress.losses]
    skipped = len(stamps) - steps * config.stages[0].grad_accum
    w = sizes.emoji_warmup
    rate = (len(stamps) - 1 - w) / (stamps[-1] - stamps[w])
    setting = (f"{steps} steps, batch {config.stages[0].batch_size}, "
               f"autocast {trainer.precision.autocast or 'off'}, data: {data_name}")
    finite = skipped == 0 and all(math.isfinite(v) for v in losses)
    window = sizes.loss_window
    if len(losses) >= 2 * window:
        first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
        falls = last < first
        check = (f"loss {first:.4f} → {last:.4f} (means of first/last {window}): "
                 f"{'falls' if falls else 'DOES NOT FALL'}; ")
    else:
        falls, check = True, f"loss check n/a ({len(losses)} steps); "
    check += "no non-finite step" if finite else f"{skipped} NON-FINITE step(s)"
    return Row("tiny-emoji train", setting, f"{rate:.1f} steps/s", check=check, ok=finite and falls)


def xut_train(device: torch.device, sizes: Sizes, rates: tuple[float, ...], batch: int,
              peak: float | None) -> list[Row]:
    """Training steps of the preset on random inputs at each routing rate; the batch halves on
    out-of-memory until it fits (rate 0, the largest, first keeps one batch for all)."""
    config = XUTConfig.preset(sizes.preset, in_channels=4, ctx_dim=QWEN3_WIDTH)
    model = XUT(config).to(device)
    optimizer = adamw(model.parameters(), device, lr=1e-4)
    side, tokens = sizes.train_latent, text_length(VAE_FACTOR * sizes.train_latent, sizes.train_text)
    draw = torch.Generator(device).manual_seed(0)
    rows = []
    for rate in rates:
        while True:
            try:
                seconds, memory = _time_train(model, optimizer, device, batch, side, tokens, rate,
                                              sizes, draw)
                break
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
            # out of the except block, the failed step's tensors are free to release
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch //= 2
        flops = train_step_flops(config, side, side, tokens, rate) * batch
        tflops = flops / seconds / 1e12
        kind = "fused AdamW" if optimizer.defaults["fused"] else "AdamW"
        rows.append(Row(f"{sizes.preset} train",
                        f"{side * VAE_FACTOR}² image ({side}² latent), {tokens} text tokens, "
                        f"batch {batch}, routing {rate:g}, bf16 autocast, {kind}",
                        f"{batch / seconds:,.1f} images/s", tflops,
                        tflops / peak if peak else None, memory))
    return rows


def _time_train(model, optimizer, device, batch, side, tokens, rate, sizes, draw):
    """Seconds per training step (after warm-up) and the peak memory (GiB; None on a CPU)."""
    x = torch.randn(batch, 4, side, side, device=device, generator=draw)
    ctx = torch.randn(batch, tokens, QWEN3_WIDTH, device=device, generator=draw)
    t = torch.rand(batch, device=device, generator=draw)
    target = torch.randn(x.shape, device=device, generator=draw)
    routing = torch.Generator(device).manual_seed(1)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, t, ctx, tread_rate=rate, generator=routing)
        F.mse_loss(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(sizes.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(sizes.timed):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / sizes.timed
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, memory


@torch.no_grad()
def xut_sample(device: torch.device, sizes: Sizes, peak: float | None) -> Row:
    """Latency of one image: Euler steps with guidance (both branches in one batch of 2)."""
    config = XUTConfig.preset(sizes.preset, in_channels=4, ctx_dim=QWEN3_WIDTH)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = XUT(config).to(device, dtype).eval()
    side, tokens = sizes.sample_latent, text_length(VAE_FACTOR * sizes.sample_latent, sizes.sample_text)
    draw = torch.Generator(device).manual_seed(0)
    cond, uncond = (torch.randn(1, tokens, QWEN3_WIDTH, device=device, generator=draw).to(dtype)
                    for _ in range(2))
    noise = torch.randn(1, 4, side, side, device=device, generator=draw)

    def velocity(x, t, ctx, rate):
        return model(x.to(dtype), t, ctx, tread_rate=rate)

    denoise = guided_denoiser(velocity, cond, uncond, 3.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    euler(denoise, noise, time_grid(1, device=device))  # warm-up
    sync(device)
    start = time.perf_counter()
    euler(denoise, noise, time_grid(sizes.sample_steps, device=device))
    sync(device)
    seconds = time.perf_counter() - start
    flops = forward_flops(config, side, side, tokens) * 2 * sizes.sample_steps
    tflops = flops / seconds / 1e12
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Row(f"{sizes.preset} sample",
               f"{side * VAE_FACTOR}² image ({side}² latent), {tokens} text tokens, "
               f"{sizes.sample_steps} Euler steps, guidance 3 batched, {str(dtype)[6:]} weights",
               f"{seconds:.2f} s/image", tflops, tflops / peak if peak else None, memory)


def rehearsal(sizes: Sizes, peak: float | None) -> list[Row]:
    """The recipe's stages rehearsed with and without gradient checkpointing: speed, MFU of the
    plan's FLOPs per sample, and measured against predicted peak memory."""
    from homediff.planning.rehearsal import rehearse

    rows = []
    for checkpointing in (True, False):
        config = load_config(recipe(sizes.rehearsal_recipe),
                             [f"train.gradient_checkpointing={str(checkpointing).lower()}"])
        for result in rehearse(config, steps=sizes.rehearsal_steps, stages=list(sizes.rehearsal_stages)):
            seconds, planned = result.measured["seconds_per_sample"], result.planned
            tflops = planned["flops_per_sample"] / seconds / 1e12
            card = peak or planned["peak_tflops"]
            error = result.memory_error
            rows.append(Row(
                f"{sizes.rehearsal_recipe} rehearsal",
                f"{result.resolution}² stage, micro-batch {result.micro_batch} × accumulation "
                f"{result.grad_accum}, {'checkpointing' if checkpointing else 'no checkpointing'}, "
                f"autocast {result.precision['autocast'] or 'off'}, {result.steps} steps",
                f"{1 / seconds:,.1f} samples/s", tflops, tflops / card if card else None,
                result.measured["peak_bytes"] / 2**30,
                f"predicted {planned['peak_bytes'] / 2**30:.1f} GiB ({error:+.0%}); checkpoint "
                f"{result.measured['checkpoint_bytes'] / 2**30:.2f} GiB, save "
                f"{result.measured['save_seconds']:.1f} s, load {result.measured['load_seconds']:.1f} s",
                ok=abs(error) <= MEMORY_TARGET))
    return rows


def guarded(part: str, measure) -> list[Row]:
    """The part's rows, or one failed row with its error."""
    try:
        rows = measure()
        return rows if isinstance(rows, list) else [rows]
    except Exception as err:  # noqa: BLE001  one broken part must not hide the others
        return [Row(part, "-", check=f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:120]}",
                    ok=False)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU, in seconds")
    parser.add_argument("--pytest", action="store_true", help="run `pytest -m gpu` first")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s")
    parser.add_argument("--batch", type=int, help="xut-base training batch (default 128; halves "
                        "until it fits)")
    parser.add_argument("--data", type=Path, default=Path("data/emoji"), help="the emoji set")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; use --dry for the CPU version", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry else "cuda")
    sizes = DRY if args.dry else FULL
    peak = peak_tflops(device, args.peak_tflops)
    started = time.perf_counter()
    rows = guarded("pytest -m gpu", run_pytest) if args.pytest else []
    rows += guarded("tiny-emoji train", lambda: tiny_emoji(device, sizes, args.data))
    rows += guarded(f"{sizes.preset} train",
                    lambda: xut_train(device, sizes, (0.0, 0.5), args.batch or sizes.batch, peak))
    rows += guarded(f"{sizes.preset} sample", lambda: xut_sample(device, sizes, peak))
    rows += guarded(f"{sizes.rehearsal_recipe} rehearsal", lambda: rehearsal(sizes, args.peak_tflops))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print("# python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"# {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, peak "
          f"{f'{peak:g} TFLOP/s dense bf16' if peak else 'unknown (MFU n/a; --peak-tflops)'}, "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| part | setting | speed | TFLOP/s | MFU | peak memory | check |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(row.markdown())
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
