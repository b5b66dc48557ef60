"""``homediff train``: run a training config, resume one, or rehearse it (``--rehearse``)."""

from __future__ import annotations

import json
from pathlib import Path

from homediff.errors import ConfigError

GIB = 2 ** 30
REHEARSAL_OPTIONS = {"steps": "--steps", "stages": "--stage", "micro_batch": "--micro-batch",
                     "gpus": "--gpus", "json": "--json"}


def register(commands) -> None:
    train = commands.add_parser(
        "train", help="train a model from a TOML config",
        description="Train through every stage of CONFIG into a run folder (checkpoints/, logs/, "
                    "samples/, and at the end model/). Ctrl-C writes a checkpoint and stops.")
    train.add_argument("config", type=Path, help="a TOML training config, e.g. configs/tiny-emoji.toml")
    train.add_argument("--out", type=Path, help="run folder (default runs/CONFIG-NAME; with "
                                                "--rehearse a temporary folder, removed after)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="change a config value, e.g. --set stages.0.lr=0.2 (repeatable)")
    train.add_argument("--resume", nargs="?", const="latest", metavar="PATH|latest",
                       help="continue from a checkpoint folder, or the run's latest")
    train.add_argument("--overwrite", action="store_true",
                       help="start again in a run folder that holds another run (deletes its "
                            "checkpoints, logs, samples and model)")
    train.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps")
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    train.add_argument("--minutes", type=float,
                       help="train a one-stage config for this long: its length is re-fitted to the "
                            "budget as the step time is measured")
    rehearsal = train.add_argument_group(
        "rehearsal", "--rehearse runs a few optimiser steps of every stage at its real shapes, with "
        "the encoders' real architectures and random weights and random data (nothing to "
        "download), writes and reads back one checkpoint, and prints what it measured beside "
        "the plan (homediff plan): seconds per sample, peak memory, checkpoint size and time")
    rehearsal.add_argument("--rehearse", action="store_true", help="rehearse instead of training")
    rehearsal.add_argument("--steps", type=int, help="optimiser steps per stage (default 2; the "
                                                     "first is not timed)")
    rehearsal.add_argument("--stage", dest="stages", action="append", metavar="NAME",
                           help="rehearse this stage only, by name or resolution (repeatable)")
    rehearsal.add_argument("--micro-batch", type=int,
                           help="samples per forward pass (default: 1 on a CPU; on a GPU the "
                                "stage's batch, halved until the memory estimate fits)")
    rehearsal.add_argument("--gpus", type=int, help="processes the real run will have: the "
                                                    "projected hours share each stage's samples "
                                                    "among them (default 1)")
    rehearsal.add_argument("--json", action="store_true", help="print one JSON object instead")
    train.set_defaults(run=run)


def run(args) -> int:
    from homediff.training.config import load_config
    from homediff.training.loop import train

    given = [flag for name, flag in REHEARSAL_OPTIONS.items() if getattr(args, name)]
    if not args.rehearse and given:
        raise ConfigError(f"{', '.join(given)} go with --rehearse")
    if args.rehearse and (args.resume or args.minutes is not None or args.max_steps is not None):
        raise ConfigError("--rehearse runs its own steps of every stage: leave out --resume, "
                          "--minutes and --max-steps")
    config = load_config(args.config, args.overrides)
    if args.rehearse:
        return rehearse(config, args)
    out = args.out or Path("runs") / args.config.stem
    result = train(config, out, resume=args.resume, max_steps=args.max_steps, overwrite=args.overwrite,
                   checkpoint_every=args.checkpoint_every,
                   time_budget=args.minutes * 60 if args.minutes is not None else None)
    if result is not None:
        print(f"pipeline folder: {result}")
    return 0


def rehearse(config, args) -> int:
    from homediff.planning.rehearsal import rehearse as run_rehearsal

    results = run_rehearsal(config, steps=args.steps or 2, stages=args.stages,
                            micro_batch=args.micro_batch, gpus=args.gpus or 1, work_dir=args.out)
    if args.json:
        print(json.dumps({"config": str(args.config), "stages": [r.to_dict() for r in results]},
                         indent=1))
    else:
        print("\n".join(rehearsal_lines(results, str(args.config), args.gpus or 1)))
    return 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _size(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2 ** 20:.1f} MiB"


def rehearsal_lines(results, source: str, gpus: int) -> list[str]:
    """The rehearsal for people: one row per stage, measured (planned), then what it changed."""
    from homediff.app.cli.plan import table

    first = results[0]
    header = ["stage", "res", "micro×accum", "s/sample (plan)", f"stage h on {gpus} (plan)",
              "peak memory (plan)", "Δ", "checkpoint (plan)", "save s", "load s", "wall s"]
    rows = []
    for r in results:
        m, p = r.measured, r.planned
        rows.append([r.name, str(r.resolution), f"{r.micro_batch}×{r.grad_accum}",
                     f"{_seconds(m['seconds_per_sample'])} ({_seconds(p['seconds_per_sample'])})",
                     f"{_hours(m['projected_hours'])} ({_hours(p['hours'])})",
                     f"{_size(m['peak_bytes'])} ({_size(p['peak_bytes'])})", f"{r.memory_error:+.0%}",
                     f"{_size(m['checkpoint_bytes'])} ({_size(p['checkpoint_bytes'])})",
                     f"{m['save_seconds']:.2g}", f"{m['load_seconds']:.2g}", f"{m['wall_seconds']:.0f}"])
    memory = "CUDA's most allocated" if first.device.startswith("cuda") else "peak resident memory"
    precision = first.precision
    out = [f"{source}: rehearsal on {first.device} ({memory}), {first.steps} optimiser steps per "
           f"stage; plan: {first.planned['gpu']} at MFU {first.planned['mfu']:.3g}",
           f"precision: autocast {precision['autocast'] or 'off'}, text encoder {precision['text']}"
           + (f", Muon {precision['muon']}" if precision.get("muon") else ""), ""]
    out += table(header, rows)
    out.append("")
    for r in results:
        out.append(f"{r.name}: " + "; ".join(r.changes))
    out.append("Δ: measured peak memory against the plan's estimate. Check before paying for a run: "
               "each stage's peak fits your GPU with room to spare, and the hours are what you "
               "expect to pay for.")
    return out
