"""The training loop: stages, optimiser steps, EMA, checkpoints, samples and logs.

    trainer = Trainer(load_config("configs/tiny-emoji.toml"), "runs/emoji")
    trainer.run()                   # or Trainer(..., resume="latest").run()

A run folder holds ``checkpoints/`` (every ``checkpoint_every`` steps and at each stage's end),
``logs/`` (TensorBoard), ``samples/`` (sheets of the fixed prompts by the fixed seeds from the EMA
weights, every ``sample_every`` steps and at each stage's end) and, at the end, what ``export``
writes: ``model/`` (a pipeline folder of the EMA weights), ``model.safetensors`` (the EMA backbone
in one file) and ``loss.png``. The same code runs on a CPU, one GPU, or many GPUs and nodes under
``accelerate launch`` or ``torchrun``.

The Trainer only trains; the rest lives beside it: claiming the run folder (``run_folder``), what
a checkpoint carries and the checks before a resume (``run_state``), the accelerator, sharding,
compiling and caches (``infrastructure``), the parts (``components``), the data's step batches
(``batches``), stop signals (``stopping``) and the final weights (``export``).

FSDP (``ACCELERATE_USE_FSDP=true`` under torch.distributed) shards the backbone: see ``sharding``;
AdamW only, since Muon needs whole matrices. A run resumes in any number of processes, keeping
each stage's global batch (see ``elastic``).

``time_budget`` (seconds, single-stage configs; ``homediff demo``): every ``REFIT_EVERY`` steps the
stage's length is re-fitted so that training ends on the budget at the mean step time so far, and
the cosine learning-rate schedule follows the new length.

With ``dataset.val_path``, every ``val_every`` steps and at each stage's end the EMA weights (the
trained ones without an EMA) are scored on held-out images (``training.validation``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from homediff import precision
from homediff.errors import ConfigError, HomediffError
from homediff.models import XUT
from homediff.models.flops import train_step_flops
from homediff.training import infrastructure, sharding
from homediff.training.batches import step_batches
from homediff.training.alignment import Aligner
from homediff.training.checkpoint import Checkpoint, Progress, rng_state
from homediff.training.compiling import AutoCompile, compile_backbone, is_compile_error
from homediff.training.components import Builders, Components
from homediff.training.config import StageConfig, TrainConfig, to_toml
from homediff.training.export import adapters, export_run, final_weights, model_copy
from homediff.training.objective import LossSettings
from homediff.training.optim import full_tensor, lr_multiplier, set_lr
from homediff.training.precisions import choose_precisions
from homediff.training.run_folder import claim_run_folder
from homediff.training.run_state import (
    RunState,
    check_resumable,
    fit_to_processes,
    load_trained_state,
    merge_positions,
    trained_state,
)
from homediff.training.stopping import StopSignals, StopWhileWaiting
from homediff.training.validation import stage_held_out, validation_loss

logger = logging.getLogger(__name__)

REFIT_EVERY = 10


class TrainingStopped(HomediffError):
    """Training stopped before its end (bad steps in a row)."""


class Trainer:
    """Trains ``config`` into ``run_dir``. Its parts are made by ``builders`` (see
    ``training.components``); ``clock`` (seconds) times the steps for a ``time_budget``."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, *, resume: str | None = None,
                 max_steps: int | None = None, checkpoint_every: int | None = None,
                 time_budget: float | None = None, overwrite: bool = False,
                 builders: Builders = Builders(), clock=time.perf_counter):
        if time_budget is not None and (time_budget <= 0 or len(config.stages) != 1):
            raise ConfigError("a time budget needs a positive number of seconds and a config with "
                              f"one stage (got {time_budget} s, {len(config.stages)} stages)")
        self.config, self.run_dir, self.build, self.clock = config, Path(run_dir), builders, clock
        # checkpoints keep the config as given; a resume may fit self.config's grad_accum to
        # another number of processes than the run began with (``elastic``)
        self.run_config = config
        self.max_steps, self.time_budget = max_steps, time_budget
        self.checkpoint_every = checkpoint_every or config.train.checkpoint_every
        self.accelerator = builders.accelerator(config)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device, self.rank = self.accelerator.device, self.accelerator.process_index
        torch.manual_seed(config.train.seed)
        self.generator = torch.Generator(self.device).manual_seed(config.train.seed * 1009 + self.rank)
        resume_path, saved = Checkpoint.open(self.run_dir / "checkpoints", resume) if resume else (None, None)
        if not resume:
            claim_run_folder(self.run_dir, overwrite, self.accelerator.is_main_process,
                             self.accelerator.wait_for_everyone)
        self.text_encoder = builders.text_encoder(config, self.device)
        self.autoencoder = builders.autoencoder(config, self.device)
        self.stage_text_encoder = self.text_encoder  # each stage's view sets its text length
        model = builders.model(config, self.text_encoder, self.autoencoder, self.device)
        fitted = ""
        if saved:
            check_resumable(saved, resume_path, config, model.config.to_dict())
            self.config, fitted = fit_to_processes(saved, resume_path, config,
                                                   self.accelerator.num_processes)
        self.precision = choose_precisions(config, self.device,
                                           (model, self.text_encoder, self.autoencoder),
                                           saved.precision if saved else None, agree=self._mean)
        model, self.fsdp = infrastructure.shard_if_requested(model, config, self.device)
        self.ema = builders.ema(config, model)  # under FSDP over the shards: each averages its own
        self.model = infrastructure.prepare_model(model, self.accelerator, config, self.fsdp)
        self.compiler = None  # the "auto" compile decision, made in the first stage trained
        self._compiled = None  # its compiled backbone, once made
        self.caches = infrastructure.build_caches(config, self.run_dir, self.rank)
        self.aligner = Aligner(self.device) if config.train.align_weight else None
        infrastructure.warn_about_workers(config, self.device)
        self.progress = Progress(processes=self.accelerator.num_processes)
        self.monitor = builders.monitor(config, self.run_dir, self.accelerator.is_main_process)
        self.monitor.say(f"precision: {self.precision.describe()}")
        self._resumed = self._restore(saved, resume_path, fitted) if saved else None
        self.signals = StopSignals(self.monitor.say, self.run_dir / "checkpoints",
                                   self.accelerator.num_processes == 1)

    @property
    def unwrapped(self) -> XUT:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _mean(self, value: float) -> float:
        """``value`` averaged over every process."""
        return self.accelerator.reduce(torch.tensor(value, device=self.device), "mean").item()

    # -- the loop ----------------------------------------------------------------------------

    def run(self, callback=None) -> Path | None:
        """Train through every stage; returns the exported pipeline folder (rank 0). ``callback``
        (progress, batch), if given, sees every micro-batch."""
        try:
            with self.signals:
                if self._stop_reason():  # resumed at or past --max-steps
                    self.monitor.say(f"step {self.progress.step}: at --max-steps {self.max_steps} already")
                    return None
                while self.progress.stage < len(self.config.stages):
                    if not self._train_stage(callback):
                        return None
                return self._export()
        finally:
            if getattr(self, "stream", None) is not None:
                self.stream.close()
            self.monitor.close()

    def _train_stage(self, callback) -> bool:
        """Run the current stage to its end; False when stopped early (signal or --max-steps)."""
        index = self.progress.stage
        stage = self.config.stages[index]
        optimizer, total = self._start_stage(index, stage)
        parts = Components(self.model, self.stage_text_encoder, self.autoencoder, self.caches,
                           self.aligner)
        settings = LossSettings.of(self.config, stage, precision.DTYPES.get(self.precision.autocast))
        warmup, low = self.config.optimizer.warmup_steps, self.config.optimizer.min_lr_ratio
        started, first_step, bad_steps = self.clock(), self.progress.stage_step, 0
        try:
            for micro_batches in step_batches(self.stream, self.progress, stage.grad_accum,
                                              self.accelerator.num_processes, self.signals.waiting,
                                              self._batch_seen(callback)):
                try:
                    loss = self._backward(micro_batches, parts, settings)
                except Exception as error:
                    if not (self.compiler and self.compiler.running == "compiled" and is_compile_error(error)):
                        raise
                    loss = self._after_compile_error(error, optimizer, micro_batches, parts, settings)
                set_lr(optimizer, stage.lr, lr_multiplier(self.progress.stage_step, total, warmup, low))
                if not torch.isfinite(self.accelerator.reduce(loss, "mean")):
                    bad_steps = self._skip_step(optimizer, bad_steps + 1)
                    self._switch_backbone(self.compiler and self.compiler.failed(), parts)
                    continue
                bad_steps = 0
                self._optimizer_step(optimizer, stage, loss)
                self._compile_as_measured(parts, started, total)
                if self.time_budget and self.progress.stage_step % REFIT_EVERY == 0:
                    total = self._fit_to_time_budget(started, first_step)
                done = self.progress.stage_step >= total
                self._watch(parts, settings, stage_end=done)
                stop = self._stop_reason()
                if done:
                    self.progress.next_stage()
                if done or stop or self.progress.step % self.checkpoint_every == 0:
                    self.save_checkpoint(optimizer, index)
                if stop:
                    break
                if done:
                    return True
        except StopWhileWaiting:
            self.save_checkpoint(optimizer, index)
            stop = f"signal {self.signals.received}"
        self.monitor.say(f"stopped at step {self.progress.step} ({stop}); resume with --resume latest")
        return False

    def _start_stage(self, index: int, stage: StageConfig) -> tuple[torch.optim.Optimizer, int]:
        """The stage's data stream, optimiser (restored on a resume) and length in steps."""
        # the stage's view of the text encoder: its text length, the shared encoder unchanged
        self.stage_text_encoder = self.text_encoder.with_options(max_length=stage.text_length)
        self.stream = self.build.stream(self.config, index, self.device)
        self.held_out = None
        if self.config.train.val_every and self.accelerator.is_main_process:
            self.held_out = stage_held_out(self.config, stage, self.stream, self.monitor.say,
                                           "EMA" if self.ema else "trained")
        total = stage.steps or stage_length(stage, len(self.stream))
        images = len(self.stream.dataset) if self.stream.kind == "folder" else None
        for line in infrastructure.cache_sizes(self.caches, stage, images, self.autoencoder,
                                               self.text_encoder, self.device):
            self.monitor.say(line)
        muon = self.precision.muon
        optimizer = self.accelerator.prepare_optimizer(self.build.optimizer(
            self.config, stage, self.unwrapped, precision.DTYPES[muon] if muon else None, self.device))
        if self._resumed:
            self._resumed.restore_stage(self.unwrapped, optimizer.optimizer, self.accelerator.scaler,
                                        self.stream, self.fsdp)
            self._resumed = None
        side = stage.resolution // self.autoencoder.factor
        flops = train_step_flops(self.unwrapped.config, side, side, stage.text_length, stage.tread_rate)
        self.monitor.start_stage(index, stage, total, self.progress.stage_step, flops)
        self.model.train()
        return optimizer, total

    def _batch_seen(self, callback):
        """What happens to every micro-batch as it arrives: the caller's ``callback``
        (progress, batch), and the monitor counts the data set's problems."""
        def seen(batch: dict) -> None:
            if callback:
                callback(self.progress, batch)
            self.monitor.count_problems(batch)
        return seen

    def _backward(self, micro_batches: list[dict], parts: Components, settings: LossSettings):
        """Gradients of the step's mean loss over its micro-batches (synchronised between
        processes once, at the last); returns that loss."""
        losses = []
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.accelerator.no_sync(self.model) if not last else contextlib.nullcontext():
                loss = self.build.loss(batch, parts, settings, self.generator)
                self.accelerator.backward(loss / len(micro_batches))
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def _after_compile_error(self, error: Exception, optimizer: torch.optim.Optimizer,
                             micro_batches: list[dict], parts: Components, settings: LossSettings):
        """torch.compile failed on the backbone (``training.compiling``): remembered; one process
        redoes the step eagerly and returns its loss, several stop with the advice to start again."""
        optimizer.zero_grad(set_to_none=True)
        summary = " ".join(str(error).split())[:300]
        self._switch_backbone(self.compiler.failed(f"torch.compile failed: {type(error).__name__}: "
                                                   f"{summary}"), parts)
        if self.accelerator.num_processes > 1:
            raise TrainingStopped("torch.compile failed on this model here (see above); remembered, "
                                  "so the same command started again trains eagerly (or set "
                                  "train.compile = false)") from error
        return self._backward(micro_batches, parts, settings)

    def _skip_step(self, optimizer: torch.optim.Optimizer, bad_steps: int) -> int:
        """Drop a step whose loss is not finite; stop after ``max_bad_steps`` in a row."""
        optimizer.zero_grad(set_to_none=True)
        self.monitor.say(f"step {self.progress.step}: non-finite loss, step skipped "
                         f"({bad_steps} in a row)")
        if bad_steps >= self.config.train.max_bad_steps:
            raise TrainingStopped(f"{bad_steps} non-finite losses in a row at step "
                                  f"{self.progress.step}: lower the learning rate or use bf16/fp32; "
                                  "the last checkpoint is intact")
        return bad_steps

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, stage: StageConfig, loss) -> None:
        grad_norm = full_tensor(self.accelerator.clip_grad_norm_(self.model.parameters(), stage.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.unwrapped)
        self.progress.step += 1
        self.progress.stage_step += 1
        self.progress.losses.append((self.progress.step, loss.item()))
        self.monitor.step(self.progress, loss.item(), optimizer.param_groups, grad_norm,
                          stage.batch_size * stage.grad_accum * self.accelerator.num_processes)

    def _compile_as_measured(self, parts: Components, started: float, total: int) -> None:
        """Feed ``train.compile = "auto"``'s decision (``training.compiling``) a finished step."""
        if self.config.train.compile != "auto" or self.fsdp:
            return
        if self.compiler is None:
            stage = self.config.stages[self.progress.stage]
            depends_on = (self.unwrapped.config.to_dict(), stage.resolution, stage.batch_size,
                          stage.grad_accum, stage.text_length, stage.tread_rate,
                          self.accelerator.num_processes, self.precision.describe())
            self.compiler = AutoCompile(depends_on, self.device, self._mean, self.monitor.say)

        def seconds_left(step_seconds: float) -> float:
            if self.time_budget:
                return self.time_budget - (self.clock() - started)
            steps = total - self.progress.stage_step
            if self.max_steps is not None:
                steps = min(steps, self.max_steps - self.progress.step)
            return steps * step_seconds

        if self.compiler.phase != "done":
            self._switch_backbone(self.compiler.step_done(self.clock(), seconds_left), parts)

    def _switch_backbone(self, to: str | None, parts: Components) -> None:
        """Train on from here with the ``"compiled"`` or the ``"eager"`` backbone (the same module,
        compiled once); None: as before."""
        if to is None:
            return
        eager = getattr(self.model, "_orig_mod", self.model)
        if to == "compiled" and self._compiled is None:
            self._compiled = compile_backbone(eager)
        self.model = parts.model = self._compiled if to == "compiled" else eager

    def _stop_reason(self) -> str | None:
        """Why to stop now, the same on every process: a stop signal any of them has seen, or
        --max-steps reached."""
        received = self.signals.received
        if self._mean(float(received is not None)) > 0:
            return f"signal {received or 'on another process'}"
        if self.max_steps is not None and self.progress.step >= self.max_steps:
            return "--max-steps"
        return None

    def _fit_to_time_budget(self, started: float, first_step: int) -> int:
        """The stage length at which this run's training ends on its time budget, from the mean
        time of the steps so far (every process gets the same answer)."""
        elapsed = self._mean(self.clock() - started)
        done = self.progress.stage_step - first_step
        total = max(self.progress.stage_step + 1, first_step + round(done * self.time_budget / elapsed))
        self.monitor.set_total(total)
        return total

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, optimizer: torch.optim.Optimizer, stage: int) -> Path | None:
        """Write a checkpoint (every process takes part; the main one writes)."""
        from accelerate.utils import gather_object

        for cache in self.caches.values():
            cache.flush()
        self.accelerator.wait_for_everyone()
        scaler = self.accelerator.scaler
        data = merge_positions(gather_object([self.stream.state_dict()]))
        optimizer_state = sharding.optimizer_state(self.unwrapped, optimizer.optimizer, self.fsdp)
        within = self.progress.stage == stage  # at a stage's end the next builds its own of both
        state = RunState(
            self.progress, self.precision,
            # each process draws its own noise, times and routing: keep every one's states
            rng=gather_object([{"global": rng_state(), "generator": self.generator.get_state()}]),
            optimizer=optimizer_state if within else None,
            scaler=scaler.state_dict() if scaler else None, data=data if within else None)
        checkpoint = state.to_checkpoint(
            trained_state(self.unwrapped, self.fsdp, self.config), self.unwrapped.config.to_dict(),
            to_toml(self.run_config), self.ema.state_dict() if self.ema else None)
        path = None
        if self.accelerator.is_main_process:
            path = checkpoint.save(self.run_dir / "checkpoints", self.config.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()  # no process reads checkpoints before they are whole
        if path:
            self.monitor.checkpoint_line(path, self.progress, stage)
        return path

    def _restore(self, checkpoint: Checkpoint, path: Path, fitted: str) -> RunState:
        """Load a checkpoint's weights, progress and random states (``fitted``: how the run was
        fitted to another number of processes); the state it returns holds what the stage's
        optimiser and data stream restore once they exist."""
        load_trained_state(self.unwrapped, checkpoint, path, self.fsdp, self.config)
        if self.ema and checkpoint.ema:
            self.ema.load_state_dict(checkpoint.ema)
        state = RunState.of(checkpoint)
        self.progress = state.progress
        self.monitor.say(f"resumed from {path} at step {self.progress.step} "
                         f"(stage {self.progress.stage + 1}, step {self.progress.stage_step} of the stage)")
        for line in (fitted, state.restore_random(self.rank, self.accelerator.num_processes,
                                                  self.config.train.seed, self.generator)):
            if line:
                self.monitor.say(line)
        return state

    # -- samples and export ------------------------------------------------------------------

    def pipeline(self, weights: dict[str, torch.Tensor] | None = None, text_encoder=None):
        """A pipeline over a copy of the model holding ``weights``, by default the final ones
        (the EMA's averages), with ``text_encoder``, by default the current stage's view."""
        from homediff.pipeline import HomeDiffPipeline

        weights = final_weights(self.unwrapped, self.fsdp, self.ema) if weights is None else weights
        stage = self.config.stages[min(self.progress.stage, len(self.config.stages) - 1)]
        return HomeDiffPipeline(model_copy(self.unwrapped, weights, self.config, self.device),
                                text_encoder or self.stage_text_encoder, self.autoencoder,
                                sample_size=stage.resolution, adapters=adapters(self.config))

    def _watch(self, parts: Components, settings: LossSettings, stage_end: bool) -> None:
        """The sample sheet every ``sample_every`` steps (``Monitor.samples``) and the held-out loss
        every ``val_every``, both at a stage's end, of the EMA weights (the trained ones without an
        EMA). The main process draws and scores; every process takes part in gathering the weights
        under FSDP."""
        step, train = self.progress.step, self.config.train
        sample = train.sample_prompts and (stage_end or (train.sample_every and step % train.sample_every == 0))
        validate = (train.val_every and self.config.dataset.val_path
                    and (stage_end or step % train.val_every == 0))
        if not (sample or validate):
            return
        weights = final_weights(self.unwrapped, self.fsdp, self.ema)
        if not self.accelerator.is_main_process:
            return
        if sample:
            self.monitor.samples(self.pipeline(weights), train, step)
        if validate:
            copied = model_copy(self.unwrapped, weights, self.config, self.device)
            loss = validation_loss(copied, self.held_out, parts, settings, self.device)
            self.progress.val_losses.append((step, loss))
            self.monitor.validation(step, loss)

    def _export(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        weights = final_weights(self.unwrapped, self.fsdp, self.ema)
        if not self.accelerator.is_main_process:
            return None
        out = export_run(self.pipeline(weights, self.text_encoder), self.run_dir, self.config)
        self.monitor.finish(self.progress)
        self.monitor.say(f"done: pipeline folder {out}, single file {self.run_dir / 'model.safetensors'}")
        return out


def stage_length(stage: StageConfig, batches_per_epoch: int) -> int:
    """Optimiser steps of a stage given in epochs of ``batches_per_epoch`` micro-batches."""
    return max(1, math.ceil(stage.epochs * batches_per_epoch / stage.grad_accum))


def train(config: TrainConfig, run_dir: str | Path, **options) -> Path | None:
    """Train a config into ``run_dir``; see ``Trainer`` for the options."""
    start = time.perf_counter()
    out = Trainer(config, run_dir, **options).run()
    logger.info("training took %.0f s", time.perf_counter() - start)
    end_processes()
    return out


def end_processes() -> None:
    """Leave the process group (torchrun, accelerate launch) once this process's training is over.
    A process that exits still holding it may abort in the communication library's threads at
    interpreter shutdown, which the launcher reports as a failed run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
