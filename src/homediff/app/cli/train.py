"""``homediff train``: run a training config, or resume one."""

from __future__ import annotations

from pathlib import Path


def register(commands) -> None:
    train = commands.add_parser(
        "train", help="train a model from a TOML config",
        description="Train through every stage of CONFIG into a run folder (checkpoints/, logs/, "
                    "samples/, and at the end model/). Ctrl-C writes a checkpoint and stops.")
    train.add_argument("config", type=Path, help="a TOML training config, e.g. configs/tiny-emoji.toml")
    train.add_argument("--out", type=Path, help="run folder (default runs/CONFIG-NAME)")
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
    train.set_defaults(run=run)


def run(args) -> int:
    from homediff.training.config import load_config
    from homediff.training.loop import train

    config = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / args.config.stem
    result = train(config, out, resume=args.resume, max_steps=args.max_steps, overwrite=args.overwrite,
                   checkpoint_every=args.checkpoint_every,
                   time_budget=args.minutes * 60 if args.minutes is not None else None)
    if result is not None:
        print(f"pipeline folder: {result}")
    return 0
