"""Seconds per sampling step and per image, with classifier-free guidance, batched or not.

Measures the sampler loop over a random-weight XUT (text encoding and VAE decoding excluded):

* ``tiny``: xut-tiny, a 64×64 RGB image in pixel space unshuffled by 2 (12 × 32 × 32 latent);
* ``base``: xut-base (the released size), a 256×256 image through an f8 VAE (4 × 32 × 32 latent).

Both have 256 image tokens. Guidance modes: ``batched`` (both branches in one forward of 2B),
``separate`` (two forwards) and ``routing`` (γ = (0, 0.5): the unconditional branch routed, which
cannot share a batch). Run: ``python benchmarks/sampling.py [--cases tiny base] [--steps N]``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import sys
import time

import torch

from homediff.diffusion.samplers import euler, guided_denoiser, time_grid
from homediff.geometry import canonical_grid
from homediff.models import XUT, XUTConfig

CASES = {
    "tiny": dict(preset="xut-tiny", overrides=dict(in_channels=12), image=64, latent=(12, 32, 32)),
    "base": dict(preset="xut-base", overrides={}, image=256, latent=(4, 32, 32)),
}
MODES = {"batched": ((0.0, 0.0), True), "separate": ((0.0, 0.0), False), "routing": ((0.0, 0.5), False)}


def measure(model: XUT, latent, tokens: int, batch: int, steps: int, mode: str) -> float:
    """Median seconds per sampling step over ``steps`` steps, after one warm-up step (the median
    resists other load on a shared machine)."""
    rates, together = MODES[mode]
    g = torch.Generator().manual_seed(0)
    channels, h, w = latent
    cond = torch.randn(batch, tokens, model.config.ctx_dim, generator=g)
    uncond = torch.randn(batch, tokens, model.config.ctx_dim, generator=g)
    pos = canonical_grid(h, w)[None]

    def velocity(x, t, ctx, rate):
        return model(x, t, ctx, pos_map=pos.expand(x.shape[0], -1, -1), aspect=math.log(w / h),
                     tread_rate=rate, generator=g)

    denoise = guided_denoiser(velocity, cond, uncond, 3.0, rates, batch=together)
    x = torch.randn(batch, channels, h, w, generator=g)
    stamps = []
    with torch.no_grad():
        euler(denoise, x, time_grid(1))
        stamps.append(time.perf_counter())
        euler(denoise, x, time_grid(steps), callback=lambda *_: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--image-steps", type=int, default=16,
                        help="steps of one image (the s/image column)")
    parser.add_argument("--tokens", type=int, default=64, help="text tokens per prompt")
    parser.add_argument("--batch", type=int, default=1, help="images per batch")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    print(f"# {' '.join(['python', *sys.argv])}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"# CPU, float32, batch {args.batch}, {args.tokens} text tokens, guidance 3, "
          f"per image = {args.image_steps} steps")
    print(f"{'case':6} {'image':>8} {'latent':>10} {'params':>8} {'guidance':>9} "
          f"{'s/step':>8} {'s/image':>8}")
    for name in args.cases:
        case = CASES[name]
        model = XUT(XUTConfig.preset(case["preset"], **case["overrides"])).eval()
        params = f"{model.num_parameters() / 1e6:.1f}M"
        for mode in args.modes:
            per_step = measure(model, case["latent"], args.tokens, args.batch, args.steps, mode)
            per_image = per_step * args.image_steps / args.batch
            latent = "x".join(map(str, case["latent"]))
            print(f"{name:6} {case['image']:>4}x{case['image']:<3} {latent:>10} {params:>8} {mode:>9} "
                  f"{per_step:8.3f} {per_image:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
