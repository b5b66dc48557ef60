"""Do XUT's claims hold at laptop scale? Skip wiring and routing, at equal parameters and CPU time.

    python benchmarks/ablations.py --minutes 5 --seeds 0 1            # about an hour on 2 cores

Variants, all built from the tiny-emoji recipe:
  last      XUT: every decoder group cross-attends to the final encoder output (the released HDM)
  mirror    XUT: decoder group i attends to encoder group depth−1−i (the HDM report's figure)
  no-skip   the same blocks without cross-attention (a DiT-style stack with concatenated text), its
            MLP widened to the same parameter count
  no-route  "last" without TREAD routing
Each variant trains for --minutes of wall-clock time per seed (its steps fitted by a probe run, so a
faster variant gets more steps), then is scored with the emoji evaluation. The table gives the mean
and the spread (max − min) over seeds; the loss curves go to --out/ablations-loss.png.
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

from homediff.config import load_config
from homediff.demo import fit_to_budget, recipe
from homediff.evaluate import EvalSettings, evaluate_fidelity
from homediff.models import XUT, XUTConfig
from homediff.pipeline import HomeDiffPipeline
from homediff.plots import line_plot, smooth
from homediff.train import Trainer

VARIANTS = {"last": {"skip": "last"}, "mirror": {"skip": "mirror"}, "no-skip": {"skip": "none"},
            "no-route": {"skip": "last"}}


def parameters(config: XUTConfig) -> int:
    with torch.device("meta"):
        return XUT(config).num_parameters()


def matched_mlp(base: XUTConfig, **changes) -> int:
    """The MLP width (a multiple of 8) that brings a variant closest to the base's parameter count."""
    target = parameters(base)
    widths = range(8, 4 * base.mlp_dim, 8)
    return min(widths, key=lambda m: abs(parameters(XUTConfig(**{**base.to_dict(), **changes,
                                                                   "mlp_dim": m})) - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training time per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data", type=Path, default=Path("data/emoji"))
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--per-caption", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = load_config(recipe("tiny-emoji"), [f"dataset.path={args.data / 'train'}",
                                              "train.sample_prompts=[]"])
    results, curves = {}, {}
    for name in args.variants:
        for seed in args.seeds:
            config = copy.deepcopy(base)
            config.train.seed = seed
            config.model.overrides.update(VARIANTS[name])
            if name == "no-route":
                config.stages[0].tread_rate = 0.0
            if name == "no-skip":  # the recipe is in pixel space (3 channels) with MiniLM (384-d)
                probe = XUTConfig.preset(config.model.preset, in_channels=3, ctx_dim=384)
                config.model.overrides["mlp_dim"] = matched_mlp(probe, skip="none")
            steps = fit_to_budget(config, args.minutes)
            run_dir = args.out / f"{name}-seed{seed}"
            trainer = Trainer(config, run_dir)
            pipe = HomeDiffPipeline.from_pretrained(trainer.run())
            pipe.set_progress_bar_config(disable=True)
            report = evaluate_fidelity(pipe, args.data, EvalSettings(per_caption=args.per_caption,
                                                                     seed=seed), out=run_dir)
            results.setdefault(name, []).append({
                "steps": steps, "parameters": trainer.unwrapped.num_parameters(),
                "loss": statistics.mean(v for _, v in trainer.progress.losses[-50:]),
                "seen_top5": report["seen"]["topk"][4], "heldout_top5": report["heldout"]["topk"][4],
                "seen_top1": report["seen"]["topk"][0], "fd": report["fd"]["generated"]})
            curves[f"{name} s{seed}"] = ([s for s, _ in trainer.progress.losses],
                                         smooth([v for _, v in trainer.progress.losses], 25))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.json").write_text(json.dumps(results, indent=1))
    line_plot(curves, args.out / "ablations-loss.png", title="training loss (moving mean of 25)",
              xlabel="step", ylabel="loss", log_y=True)
    print(f"# {args.minutes} min per run, seeds {args.seeds}; mean (spread over seeds)")
    print("# " + " ".join(sys.argv))
    print("| variant | parameters | steps | final loss | seen top-1 | seen top-5 | held-out top-5 | FD |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        def cell(key, pct=True):
            values = [r[key] for r in runs]
            scale = 100 if pct else 1
            return f"{statistics.mean(values) * scale:.1f} ({(max(values) - min(values)) * scale:.1f})"
        print(f"| {name} | {runs[0]['parameters']:,} | {statistics.mean(r['steps'] for r in runs):.0f} | "
              f"{cell('loss', False)} | {cell('seen_top1')} | {cell('seen_top5')} | "
              f"{cell('heldout_top5')} | {cell('fd', False)} |")


if __name__ == "__main__":
    main()
