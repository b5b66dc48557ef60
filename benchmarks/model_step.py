"""Backbone speed: forward and training-step images/s with routing at 0.5 and 0, FLOPs and FLOP/s.

    python benchmarks/model_step.py --preset xut-tiny --batch 8 --size 32 --text-tokens 32
    python benchmarks/model_step.py --hdm-config benchmarks/archs/bench-256.json --batch 8 \
        --size 32 --text-tokens 32 [--original DIR]
    python benchmarks/model_step.py --config configs/tiny-emoji.toml --bf16

--config RECIPE times the recipe's backbone (preset and overrides, with the input channels and text
width of its autoencoder and text encoder) at its first stage's batch, latent size and text length.

--bf16 adds the same steps under bfloat16 autocast (on the CPU: torch.autocast("cpu")); --compile
adds them through torch.compile (compiled in the warm-up rounds, so the table holds compiled steps
only; the compilation time is printed apart).
--original DIR times the original HDM implementation too (DIR holds its ``xut`` package, e.g. the
``src`` folder of a checkout of the HDM repository; needs an --hdm-config). With --bf16 the original
is timed under the same autocast too (its training ran under bf16 autocast), and each speed-up
compares like with like. Each training step ends with the AdamW step its trainer builds (homediff's
fused where the device has the kernel, the original's torch.optim.AdamW with torch's defaults);
--same-optimizer gives both torch's defaults, to compare the models alone. homediff computes
attention by the path its trainer would choose here (``models.attention``: timed in float32, and in
bfloat16 with --bf16, over the attention layers of a step at routing 0.5); --attention sdpa keeps
SDPA everywhere.

Variants are timed in interleaved rounds, so that load on a shared machine hits all alike: in each
round each variant takes --repeats steps in a row and the first is not timed (it follows another
variant's step, whose memory and caches it inherits). The table gives each variant's median; a
speed-up is the median over rounds of the two variants' time ratio in that round, with its quartiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from homediff.encoders.autoencoders import load_autoencoder
from homediff.encoders.text import TextEncoder
from homediff.models import XUT, XUTConfig, attention
from homediff.models.flops import forward_flops
from homediff.training.compiling import compile_backbone
from homediff.training.components import FUSED_ADAMW_DEVICES, adamw
from homediff.training.config import load_config


def recipe_model(path: Path) -> tuple[XUTConfig, dict]:
    """A recipe's backbone config and its first stage's batch, latent size and text length."""
    recipe = load_config(path)
    options = {"factor": recipe.autoencoder.factor} if recipe.autoencoder.name == "pixel" else {}
    autoencoder = load_autoencoder(recipe.autoencoder.name, **options)
    text_options = recipe.text_encoder.options
    text = TextEncoder.from_pretrained(recipe.text_encoder.name, **dataclasses.asdict(text_options))
    config = XUTConfig.preset(recipe.model.preset, **{
        "in_channels": autoencoder.channels, "ctx_dim": text.dim, **recipe.model.overrides})
    stage = recipe.stages[0]
    return config, {"batch": stage.batch_size, "size": stage.resolution // autoencoder.factor,
                    "text_tokens": text_options.max_length}


def original_model(source: Path, arch: dict):
    sys.path.insert(0, str(source))
    import xut.env as env  # the original's switches: pure-torch kernels, no compilation

    env.TORCH_COMPILE = env.USE_LIGER = env.USE_XFORMERS = env.USE_XFORMERS_LAYERS = False
    from xut.xut import XUDiT

    return XUDiT(**arch)


def make_optimizer(model, original: bool, same_optimizer: bool) -> torch.optim.Optimizer:
    """The AdamW each implementation's trainer builds: homediff's (fused where the device has the
    kernel), the original's ``torch.optim.AdamW`` with torch's defaults; with ``same_optimizer``
    torch's defaults for both, so that the models alone are compared."""
    if original or same_optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    return adamw(model.parameters(), torch.device("cpu"), lr=1e-4)


