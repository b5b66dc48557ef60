"""``homediff demo``: train a text-to-image model from scratch on this machine and measure it."""

from __future__ import annotations

from pathlib import Path


def register(commands) -> None:
    demo = commands.add_parser(
        "demo", help="train the built-in emoji model from scratch, then show and measure it",
        description="Builds the emoji set if missing, trains the tiny-emoji recipe within the time "
                    "budget, and writes the pipeline, sample grids, the loss curve, the evaluation "
                    "report and the camera measurement into --out.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    demo.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    demo.add_argument("--data", type=Path, default=Path("data/emoji"), help="emoji set folder")
    demo.add_argument("--processes", type=int,
                      help="data-parallel training processes (default: 2 on a CPU with 2 cores or "
                           "more, each with the recipe's batch; 1 with a GPU)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="change a value of the tiny-emoji recipe, e.g. --set stages.0.lr=0.3")
    demo.set_defaults(run=run)


def run(args) -> int:
    from homediff.app.demo import run_demo
    from homediff.evaluation import camera_markdown, markdown

    report = run_demo(args.out, args.minutes, args.data, overrides=args.overrides,
                      processes=args.processes, overwrite=args.overwrite)
    print(markdown(report))
    print(camera_markdown(report["camera"]))
    print(f"trained {report['steps']} steps in {report['processes']} process(es); written:")
    for path in report["files"]:
        print(f"  {path}")
    return 0
