"""Training-loop throughput: data + text encoder + model + optimiser, as `homediff train` runs it.

    python benchmarks/train_throughput.py --config configs/tiny-emoji.toml --steps 30

Variants: routing 0.5 vs 0, and the text states computed every step, kept in memory (LRU) or read
from the disk cache. Each variant runs `--repeats` times, alternating, and the median is reported.
MFU is the model's FLOP rate (analytic count) over the rate of a large float32 matrix product
measured on this machine (a CPU has no published peak).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time

import torch

from homediff.models.flops import train_step_flops
from homediff.training.config import load_config
from homediff.training.loop import Trainer


def gemm_flops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def run(config, steps: int, warmup: int) -> tuple[float, Trainer]:
    """Seconds per optimiser step after ``warmup`` steps."""
    stamps = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, max_steps=warmup + steps, checkpoint_every=10**9)
        trainer.run(callback=lambda progress, batch: stamps.append(time.perf_counter()))
    accum = config.stages[0].grad_accum
    return (stamps[-1] - stamps[warmup * accum]) / (steps - 1), trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-emoji.toml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    base = load_config(args.config, args.overrides)
    base.train.sample_prompts = []

    def variant(rate: float, text: str):
        config = copy.deepcopy(base)
        config.stages[0].tread_rate = rate
        config.text_encoder.options.cache_size = 8192 if text == "memory" else 0
        config.train.cache_text = text == "disk"
        return config

    variants = {(0.5, "none"): variant(0.5, "none"), (0.0, "none"): variant(0.0, "none"),
                (0.5, "memory"): variant(0.5, "memory"), (0.5, "disk"): variant(0.5, "disk")}
    times = {key: [] for key in variants}
    trainers = {}
    for _ in range(args.repeats):
        for key, config in variants.items():
            seconds, trainers[key] = run(config, args.steps, args.warmup)
            times[key].append(seconds)
    peak = gemm_flops()
    stage = base.stages[0]
    print(f"# {args.config}: batch {stage.batch_size}, {stage.resolution}px, {args.steps} steps after "
          f"{args.warmup}, {torch.get_num_threads()} threads, float32 GEMM peak measured "
          f"{peak / 1e9:.0f} GFLOP/s")
    print("# " + " ".join(sys.argv))
    print("| routing | text states | s/step | images/s | model GFLOP/s | MFU vs GEMM |")
    print("|---|---|---|---|---|---|")
    for (rate, text), samples in times.items():
        seconds = statistics.median(samples)
        trainer = trainers[(rate, text)]
        side = stage.resolution // trainer.autoencoder.factor
        flops = train_step_flops(trainer.unwrapped.config, side, side,
                                 trainer.text_encoder.config.max_length, rate) * stage.batch_size
        print(f"| {rate} | {text} | {seconds:.3f} | {stage.batch_size / seconds:.1f} | "
              f"{flops / seconds / 1e9:.1f} | {flops / seconds / peak:.1%} |")


if __name__ == "__main__":
    main()
