"""Does camera control emerge from shifted square crops? The tiny-scenes recipe trained three ways
at equal steps, each measured by ``homediff eval camera`` and by prompt fidelity.

    homediff data scenes data/scenes
    python benchmarks/camera_ablation.py --data data/scenes --seeds 0 1

Variants (``dataset.options.crop``):
  random   the shifted square crop: a random square window with its window of the scene's position
           map (HDM; the recipe's default)
  center   the centre square window, with its window of the position map
  squash   the whole scene resized to the square, with the square's grid

Each variant trains the recipe's steps (or --steps) per seed in ``--processes`` data-parallel
processes (``homediff train`` under torchrun), so equal steps are equal compute; a run folder that
already holds a model is measured again without training. Per run: the mean error of the shift and
zoom edits (as a share of the requested move), how many of the 10 edits are recovered (mean error
within 15 %), the consistency gain (correlation with the aligned canonical view minus the same for
another seed, averaged over all 12 edits), the square view's offset inside the 2:1 and 1:2 frames,
and caption-retrieval top-5 (seen and held-out). Prints a Markdown table; writes --out/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from homediff.app.demo import recipe
from homediff.evaluation import (CameraSettings, EvalSettings, evaluate_camera, evaluate_fidelity,
                                 read_split, spread_captions)
from homediff.pipeline import HomeDiffPipeline

CROPS = ("random", "center", "squash")


def train(data: Path, crop: str, seed: int, steps: int | None, run: Path, processes: int) -> None:
    overrides = [f"dataset.path={data / 'train'}", f"dataset.options.crop={crop}",
                 f"train.seed={seed}", *([f"stages.0.steps={steps}"] if steps else [])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or processes) // processes)))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "homediff", "train",
               str(recipe("tiny-scenes")), "--out", str(run), "--overwrite",
               *[part for o in overrides for part in ("--set", o)]]
    subprocess.run(command, env=env, check=True)


def summary(camera: dict, fidelity: dict) -> dict:
    """One run's row: errors, recovered edits, consistency gain, frame offsets, retrieval."""
    edits = camera["edits"]
    mean = statistics.fmean
    return {
        "shift_error": mean(e["shift_error"][0] for e in edits.values() if "shift_error" in e),
        "zoom_error": mean(e["zoom_error"][0] for e in edits.values() if "zoom_error" in e),
        "recovered": sum(e["recovered"] is True for e in edits.values()),
        "consistency_gain": mean(e["similarity"][0] - e["baseline"][0] for e in edits.values()),
        "frame_offset_px": mean(e["offset_px"][0] for n, e in edits.items() if "frame" in n),
        "seen_top5": fidelity["seen"]["topk"][4], "heldout_top5": fidelity["heldout"]["topk"][4]}


COLUMNS = [("shift_error", "shift error", 100, ".0f", "%"), ("zoom_error", "zoom error", 100, ".0f", "%"),
           ("recovered", "recovered (of 10)", 1, ".0f", ""),
           ("consistency_gain", "consistency gain", 1, ".2f", ""),
           ("frame_offset_px", "frame offset (px)", 1, ".1f", ""),
           ("seen_top5", "seen top-5", 100, ".0f", "%"), ("heldout_top5", "held-out top-5", 100, ".0f", "%")]


def table(rows: dict[str, list[dict]]) -> str:
    """Mean over seeds, with each seed's value in brackets."""
    lines = ["| crop | " + " | ".join(title for _, title, _, _, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for crop, runs in rows.items():
        cells = []
        for key, _, scale, spec, unit in COLUMNS:
            values = [scale * r[key] for r in runs]
            each = " / ".join(f"{v:{spec}}" for v in values)
            cells.append(f"{statistics.fmean(values):{spec}}{unit} ({each})")
        lines.append(f"| {crop} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/scenes"))
    parser.add_argument("--out", type=Path, default=Path("runs/camera-ablation"))
    parser.add_argument("--crops", nargs="+", default=list(CROPS), choices=CROPS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=6, help="camera prompts from train/")
    args = parser.parse_args()
    prompts = spread_captions(read_split(args.data)[0], args.prompts)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: one seed of every variant first
        for crop in args.crops:
            run = args.out / f"{crop}-seed{seed}"
            if not (run / "model" / "model_index.json").is_file():
                train(args.data, crop, seed, args.steps, run, args.processes)
            pipe = HomeDiffPipeline.from_pretrained(run / "model")
            pipe.set_progress_bar_config(disable=True)
            camera = evaluate_camera(pipe, prompts, CameraSettings(progress=True), out=run)
            fidelity = evaluate_fidelity(pipe, args.data, EvalSettings(progress=True), out=run)
            results.setdefault(crop, []).append({"seed": seed, **summary(camera, fidelity)})
            print(crop, seed, results[crop][-1], flush=True)
    (args.out / "ablation.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