def make_step(model, original: bool, rate: float, train: bool, bf16: bool, same_optimizer: bool,
              batch, size, text, ctx_dim, in_ch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_ch, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    ctx = torch.randn(batch, text, ctx_dim, generator=g)
    aspect = torch.zeros(batch)
    target = torch.randn_like(x)
    if original:  # tread_rate=None in eval mode is the original's only way to route nothing
        kwargs = dict(addon_info=aspect, tread_rate=rate or None)
    else:
        kwargs = dict(aspect=aspect, tread_rate=rate)
    model.eval()
    optimizer = make_optimizer(model, original, same_optimizer) if train else None

    def step():
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            if not train:
                with torch.no_grad():
                    model(x, t, ctx, **kwargs)
                return
            loss = (model(x, t, ctx, **kwargs).float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--preset", default="xut-tiny")
    parser.add_argument("--hdm-config", type=Path, help="original arch JSON (overrides --preset)")
    parser.add_argument("--config", type=Path, help="a training recipe (overrides --preset and sizes)")
    parser.add_argument("--original", type=Path, help="folder holding the original `xut` package")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="steps of a variant in a row in each round; all but the first timed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action="store_true", help="also time under bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd model")
    parser.add_argument("--attention", choices=["auto", "sdpa"], default="auto",
                        help="homediff's attention path: chosen by measurement as in training, or SDPA")
    parser.add_argument("--same-optimizer", action="store_true",
                        help="train both implementations with torch's default AdamW (the models alone)")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2: a turn's first step is not timed")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    arch = json.loads(args.hdm_config.read_text()) if args.hdm_config else None
    config = XUTConfig.from_hdm_config(arch) if arch else XUTConfig.preset(args.preset)
    if args.config:
        config, sizes = recipe_model(args.config)
        vars(args).update(sizes)
    impls = {"homediff": XUT(config)}
    if args.attention == "auto":  # as the trainer chooses, for the dtypes timed here
        layers = impls["homediff"].attention_layers(args.batch, args.size, args.size, args.text_tokens, 0.5)
        chosen, found = attention.choose_matmul_dtypes(
            layers, [torch.float32] + [torch.bfloat16] * args.bf16, "cpu")
        impls["homediff"].use_matmul_attention(chosen)
    else:
        found = "SDPA (--attention sdpa)"
    if args.bf16:
        impls["homediff, bf16 autocast"] = impls["homediff"]
    if args.compile:
        impls["homediff, compiled"] = compile_backbone(impls["homediff"])
        if args.bf16:
            impls["homediff, compiled, bf16 autocast"] = impls["homediff, compiled"]
    if args.original:
        if arch is None:
            parser.error("--original needs --hdm-config")
        impls["original"] = original_model(args.original, arch)
        if args.bf16:
            impls["original, bf16 autocast"] = impls["original"]
    dims = (args.batch, args.size, args.text_tokens, config.ctx_dim, config.in_channels)
    variants = {(name, mode, rate): make_step(model, name.startswith("original"), rate, mode == "train",
                                              name.endswith("bf16 autocast"), args.same_optimizer, *dims)
                for name, model in impls.items() for mode in ("forward", "train")
                for rate in (0.0, 0.5)}
    times = {key: [] for key in variants}  # each round's median step of each variant
    first_calls = {key: 0.0 for key in variants}
    for round_ in range(args.warmup + args.rounds):
        for key, step in variants.items():
            steps = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                steps.append(time.perf_counter() - start)
            if round_ == 0:
                first_calls[key] = steps[0]
            if round_ >= args.warmup:  # the first step of a turn follows another variant's
                times[key].append(statistics.median(steps[1:]))

    name = (args.config or args.hdm_config or Path(args.preset)).name
    print(f"# {name}: {XUT(config).num_parameters():,} parameters, batch {args.batch}, latent "
          f"{args.size}x{args.size}, {args.text_tokens} text tokens, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("# " + " ".join(sys.argv))
    fused = "cpu" in FUSED_ADAMW_DEVICES and not args.same_optimizer
    homediff_adamw = "fused" if fused else "torch's defaults"
    print(f"# AdamW: homediff {homediff_adamw}, original torch's defaults")
    print(f"# homediff's attention: {found}")
    print("| implementation | step | routing | ms/step | images/s | GFLOP/image | GFLOP/s | vs rate 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for (impl, mode, rate), samples in times.items():
        seconds = statistics.median(samples)
        flops = forward_flops(config, args.size, args.size, args.text_tokens, rate)
        flops *= 3 if mode == "train" else 1
        base = statistics.median(times[(impl, mode, 0.0)])
        print(f"| {impl} | {mode} | {rate} | {seconds * 1e3:.1f} | {args.batch / seconds:.1f} | "
              f"{flops / 1e9:.3f} | {flops * args.batch / seconds / 1e9:.1f} | {seconds / base:.2f} |")

    def ratio(slow: str, fast: str, mode: str, rate: float) -> str:
        """Median over rounds of the rounds' time ratios (paired in time, so drift cancels), and
        their quartiles."""
        ratios = [a / b for a, b in zip(times[(slow, mode, rate)], times[(fast, mode, rate)])]
        low, _, high = statistics.quantiles(ratios, n=4)
        return f"{statistics.median(ratios):.2f}x (quartiles over rounds {low:.2f}-{high:.2f})"

    reports = []
    if args.bf16:
        reports.append(("homediff", "homediff, bf16 autocast", "bf16 autocast over float32, homediff"))
    if args.compile:
        reports.append(("homediff", "homediff, compiled", "compiled over eager, homediff"))
    if args.original:
        pairs = [("original", "homediff")] + [("original", "homediff, compiled")] * args.compile
        pairs += [("original, bf16 autocast", "homediff, bf16 autocast")] * args.bf16
        pairs += [("original, bf16 autocast", "homediff, compiled, bf16 autocast")] * (args.bf16 and args.compile)
        reports += [(original, ours, f"{ours} over {original}") for original, ours in pairs]
    for slow, fast, label in reports:
        for mode in ("forward", "train"):
            for rate in (0.0, 0.5):
                print(f"{label}, {mode}, routing {rate}: {ratio(slow, fast, mode, rate)}")
    if args.compile:
        print("first compiled calls: " + ", ".join(
            f"{mode} {rate}: {first_calls[('homediff, compiled', mode, rate)]:.1f} s"
            for mode in ("forward", "train") for rate in (0.0, 0.5)))


if __name__ == "__main__":
    main()
