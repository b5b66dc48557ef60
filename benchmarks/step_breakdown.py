"""Where a training step's time goes, and which attention path is faster at short sequences
(benchmarks/RESULTS.md, "Leads for the last steps of speed" and "Attention by matrix products").

    python benchmarks/step_breakdown.py phases [--config configs/tiny-emoji.toml --steps 80]
    python benchmarks/step_breakdown.py attention [--threads 1|2 --compile]
    python benchmarks/step_breakdown.py probe [--dtypes float32,bfloat16]
    python benchmarks/step_breakdown.py autocast
    python benchmarks/step_breakdown.py attention-compiled [--threads 2]
    python benchmarks/step_breakdown.py profile [--threads 2 --rate 0.5 --bf16]

phases: a real run of the recipe in one process, eager, with the trainer's forward+backward,
optimiser step, gradient clipping and EMA timed (mean ms per step after the first 20), and the
Newton-Schulz FLOPs of its Muon matrices beside the model's FLOPs per step. attention: SDPA against
the matmul path (``models.attention``), forward and backward, in float32 and bfloat16, at the
bench-256 and demo shapes, eager or compiled. probe: the trainer's attention probe over the
bench-256 and tiny-emoji steps' attention layers. autocast: the tiny-emoji recipe's mixed-precision
decision with the attention path as measured and with SDPA kept. attention-compiled: the compiled bench-256 training step with SDPA
everywhere and with the matmul path everywhere, in float32 and under bfloat16 autocast, in
interleaved rounds (three steps of each per round, the first untimed; speed-ups are medians of
per-round ratios, with quartiles). profile: the compiled bench-256 training step (SDPA; --bf16:
under bfloat16 autocast) under torch.profiler, by operator and by operator and input shapes.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from homediff.models import XUT, XUTConfig
from homediff.models import attention as attention_paths
from homediff.models.attention import matmul_attention
from model_step import make_step, recipe_model

BENCH = Path(__file__).parent / "archs" / "bench-256.json"
RECIPE = Path(__file__).parent.parent / "src" / "homediff" / "recipes" / "tiny-emoji.toml"


def phases(config_path: Path, steps: int) -> None:
    from homediff.models.flops import train_step_flops
    from homediff.training.config import load_config
    from homediff.training.loop import Trainer
    from homediff.training.optim import mark_muon_groups, parameter_groups

    spent = collections.defaultdict(float)

    def timed(owner, name, label):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            spent[label] += time.perf_counter() - start
            return out
        setattr(owner, name, wrapper)

    config = load_config(config_path)
    config.train.sample_prompts, config.train.compile = [], False
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, max_steps=steps, checkpoint_every=10**9)
        timed(trainer, "_backward", "forward+backward")
        timed(trainer.accelerator, "clip_grad_norm_", "clipping")
        if trainer.ema:
            timed(trainer.ema, "update", "EMA")
        start_stage = trainer._start_stage

        def start_timed(*args):
            optimizer, total = start_stage(*args)
            timed(optimizer, "step", "optimiser")
            return optimizer, total
        trainer._start_stage = start_timed
        stamps = []
        trainer.run(callback=lambda progress, batch: stamps.append((time.perf_counter(), dict(spent))))
    (t0, before), (t1, after) = stamps[20], stamps[-1]
    n = len(stamps) - 21
    print(f"{config_path}: {1000 * (t1 - t0) / n:.1f} ms per step over {n} steps "
          f"(precision: {trainer.precision.describe()})")
    for label, seconds in after.items():
        print(f"  {label:18s} {1000 * (seconds - before.get(label, 0.0)) / n:7.1f} ms")
    model, stage = trainer.unwrapped, config.stages[0]
    ns = sum(5 * (4 * min(p.shape) ** 2 * max(p.shape) + 2 * min(p.shape) ** 3)
             for group in mark_muon_groups(model, parameter_groups(model, 0.0)) if group["muon"]
             for p in group["params"])
    side = stage.resolution // trainer.autoencoder.factor
    model_flops = train_step_flops(model.config, side, side, stage.text_length, stage.tread_rate)
    print(f"Newton-Schulz {ns / 1e9:.1f} GFLOP per step; the model {model_flops * stage.batch_size / 1e9:.1f} "
          "GFLOP per step of one process")


def attention(threads: int, compiled: bool, rounds: int = 15) -> None:
    torch.set_num_threads(threads)
    paths = {"sdpa": F.scaled_dot_product_attention, "matmul": matmul_attention}
    for shape in [(8, 4, 288, 64), (8, 4, 160, 64), (32, 4, 84, 32), (32, 4, 52, 32)]:
        steps = {}
        for dtype in (torch.float32, torch.bfloat16):
            for name, path in paths.items():
                path = torch.compile(path) if compiled else path
                q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
                grad = torch.randn(shape, dtype=dtype)
                steps[f"{name} {str(dtype)[6:]}"] = (
                    lambda path=path, q=q, k=k, v=v, grad=grad: path(q, k, v).backward(grad))
        times = {name: [] for name in steps}
        for round_ in range(rounds + 2):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - start)
        print(shape, threads, "threads", "compiled" if compiled else "eager",
              {n: round(1000 * statistics.median(t), 2) for n, t in times.items()})


def probe(dtypes: list[torch.dtype], repeats: int = 2) -> None:
    """What the trainer's attention probe measures (``models.attention.matmul_speedup``) for the
    bench-256 step at routing 0.5 on 2 threads and the tiny-emoji recipe's on 1, each twice."""
    config, sizes = recipe_model(RECIPE)
    recipe = (sizes["batch"], sizes["size"], sizes["size"], sizes["text_tokens"], 0.5)
    for name, model, threads, shape in (("bench-256", bench_model(), 2, (8, 32, 32, 32, 0.5)),
                                        ("tiny-emoji", XUT(config), 1, recipe)):
        torch.set_num_threads(threads)
        layers = model.attention_layers(*shape)
        for _ in range(repeats):
            found = {str(d)[6:]: round(attention_paths.matmul_speedup(layers, d, "cpu"), 2) for d in dtypes}
            print(name, threads, "threads", attention_paths.describe(layers), found)


