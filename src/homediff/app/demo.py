"""``homediff demo``: a text-to-image model trained from scratch on a CPU, then shown and measured.

1. builds the emoji set if it is missing (offline, about 10 s);
2. trains the packaged ``tiny-emoji`` recipe for the time budget: a few probe steps set the
   warm-up and a first length, which the trainer re-fits to the budget as it measures its speed.
   On a CPU it trains in two data-parallel processes of one thread each where the machine has two
   cores or more (torchrun over gloo, each process with the recipe's batch), because the tiny
   model's small matrix products scale poorly over threads;
3. writes into the output folder: ``model/`` (the pipeline), ``samples.png`` (prompts seen in
   training and held-out combinations), ``loss.png``, the evaluation report ``eval.md`` /
   ``eval.json`` with its PNGs, and the camera measurement (``homediff eval camera`` on four seen
   prompts): ``camera.png``, ``camera.md`` / ``camera.json``, its table also in ``eval.md``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from homediff.errors import ConfigError, HomediffError
from homediff.evaluation import (CameraSettings, EvalSettings, camera_markdown, evaluate_camera,
                                 evaluate_fidelity, markdown, read_split, spread_captions)
from homediff.figures import labelled_grid
from homediff.generation import sample, seed_requests
from homediff.pipeline import HomeDiffPipeline
from homediff.training.checkpoint import Checkpoint, list_checkpoints
from homediff.training.config import TrainConfig, load_config, to_toml
from homediff.training.loop import Trainer
from homediff.training.run_folder import RUN_OUTPUTS
from homediff.training.timing import time_steps

logger = logging.getLogger(__name__)


def recipe(name: str) -> Path:
    """The path of a packaged recipe (``tiny-emoji``, ``tiny-shapes``, ``hdm-xut-base``)."""
    return Path(str(resources.files("homediff") / "recipes" / f"{name}.toml"))


def fit_to_budget(config: TrainConfig, minutes: float) -> int:
    """A first estimate of the single stage's length for ``minutes`` (a time-budgeted trainer
    re-fits it), with the warm-up capped at a tenth of it; returns the steps."""
    seconds = time_steps(config, steps=6, warmup=3)["seconds_per_step"]
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
    return Checkpoint.read_step(written[-1])


def sample_sheet(pipe: HomeDiffPipeline, data: Path, out: Path, seeds: int = 4, rows: int = 6,
                 steps: int = 24, cfg: float = 3.0) -> Path:
    """samples.png: seen prompts, then held-out ones."""
    train, held = read_split(data)
    seen = spread_captions(train, rows)
    prompts = [(f"seen: {c}", c) for c in seen] + [(f"held-out: {c}", c) for c in sorted(held)[:rows]]

    def row(prompt: str) -> list:
        return [image for request in seed_requests(prompt, list(range(seeds)), steps=steps, cfg=cfg)
                for image in sample(pipe, request)[0]]

    samples = labelled_grid([(label, row(prompt)) for label, prompt in prompts])
    samples.save(out / "samples.png")
    return out / "samples.png"


def run_demo(out: str | Path = "runs/demo", minutes: float = 15.0, data: str | Path = "data/emoji",
             settings: EvalSettings | None = None, overrides: list[str] = (),
             processes: int | None = None, overwrite: bool = False) -> dict:
    """Build the data if needed, train within ``minutes`` (in ``processes``, default
    ``default_processes()``), write samples and the evaluation. An earlier demo in ``out`` is
    replaced only with ``overwrite``."""
    from homediff.datasets.emoji import build_emoji_dataset

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
    samples = sample_sheet(pipe, data, out)
    report = evaluate_fidelity(pipe, data, settings or EvalSettings(progress=True), out=out)
    prompts = spread_captions(read_split(data)[0], CameraSettings.prompts)
    camera = evaluate_camera(pipe, prompts, CameraSettings(progress=True), out=out)
    report["camera"] = {**camera, "edits": {name: {k: v for k, v in edit.items() if k != "records"}
                                            for name, edit in camera["edits"].items()}}
    report["steps"], report["processes"] = steps, processes
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "eval.md").write_text(markdown(report) + "\n" + camera_markdown(report["camera"]),
                                 encoding="utf-8")
    report["files"] = [str(p) for p in [model_dir, samples, out / "camera.png", out / "loss.png",
                                        out / "eval.md"]]
    return report
