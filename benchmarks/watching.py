"""What watching a run costs: the sample sheet and the held-out loss against the training steps.

    python benchmarks/watching.py --config configs/tiny-emoji.toml --set dataset.path=data/emoji/train

Trains ``--steps`` steps after ``--warmup`` (median seconds per step), then times the trainer's own
``sample()`` (the sheet of the recipe's prompts by ``train.sample_seeds``, drawn, saved and logged)
and ``validate()`` (the held-out loss of the EMA weights) ``--repeats`` times each (medians).
Prints the share of the run's time that sheets every ``sample_every`` steps and the held-out loss
every ``val_every`` steps take, for the config's values and a few others. One process with the
current threads; the demo trains in processes of one thread each (``OMP_NUM_THREADS=1`` shows that).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time

import torch

from homediff import precision
from homediff.training.components import Components
from homediff.training.config import load_config
from homediff.training.loop import Trainer
from homediff.training.objective import LossSettings


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config, steps: int, warmup: int, repeats: int) -> dict:
    """Median seconds per training step, per sheet and per held-out evaluation."""
    config = copy.deepcopy(config)
    config.train.sample_every, config.train.val_every = 0, 10**9  # held-out set built, never due
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, max_steps=warmup + steps, checkpoint_every=10**9)
        trainer.run(callback=lambda progress, batch: stamps.append(time.perf_counter()))
        if trainer.held_out is None:
            raise SystemExit("no held-out images: set dataset.val_path (or build the emoji set)")
        stage = config.stages[0]
        parts = Components(trainer.model, trainer.text_encoder, trainer.autoencoder)
        settings = LossSettings.of(config, stage, precision.DTYPES.get(trainer.precision["autocast"]))
        sheet = median_seconds(trainer.sample, repeats)
        validation = median_seconds(lambda: trainer.validate(parts, settings), repeats)
        images = sum(len(batch["key"]) for batch in trainer.held_out)
    intervals = [b - a for a, b in zip(stamps[warmup * stage.grad_accum::stage.grad_accum],
                                      stamps[(warmup + 1) * stage.grad_accum::stage.grad_accum])]
    return {"step": statistics.median(intervals), "sheet": sheet, "validation": validation,
            "held_out_images": images, "autocast": trainer.precision["autocast"] or "off"}


def share(seconds: dict, sample_every: int, val_every: int) -> tuple[float, float]:
    """The shares of a run's time spent on sheets and on the held-out loss."""
    sheets = seconds["sheet"] / sample_every if sample_every else 0.0
    validation = seconds["validation"] / val_every if val_every else 0.0
    total = seconds["step"] + sheets + validation
    return sheets / total, validation / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-emoji.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    config = load_config(args.config, args.overrides)
    seconds = measure(config, args.steps, args.warmup, args.repeats)
    train, stage = config.train, config.stages[0]
    print(f"# {args.config}: batch {stage.batch_size}, {stage.resolution}px, {torch.get_num_threads()} "
          f"threads; sheet {len(train.sample_prompts)} prompts x {len(train.sample_seeds)} seeds, "
          f"{train.sample_steps} steps, guidance {train.sample_cfg:g}; held-out loss on "
          f"{seconds['held_out_images']} images; autocast {seconds['autocast']}")
    print("# " + " ".join(sys.argv))
    print(f"# s/step {seconds['step']:.3f}, s/sheet {seconds['sheet']:.3f}, "
          f"s/held-out loss {seconds['validation']:.3f}")
    print("| sample_every | val_every | sheets | held-out loss | together |")
    print("|---|---|---|---|---|")
    defaults = (train.sample_every, train.val_every)
    for every, val in sorted({defaults, (100, 100), (250, 100), (1000, 100), (500, 50), (500, 25)}):
        sheets, validation = share(seconds, every, val)
        mark = " (config)" if (every, val) == defaults else ""
        print(f"| {every}{mark} | {val} | {sheets:.1%} | {validation:.1%} | {sheets + validation:.1%} |")


if __name__ == "__main__":
    main()
