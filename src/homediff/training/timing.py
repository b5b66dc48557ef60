"""How long a training step of a config takes on this machine: a short throw-away run, timed.

``homediff demo`` fits its run to a time budget with it and ``homediff doctor`` reports it; both
time the same way (one rule for gradient accumulation, the precisions the run chose reported).
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import time

from homediff.training.config import TrainConfig
from homediff.training.loop import Trainer


def time_steps(config: TrainConfig, steps: int, warmup: int) -> dict:
    """Seconds per optimiser step of ``config`` over ``steps`` steps after ``warmup`` (a run in a
    temporary folder, without sample sheets), and the precisions its trainer chose:
    ``{"seconds_per_step", "precision": {"muon", "mixed_precision", "text_encoder"}}``."""
    if steps < 2 or warmup < 1:
        raise ValueError(f"time at least 2 steps after at least 1 warm-up step, got {steps}, {warmup}")
    config = copy.deepcopy(config)
    config.train.sample_prompts = []
    stamps: list[float] = []
    # the trainer's progress bar and announcements are for a person watching a run
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stderr(io.StringIO()):
        trainer = Trainer(config, run_dir, max_steps=warmup + steps, checkpoint_every=10**9)
        trainer.run(callback=lambda progress, batch: stamps.append(time.perf_counter()))
    accum = config.stages[0].grad_accum  # the callback sees every micro-batch
    first = warmup * accum
    chosen = trainer.precision
    return {"seconds_per_step": (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first) * accum,
            "precision": {"muon": chosen.muon, "mixed_precision": chosen.autocast or "float32",
                          "text_encoder": chosen.text}}
