"""``homediff demo``: a text-to-image model trained from scratch on a CPU, then shown and measured.

1. builds the emoji set if it is missing (offline, about 10 s);
2. trains the packaged ``tiny-emoji`` recipe for the time budget: a few probe steps set the
   warm-up and a first length, which the trainer re-fits to the budget as it measures its speed.
   On a CPU it trains in two data-parallel processes of one thread each where the machine has two
   cores or more (torchrun over gloo, each process with the recipe's batch), because the tiny
   model's small matrix products scale poorly over threads;
3. writes into the output folder: ``model/`` (the pipeline), ``samples.png`` (prompts seen in
   training and held-out combinations), ``camera.png`` (zoom and shifts on one prompt and seed),
   ``loss.png``, and the evaluation report ``eval.md`` / ``eval.json`` with its PNGs.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from homediff.errors import ConfigError, HomediffError
from homediff.evaluation import EvalSettings, evaluate_fidelity, read_split
from homediff.figures import labelled_grid
from homediff.pipeline import HomeDiffPipeline
from homediff.training.checkpoint import Checkpoint, list_checkpoints
from homediff.training.config import TrainConfig, load_config, to_toml
from homediff.training.loop import RUN_OUTPUTS, Trainer

logger = logging.getLogger(__name__)


def recipe(name: str) -> Path:
    """The path of a packaged recipe (``tiny-emoji``, ``tiny-shapes``, ``hdm-xut-base``)."""
    return Path(str(resources.files("homediff") / "recipes" / f"{name}.toml"))


def probe_seconds_per_step(config: TrainConfig, steps: int = 6, warmup: int = 3) -> float:
    """Seconds per optimiser step of ``config`` on this machine, from a short throw-away run."""
    config = copy.deepcopy(config)
    config.train.sample_prompts = []
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, max_steps=warmup + steps, checkpoint_every=10**9)
        trainer.run(callback=lambda progress, batch: stamps.append(time.perf_counter()))
    accum = config.stages[0].grad_accum
    return (stamps[-1] - stamps[warmup * accum]) / (steps - 1)


def fit_to_budget(config: TrainConfig, minutes: float) -> int:
    """A first estimate of the single stage's length for ``minutes`` (a time-budgeted trainer
    re-fits it), with the warm-up capped at a tenth of it; returns the steps."""
    seconds = probe_seconds_per_step(config)
    steps = max(20, int(minutes * 60 / seconds))
    config.stages[0].steps, config.stages[0].epochs = steps, 0.0
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    logger.info("%.2f s per step here: %d steps fit in %.0f minutes", seconds, steps, minutes)
    return steps


def default_processes() -> int:
    """Training processes of the demo: one per core up to two on a CPU, one with a GPU."""
    return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))


def train_for(config: TrainConfig, out: Path, minutes: float, processes: int = 1,
              overwrite: bool = False) -> int:
    """Train ``config`` into ``out`` for ``minutes`` in ``processes`` data-parallel processes
    (``homediff train --minutes`` under torchrun, each with ``cores / processes`` threads unless
    OMP_NUM_THREADS is set); returns the optimiser steps. ``overwrite`` replaces a run in ``out``."""
    if processes == 1:
        trainer = Trainer(config, out, time_budget=minutes * 60, overwrite=overwrite)
        trainer.run()
        return trainer.progress.step
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "demo-config.toml"
    config_file.write_text(to_toml(config), encoding="utf-8")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or processes) // processes)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "homediff", "train", str(config_file),
               "--out", str(out), "--minutes", str(minutes), *(["--overwrite"] if overwrite else [])]
    started = time.time()
    finished = subprocess.run(command, env=env)
    if finished.returncode != 0:
        raise HomediffError(f"training in {processes} processes failed (exit code "
                            f"{finished.returncode}): see the messages above, or retry with "
                            "--processes 1")
    written = [p for p in list_checkpoints(out / "checkpoints") if p.stat().st_mtime >= started]
    if not written:
        raise HomediffError(f"{out / 'checkpoints'}: the training processes wrote no checkpoint")
    return Checkpoint.read_progress(written[-1])["progress"]["step"]


def sample_sheets(pipe: HomeDiffPipeline, data: Path, out: Path, seeds: int = 4, rows: int = 6,
                  steps: int = 24, cfg: float = 3.0) -> list[Path]:
    """samples.png (seen prompts, then held-out ones) and camera.png."""
    train, held = read_split(data)
    seen = sorted(train)[:: max(1, len(train) // rows)][:rows]
    prompts = [(f"seen: {c}", c) for c in seen] + [(f"held-out: {c}", c) for c in sorted(held)[:rows]]
    size = pipe.sample_size

    def draw(prompt: str, seed: int, height: int = size, width: int = size, **options):
        return pipe(prompt, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=cfg, generator=torch.Generator().manual_seed(seed),
                    **options).images[0]

    samples = labelled_grid([(label, [draw(prompt, seed) for seed in range(seeds)])
                             for label, prompt in prompts])
    samples.save(out / "samples.png")
    prompt = seen[0]
    moves = [("as is", {}), ("zoom 1.5", {"zoom": 1.5}), ("zoom 0.7", {"zoom": 0.7}),
             ("x -0.4", {"x_shift": -0.4}), ("x +0.4", {"x_shift": 0.4}), ("y +0.4", {"y_shift": 0.4})]
    strip = [draw(prompt, 0, camera=camera) for _, camera in moves]
    wide = draw(prompt, 0, width=2 * size)
    camera_sheet = labelled_grid([(f"camera: {prompt}", strip)], columns=[m for m, _ in moves])
    sheet = Image.new("RGB", (camera_sheet.width, camera_sheet.height + wide.height * 2), "white")
    sheet.paste(camera_sheet, (0, 0))
    ImageDraw.Draw(sheet).text((4, camera_sheet.height + wide.height - 6), "2:1, same seed", fill="black")
    sheet.paste(wide.resize((wide.width * 2, wide.height * 2), Image.NEAREST), (260, camera_sheet.height))
    sheet.save(out / "camera.png")
    return [out / "samples.png", out / "camera.png"]


def run_demo(out: str | Path = "runs/demo", minutes: float = 15.0, data: str | Path = "data/emoji",
             settings: EvalSettings | None = None, overrides: list[str] = (),
             processes: int | None = None, overwrite: bool = False) -> dict:
    """Build the data if needed, train within ``minutes`` (in ``processes``, default
    ``default_processes()``), write samples and the evaluation. An earlier demo in ``out`` is
    replaced only with ``overwrite``."""
    from homediff.data.emoji import build_emoji_dataset

    out, data = Path(out), Path(data)
    if processes is not None and processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {processes}")
    if not overwrite and any((out / name).exists() for name in RUN_OUTPUTS):
        raise HomediffError(f"{out} holds an earlier run: `homediff demo --overwrite` replaces it, "
                            "--out writes elsewhere")
    if not (data / "train").is_dir():
        logger.warning("building the emoji set in %s", data)
        build_emoji_dataset(data, size=64)
    config = load_config(recipe("tiny-emoji"), [f"dataset.path={data / 'train'}", *overrides])
    processes = processes or default_processes()
    steps = fit_to_budget(config, minutes)
    logger.warning("training for %.0f minutes (about %d steps in one process) in %d process%s "
                   "into %s", minutes, steps, processes, "es" if processes > 1 else "", out)
    steps = train_for(config, out, minutes, processes, overwrite=True)
    model_dir = out / "model"
    pipe = HomeDiffPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    sheets = sample_sheets(pipe, data, out)
    report = evaluate_fidelity(pipe, data, settings or EvalSettings(progress=True), out=out)
    report["files"] = [str(p) for p in [model_dir, *sheets, out / "loss.png", out / "eval.md"]]
    report["steps"], report["processes"] = steps, processes
    return report
