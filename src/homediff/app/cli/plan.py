"""``homediff plan``: what a training config will cost before it runs: samples, steps, FLOPs, hours,
GPU-hours and dollars per stage, memory per GPU, checkpoints and caches on disk."""

from __future__ import annotations

import json
from pathlib import Path

GIB = 2 ** 30


def register(commands) -> None:
    plan = commands.add_parser(
        "plan", help="time, cost, memory and disk of a training config, before running it",
        description="Plans every stage of CONFIG: samples and optimiser steps, training FLOPs per "
                    "sample (backbone with its routing, and the text encoder and VAE encoder "
                    "unless their outputs are cached), hours at an assumed MFU, GPU-hours and "
                    "cost, memory per GPU under DDP and FSDP2 with and without gradient "
                    "checkpointing, and the checkpoints' and caches' size on disk.")
    plan.add_argument("config", type=Path, help="a TOML training config, e.g. configs/hdm-xut-base.toml")
    plan.add_argument("--gpu", help="the GPU class (rtx3090, rtx4090, rtx5090, a100-40gb, a100-80gb, "
                                    "h100, h100-pcie, h200, l40s) or cpu (measured here); default "
                                    "this machine's")
    plan.add_argument("--gpus", type=int, default=1, help="how many (one process each; default 1)")
    plan.add_argument("--mfu", type=float,
                      help="the fraction of the peak rate the run achieves (default: the GPU "
                           "class's, from HDM's run for consumer cards)")
    plan.add_argument("--price-per-hour", type=float, metavar="DOLLARS", help="rent per GPU-hour")
    plan.add_argument("--images", type=int,
                      help="images in the data set, for stages given in epochs (default: count "
                           "dataset.path when it is a folder)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="change a config value, e.g. --set train.cache_latents=true (repeatable)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead")
    plan.set_defaults(run=run)


def run(args) -> int:
    from homediff.planning.calibration import default_mfu, hdm_comparison
    from homediff.planning.gpus import find_gpu, local_gpu
    from homediff.planning.memory import estimate_memory
    from homediff.planning.plan import dataset_images, plan_run
    from homediff.training.config import load_config

    config = load_config(args.config, args.overrides)
    gpu = find_gpu(args.gpu) if args.gpu else local_gpu()
    mfu, why = (args.mfu, "given") if args.mfu is not None else default_mfu(gpu)
    images = args.images
    caching = config.train.cache_text or config.train.cache_latents
    if images is None and (caching or any(stage.epochs for stage in config.stages)):
        images = dataset_images(config)
    plan = plan_run(config, gpu, args.gpus, mfu, args.price_per_hour, images, memory=estimate_memory)
    hdm = hdm_comparison(plan)
    if args.json:
        print(json.dumps({"config": str(args.config), **plan.to_dict(), "mfu_reason": why,
                          "hdm": hdm}, indent=1))
    else:
        print("\n".join(lines(plan, str(args.config), why, hdm)))
    return 0


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns aligned: the first to the left, the others to the right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in [header, *rows]]


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.0f}" if value >= 10 else f"${value:.2g}"


def _hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:,.1f}" if value >= 1 else f"{value:.2g}"


def _stage_rows(plan, hdm) -> tuple[list[str], list[list[str]]]:
    unit, scale = ("TFLOP", 1e12) if max(s.flops_per_sample for s in plan.stages) >= 1e11 else ("GFLOP", 1e9)
    header = ["stage", "res", "samples", "steps", "batch", f"{unit}/sample", "backbone", "text", "VAE",
              "hours", "GPU-h", "cost"]
    if hdm:
        header += ["HDM h", "HDM MFU"]
    rows = []
    for i, s in enumerate(plan.stages):
        f = s.flops
        row = [s.name, str(s.resolution), _count(s.samples), f"{s.steps:,}", f"{s.global_batch:,}",
               *(f"{value / scale:.3g}" for value in (s.flops_per_sample, f["backbone"],
                                                      f["text_encoder"], f["vae_encoder"])),
               _hours(s.hours), _hours(s.gpu_hours), _money(s.cost)]
        if hdm:
            row += [f"{hdm['stages'][i]['hours']:g}", f"{hdm['stages'][i]['mfu']:.3f}"]
        rows.append(row)
    total = plan.to_dict()["total"]
    row = ["total", "", _count(total["samples"]), f"{total['steps']:,}", "", "", "", "", "",
           _hours(plan.hours), _hours(plan.gpu_hours), _money(plan.cost)]
    if hdm:
        row += [f"{hdm['total']['hours']:g}", f"{hdm['total']['mfu']:.3f}"]
    return header, [*rows, row]


def _memory_lines(plan) -> list[str]:
    if not any(s.memory for s in plan.stages):
        return []
    kinds = [(row.sharding, row.checkpointing) for row in plan.stages[0].memory]
    header = ["stage", "micro-batch"] + [("DDP" if sharding == "ddp" else "FSDP2")
                                         + (" + ckpt" if ckpt else "") for sharding, ckpt in kinds]
    rows = [[s.name, str(s.micro_batch)] + [f"{row.total / GIB:.1f}{'' if row.fits else ' ✗'}"
                                            for row in s.memory] for s in plan.stages]
    where = f"one {plan.gpu.name}" if plan.gpu.kind != "cpu" else "this machine"
    out = [f"Peak memory per process, GiB (✗: over the {plan.gpu.memory_gib:g} GiB of {where}):",
           *table(header, rows)]
    if all(sharding == "ddp" for sharding, _ in kinds):
        out.append("(no FSDP2: it trains with optimizer.name = \"adamw\" only)")
    return out


def _disk_lines(plan) -> list[str]:
    parts = plan.checkpoint_bytes
    named = ", ".join(f"{name} {size / GIB:.2f}" for name, size in parts.items())
    out = [f"Checkpoint: {sum(parts.values()) / GIB:.2f} GiB ({named}); {plan.checkpoints_kept} kept "
           f"and one being written: {plan.checkpoint_disk / GIB:.1f} GiB"]
    caches = plan.cache_bytes()
    if caches:
        per = ("one entry per image; each new crop or caption variant adds one" if plan.images
               else "one entry per sample, the most: give --images N for one per image")
        out.append(f"Caches ({per}): "
                   + ", ".join(f"{name} {size / GIB:,.1f} GiB" for name, size in caches.items()))
    else:
        out.append("Caches: off (train.cache_text, train.cache_latents)")
    return out


def lines(plan, source: str, why: str, hdm: list[dict] | None) -> list[str]:
    """The readable plan."""
    gpu = plan.gpu
    price = f", ${plan.price_per_hour:g} per GPU-hour" if plan.price_per_hour is not None else ""
    rate = "measured" if gpu.kind == "cpu" else "dense bf16"
    out = [f"{source} on {plan.gpus} × {gpu.name} ({gpu.peak_tflops:,.4g} TFLOP/s {rate}, "
           f"{gpu.memory_gib:g} GiB){price}",
           f"MFU {plan.mfu:.3f}: {why}; {plan.parameters / 1e6:,.1f}M trained parameters", ""]
    out += table(*_stage_rows(plan, hdm))
    out.append("FLOPs per sample: the backbone's training step, the text and VAE encoders' forward "
               "passes (0: cached or none); batch: the global batch")
    memory = _memory_lines(plan)
    out += [""] + memory + ([""] if memory else []) + _disk_lines(plan)
    return out
