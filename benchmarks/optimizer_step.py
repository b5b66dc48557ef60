"""Optimiser step time beside the model's forward and backward: AdamW (torch's per-tensor loop and
the fused kernel the trainer builds on a CPU) against Muon (optim.MuonAdamW)
with its Newton-Schulz iteration in bfloat16 and in float32, and that iteration alone over the Muon
matrices one by one against stacked by shape.

    python benchmarks/optimizer_step.py --config configs/tiny-emoji.toml --threads 1

The model is the config's backbone at its first stage's resolution and batch, in one process (under
DDP each process orthogonalises about half of the matrices), fed random pixels and MiniLM-sized
text states: it fits the pixel-space tiny recipes, not a recipe behind a VAE. Variants are timed in interleaved
rounds and the median is reported, so that load on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from homediff.models import XUT, XUTConfig
from homediff.training.components import adamw
from homediff.training.config import load_config
from homediff.training.optim import (MuonAdamW, mark_muon_groups, orthogonalize, parameter_groups,
                                     set_lr)

CONTEXT_DIM = 384  # MiniLM's width; the text encoder itself is not needed here


def seconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-emoji.toml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    stage = config.stages[0]
    model = XUT(XUTConfig.preset(config.model.preset, in_channels=3, ctx_dim=CONTEXT_DIM,
                                 **config.model.overrides))
    text_length = config.text_encoder.options.max_length
    g = torch.Generator().manual_seed(0)
    x = torch.randn(stage.batch_size, 3, stage.resolution, stage.resolution, generator=g)
    t = torch.rand(stage.batch_size, generator=g)
    ctx = torch.randn(stage.batch_size, text_length, CONTEXT_DIM, generator=g)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        (model(x, t, ctx, tread_rate=stage.tread_rate, generator=g) - x).pow(2).mean().backward()

    forward_backward()
    def groups():  # each optimiser its own: torch writes its defaults into the group dicts
        return parameter_groups(model, config.optimizer.weight_decay, config.optimizer.lr_rule)

    optimizers = {
        "AdamW (torch), tensor by tensor": torch.optim.AdamW(groups(), foreach=False),
        "AdamW (torch), fused": adamw(groups(), torch.device("cpu")),
        "Muon, Newton-Schulz in bfloat16": MuonAdamW(mark_muon_groups(model, groups())),
        "Muon, Newton-Schulz in float32": MuonAdamW(mark_muon_groups(model, groups()), ns_dtype=torch.float32),
    }
    for optimizer in optimizers.values():
        set_lr(optimizer, 0.0, 1.0)  # time the arithmetic, leave the weights as they are
    # the Newton-Schulz iteration alone, over the Muon matrices' gradients: one product chain per
    # matrix, or one per shape over the stacked matrices (what MuonAdamW does)
    hidden = [p.grad for g in optimizers["Muon, Newton-Schulz in bfloat16"].param_groups if g["muon"]
              for p in g["params"]]
    by_shape = {}
    for grad in hidden:
        by_shape.setdefault(tuple(grad.shape), []).append(grad)
    stacks = [torch.stack(grads) for grads in by_shape.values()]
    iterations = {
        "Newton-Schulz (bfloat16), matrix by matrix": lambda: [orthogonalize(g) for g in hidden],
        "Newton-Schulz (bfloat16), stacked by shape": lambda: [orthogonalize(s) for s in stacks],
    }
    times = {name: [] for name in ["forward + backward", *optimizers, *iterations]}
    for _ in range(args.rounds):
        times["forward + backward"].append(seconds(forward_backward, args.repeats))
        for name, optimizer in optimizers.items():
            times[name].append(seconds(optimizer.step, args.repeats))
        for name, iteration in iterations.items():
            times[name].append(seconds(iteration, args.repeats))
    muon = sum(p.numel() for g in optimizers["Muon, Newton-Schulz in bfloat16"].param_groups
               if g["muon"] for p in g["params"])
    print(f"{args.config}: {sum(p.numel() for p in model.parameters()):,} parameters ({muon:,} on Muon), "
          f"batch {stage.batch_size} at {stage.resolution} px, {args.threads} thread(s), "
          f"median of {args.rounds} rounds; {len(hidden)} Muon matrices in {len(stacks)} shapes")
    print("| step | ms |\n|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()
