"""Do XUT's claims hold at laptop scale? Skip wiring and routing, at equal parameters and CPU time.

    python benchmarks/ablations.py --minutes 3 --seeds 0 1            # about 80 minutes

On 2 cores, the two tasks run side by side (one thread each) take about 45 minutes:

    export OMP_NUM_THREADS=1
    python benchmarks/ablations.py --tasks emoji & python benchmarks/ablations.py --tasks shapes

Tasks: ``emoji`` (the tiny-emoji recipe, scored by caption retrieval) and ``shapes`` (the
tiny-shapes recipe, scored by the rule-based composition checker). Variants of each recipe:
  last      XUT: every decoder group cross-attends to the final encoder output (the released HDM)
  mirror    XUT: decoder group i attends to encoder group depth−1−i (the HDM report's figure)
  no-skip   the same blocks without cross-attention (a DiT-style stack with concatenated text), its
            MLP widened to the same parameter count
  no-route  "last" without TREAD routing
  no-route-half-lr  the same at half the learning rate (without routing the recipe's LR can diverge)
Each variant trains for --minutes of wall-clock time per seed (the trainer fits its steps to the
time, so a faster variant gets more steps), with the same LR warm-up (--warmup, default the
recipe's 100 steps), then is scored with its task's evaluation. Each task gets a table
of the mean and the spread (max − min) over seeds; the loss curves go to --out/TASK-loss.png, the
numbers to --out/TASK.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

from homediff.app.demo import recipe
from homediff.evaluation import EvalSettings, evaluate_fidelity, evaluate_shapes
from homediff.figures import line_plot, smooth
from homediff.models import XUT, XUTConfig
from homediff.pipeline import HomeDiffPipeline
from homediff.training.config import load_config
from homediff.training.loop import Trainer

# variant: (skip wiring, routing rate or None for the recipe's, factor on the recipe's LR)
VARIANTS = {"last": ("last", None, 1.0), "mirror": ("mirror", None, 1.0), "no-skip": ("none", None, 1.0),
            "no-route": ("last", 0.0, 1.0), "no-route-half-lr": ("last", 0.0, 0.5)}


def parameters(config: XUTConfig) -> int:
    with torch.device("meta"):
        return XUT(config).num_parameters()


def matched_mlp(base: XUTConfig, **changes) -> int:
    """The MLP width (a multiple of 8) that brings a variant closest to the base's parameter count."""
    target = parameters(base)
    widths = range(8, 4 * base.mlp_dim, 8)
    return min(widths, key=lambda m: abs(parameters(XUTConfig(**{**base.to_dict(), **changes,
                                                                   "mlp_dim": m})) - target))


def emoji_scores(pipe, data: Path, per_caption: int, seed: int) -> dict:
    report = evaluate_fidelity(pipe, data, EvalSettings(per_caption=per_caption, seed=seed))
    return {"seen_top1": report["seen"]["topk"][0], "seen_top5": report["seen"]["topk"][4],
            "heldout_top5": report["heldout"]["topk"][4], "fd": report["fd"]["generated"]}


def shapes_scores(pipe, data: Path, per_caption: int, seed: int) -> dict:
    report = evaluate_shapes(pipe, data, EvalSettings(per_caption=per_caption, seed=seed))
    seen, held = report["seen"]["rates"], report["heldout"]["rates"]
    return {"colour": seen["colour"], "shape": seen["shape"], "count": seen["count"],
            "relation": seen["relation"], "all": seen["all"], "heldout_all": held["all"]}


# task: (recipe, data folder, scoring, table columns as (key, heading, in percent))
TASKS = {
    "emoji": ("tiny-emoji", Path("data/emoji"), emoji_scores,
              [("seen_top1", "seen top-1", True), ("seen_top5", "seen top-5", True),
               ("heldout_top5", "held-out top-5", True), ("fd", "FD-EffNetLite0", False)]),
    "shapes": ("tiny-shapes", Path("data/shapes"), shapes_scores,
               [("colour", "colour", True), ("shape", "shape", True), ("count", "count", True),
                ("relation", "relation", True), ("all", "all", True),
                ("heldout_all", "held-out all", True)]),
}
BUILD = {"emoji": "homediff data emoji data/emoji --size 64",
         "shapes": "homediff data shapes data/shapes --size 64 --count 10000"}


def variant_config(base, name: str, seed: int):
    config = copy.deepcopy(base)
    config.train.seed = seed
    skip, rate, lr_factor = VARIANTS[name]
    config.model.overrides["skip"] = skip
    if rate is not None:
        config.stages[0].tread_rate = rate
    config.stages[0].lr *= lr_factor
    if name == "no-skip":  # both recipes are in pixel space (3 channels) with MiniLM (384-d)
        probe = XUTConfig.preset(config.model.preset, in_channels=3, ctx_dim=384,
                                 **{k: v for k, v in base.model.overrides.items() if k != "skip"})
        config.model.overrides["mlp_dim"] = matched_mlp(probe, skip="none")
    return config


def cell(runs: list[dict], key: str, percent: bool = True) -> str:
    """Mean over seeds with the spread (max − min) in brackets; "–" where nothing was scored."""
    values = [r[key] for r in runs if r[key] is not None]
    if not values:
        return "–"
    scale = 100 if percent else 1
    return f"{statistics.mean(values) * scale:.1f} ({(max(values) - min(values)) * scale:.1f})"


def run_task(task: str, args) -> None:
    recipe_name, data, scores, columns = TASKS[task]
    if not (data / "train").is_dir():
        raise SystemExit(f"{data}/train not found: build it first with `{BUILD[task]}`")
    base = load_config(recipe(recipe_name), [f"dataset.path={data / 'train'}",
                                             "train.sample_prompts=[]"])
    results, curves = {}, {}
    for name in args.variants:
        for seed in args.seeds:
            config = variant_config(base, name, seed)
            if args.warmup:
                config.optimizer.warmup_steps = args.warmup
            trainer = Trainer(config, args.out / f"{task}-{name}-seed{seed}",
                              time_budget=args.minutes * 60)
            pipe = HomeDiffPipeline.from_pretrained(trainer.run())
            pipe.set_progress_bar_config(disable=True)
            losses = trainer.progress.losses
            results.setdefault(name, []).append({
                "steps": trainer.progress.step, "parameters": trainer.unwrapped.num_parameters(),
                "loss": statistics.mean(v for _, v in losses[-50:]),
                **scores(pipe, data, args.per_caption, seed)})
            curves[f"{name} s{seed}"] = ([s for s, _ in losses], smooth([v for _, v in losses], 25))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{task}.json").write_text(json.dumps(results, indent=1))
    line_plot(curves, args.out / f"{task}-loss.png", title=f"{task}: training loss (moving mean "
              "of 25)", xlabel="step", ylabel="loss", log_y=True)
    print(f"\n# {task}: {args.minutes} min per run, seeds {args.seeds}; mean (spread over seeds)")
    print("| variant | parameters | steps | final loss | "
          + " | ".join(heading for _, heading, _ in columns) + " |")
    print("|---" * (4 + len(columns)) + "|")
    for name, runs in results.items():
        print(f"| {name} | {runs[0]['parameters']:,} | "
              f"{statistics.mean(r['steps'] for r in runs):.0f} | {cell(runs, 'loss', False)} | "
              + " | ".join(cell(runs, key, percent) for key, _, percent in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training time per run")
    parser.add_argument("--warmup", type=int, default=0,
                        help="LR warm-up steps for every run (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--per-caption", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("# " + " ".join(sys.argv))
    for task in args.tasks:
        run_task(task, args)


if __name__ == "__main__":
    main()