def autocast_choice() -> None:
    """The tiny-emoji recipe's CPU mixed-precision decision on one thread, as each demo process
    makes it (nothing remembered): with the attention path chosen by measurement, and with SDPA
    kept everywhere (the trainer before the matmul path)."""
    import logging
    import os

    from homediff.app.demo import recipe
    from homediff.training.config import load_config
    from homediff.training.precisions import choose_precisions

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    config = load_config(recipe("tiny-emoji"))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        print("attention as measured:", choose_precisions(config, torch.device("cpu")).describe())
        attention_paths.choose_matmul_dtypes = lambda *args, **kwargs: (frozenset(), "SDPA (kept)")
        print("SDPA kept:", choose_precisions(config, torch.device("cpu")).describe())


def bench_model() -> XUT:
    torch.manual_seed(0)
    return XUT(XUTConfig.from_hdm_config(json.loads(BENCH.read_text())))


def attention_compiled(threads: int, rounds: int = 10) -> None:
    torch.set_num_threads(threads)
    models = {"sdpa": bench_model(), "matmul": bench_model()}
    models["matmul"].use_matmul_attention([torch.float32, torch.bfloat16])
    steps = {}
    for name, model in models.items():
        compiled = torch.compile(model)
        for bf16 in (False, True):
            for rate in (0.0, 0.5):
                step = make_step(compiled, False, rate, True, bf16, False, 8, 32, 32,
                                 model.config.ctx_dim, model.config.in_channels)
                for _ in range(3):
                    step()
                steps[(name, bf16, rate)] = step
    times = {key: [] for key in steps}  # each round: the median of a variant's 2 timed steps
    for _ in range(rounds):
        for key, step in steps.items():
            step()  # follows another variant's step: not timed
            timed = []
            for _ in range(2):
                start = time.perf_counter()
                step()
                timed.append(time.perf_counter() - start)
            times[key].append(statistics.median(timed))
    for (name, bf16, rate), t in times.items():
        ratios = [a / b for a, b in zip(times[("sdpa", bf16, rate)], t)]
        low, _, high = statistics.quantiles(ratios, n=4)
        precision = "bf16 autocast" if bf16 else "float32"
        print(f"{name:6s} {precision:13s} routing {rate}: {1000 * statistics.median(t):.1f} ms/step, "
              f"{statistics.median(ratios):.3f}x SDPA's speed (quartiles over rounds {low:.3f}-{high:.3f})")


def profile(threads: int, rate: float, bf16: bool) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.set_num_threads(threads)
    model = torch.compile(bench_model())
    step = make_step(model, False, rate, True, bf16, False, 8, 32, 32, model.config.ctx_dim,
                     model.config.in_channels)
    for _ in range(3):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60, max_shapes_column_width=90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("what", choices=["phases", "attention", "attention-compiled", "probe", "autocast", "profile"])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny-emoji.toml"))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--bf16", action="store_true", help="profile: the step under bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="attention: the compiled kernels")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="probe: the dtypes timed")
    args = parser.parse_args()
    if args.what == "phases":
        torch.set_num_threads(1)
        phases(args.config, args.steps)
    elif args.what == "attention":
        attention(args.threads, args.compile)
    elif args.what == "autocast":
        autocast_choice()
    elif args.what == "probe":
        probe([getattr(torch, name) for name in args.dtypes.split(",")])
    elif args.what == "attention-compiled":
        attention_compiled(args.threads)
    else:
        profile(args.threads, args.rate, args.bf16)


if __name__ == "__main__":
    main()
