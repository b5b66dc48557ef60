"""What a training run shows: a progress bar, TensorBoard (and optionally wandb) logs, sample
sheets, the held-out loss, one line per checkpoint and, at the end, the loss curves. Only the main
process shows."""

from __future__ import annotations

import dataclasses
import logging
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from homediff.extras import require
from homediff.figures import line_plot, sample_sheet, smooth
from homediff.generation import sample, seed_requests

logger = logging.getLogger(__name__)


class Monitor:
    """Writes into the run folder only once training starts (``start_stage``): an attempt that
    fails before, a wrong path in the config say, leaves the folder as it was."""

    def __init__(self, run_dir: Path, *, enabled: bool, wandb: bool, config):
        self.run_dir, self.enabled, self.config, self.use_wandb = run_dir, enabled, config, wandb
        self.bar = self.writer = self.wandb = None
        self.postfix: dict[str, str] = {}  # the progress bar's values: train and held-out loss, …
        self.problems: Counter[str] = Counter()

    def _open_logs(self) -> None:
        """TensorBoard's log (with the resolved config) and wandb's run."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "logs"))
        if dataclasses.is_dataclass(self.config):  # the resolved config, beside the curves it explains
            from homediff.training.config import to_toml

            toml = to_toml(self.config).replace("\n", "  \n")  # TensorBoard renders the text as markdown
            self.writer.add_text("config", toml)
        if self.use_wandb:
            self.wandb = require("wandb", "wandb").init(project="homediff", dir=str(self.run_dir),
                                                        config=dataclasses.asdict(self.config))

    def say(self, message: str) -> None:
        """A line for the person watching (kept clear of the progress bar)."""
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(message, file=sys.stderr)
        logger.info(message)

    def start_stage(self, index: int, stage, total: int, done: int, flops_per_image: int) -> None:
        self.flops_per_image = flops_per_image
        self.last_time, self.images = time.perf_counter(), 0
        self.window: list[float] = []
        if not self.enabled:
            return
        if self.writer is None:
            self._open_logs()
        from tqdm import tqdm
        if self.bar:
            self.bar.close()
        name = stage.name or f"{stage.resolution}px"
        self.bar = tqdm(total=total, initial=done, desc=f"stage {index + 1}/{len(self.config.stages)} "
                        f"{name}", unit="step", dynamic_ncols=True, file=sys.stderr)

    def set_total(self, total: int) -> None:
        """A new length for the stage's progress bar."""
        if self.bar:
            self.bar.total = total
            self.bar.refresh()

    def count_problems(self, batch: dict) -> None:
        self.problems.update(batch.get("problems", {}))

    def step(self, progress, loss: float, groups, grad_norm, images: int) -> None:
        self.images += images
        self.window.append(loss)
        if not self.enabled:
            return
        lr = groups[0]["lr"] / groups[0]["lr_scale"]
        self.bar.update(1)
        if progress.step % self.config.train.log_every:
            return
        now = time.perf_counter()
        rate = self.images / max(now - self.last_time, 1e-9)
        mean = sum(self.window) / len(self.window)
        self.postfix.update(loss=f"{mean:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.1f}")
        self.bar.set_postfix(self.postfix)
        scalars = {"loss": mean, "lr": lr, "grad_norm": float(grad_norm), "images_per_s": rate,
                   "tflops_per_s": rate * self.flops_per_image / 1e12, "memory_gb": _memory_gb()}
        if self.config.train.peak_tflops > 0:
            scalars["mfu"] = scalars["tflops_per_s"] / self.config.train.peak_tflops
        if self.writer:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, progress.step)
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=progress.step)
        self.last_time, self.images, self.window = now, 0, []

    def checkpoint_line(self, path: Path, progress, stage: int) -> None:
        recent = [loss for _, loss in progress.losses[-100:]]
        mean = sum(recent) / max(1, len(recent))
        skipped = sum(self.problems.values())
        extra = f", {skipped} image problems so far ({dict(self.problems)})" if skipped else ""
        self.say(f"checkpoint step {progress.step} (stage {stage + 1}): "
                 f"loss {mean:.4f} over the last {len(recent)} steps{extra} -> {path}")

    def samples(self, pipeline, train, step: int) -> Path:
        """The sample sheet: a row per sample prompt, a column per sample seed, the prompt under
        every image; saved as samples/step-N.png and logged to TensorBoard as "samples". Image
        (prompt, seed) is the one ``homediff generate`` draws for that prompt and seed."""
        pipeline.set_progress_bar_config(disable=True)
        seeds, rows = train.sample_seeds, []
        for prompt in train.sample_prompts:  # a prompt's consecutive seeds in one batch
            requests = seed_requests(prompt, seeds, steps=train.sample_steps, cfg=train.sample_cfg)
            rows.append((prompt, [image for request in requests for image in sample(pipeline, request)[0]]))
        title = f"step {step}: {train.sample_steps} steps, guidance {train.sample_cfg:g}"
        sheet = sample_sheet(rows, [f"seed {seed}" for seed in seeds], title)
        path = self.run_dir / "samples" / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)
        if self.writer:
            import numpy as np
            self.writer.add_image("samples", np.asarray(sheet), step, dataformats="HWC")
        return path

    def validation(self, step: int, loss: float) -> None:
        """The held-out loss (``training.validation``) at ``step``."""
        self.say(f"step {step}: held-out loss {loss:.4f}")
        if self.bar:
            self.postfix["val"] = f"{loss:.4f}"
            self.bar.set_postfix(self.postfix)
        if self.writer:
            self.writer.add_scalar("val/loss", loss, step)
        if self.wandb:
            self.wandb.log({"val/loss": loss}, step=step)

    def finish(self, progress) -> None:
        if not self.enabled or not progress.losses:
            return
        steps = [s for s, _ in progress.losses]
        losses = [v for _, v in progress.losses]
        window = max(1, len(losses) // 50)
        curves = {"loss": (steps, losses), f"mean of {window}": (steps, smooth(losses, window))}
        if progress.val_losses:
            curves["held-out"] = ([s for s, _ in progress.val_losses], [v for _, v in progress.val_losses])
        title = "training and held-out loss" if progress.val_losses else "training loss"
        line_plot(curves, self.run_dir / "loss.png", title=title, xlabel="step", ylabel="loss",
                  log_y=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
