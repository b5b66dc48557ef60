"""The training loop: stages, optimiser, EMA, checkpoints and logs. The only module using accelerate.

    trainer = Trainer(load_config("configs/tiny-emoji.toml"), "runs/emoji")
    trainer.run()                   # or Trainer(..., resume="latest").run()

A run folder holds ``checkpoints/`` (every ``checkpoint_every`` steps and at each stage's end),
``logs/`` (TensorBoard), ``samples/`` (sheets of the fixed prompts by the fixed seeds from the EMA
weights, every ``sample_every`` steps and at each stage's end) and, at the end, ``model/`` (a
pipeline folder of the EMA weights), ``model.safetensors`` (the EMA backbone in one file) and
``loss.png``. The same code runs on a CPU, one GPU, or many GPUs and
nodes under ``accelerate launch`` or ``torchrun``.

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
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from homediff import precision
from homediff.atomic import replace_folder, write_atomically
from homediff.caching import TensorShards
from homediff.errors import CheckpointError, ConfigError, HomediffError
from homediff.models import XUT, lora
from homediff.models.flops import train_step_flops
from homediff.models.layers import Block
from homediff.training import elastic, sharding
from homediff.training.checkpoint import (
    Checkpoint,
    list_checkpoints,
    rng_state,
    save_tensors,
    set_rng_state,
)
from homediff.training.components import Builders, Components, lora_settings
from homediff.training.config import StageConfig, TrainConfig, parse_toml, to_toml
from homediff.training.objective import LossSettings
from homediff.training.optim import full_tensor, lr_multiplier, set_lr
from homediff.training.precisions import accelerator_precision, choose_precisions
from homediff.training.validation import held_out_batches, validation_loss

logger = logging.getLogger(__name__)

REFIT_EVERY = 10
RUN_OUTPUTS = ("checkpoints", "logs", "samples", "model", "model.safetensors", "lora.safetensors",
               "loss.png")
FINISHED = ("model", "model.safetensors", "lora.safetensors")  # what a run that ended leaves


class TrainingStopped(HomediffError):
    """Training stopped before its end (bad steps in a row)."""


class _StopWhileWaiting(Exception):
    """A stop signal that came while the loop waited for the next step's data."""


@dataclass
class Progress:
    """Where a run is; saved with every checkpoint."""

    step: int = 0  # optimiser steps over the whole run
    stage: int = 0
    stage_step: int = 0  # optimiser steps in the current stage
    epoch: int = 0  # epoch within the current stage
    samples: int = 0  # samples of the current epoch taken so far, by all processes together
    processes: int = 1  # processes the run began with, for which its config's grad_accum is given
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)


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
        self.accelerator = _accelerator(config)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        torch.manual_seed(config.train.seed)
        self.generator = torch.Generator(self.device).manual_seed(config.train.seed * 1009 + self.rank)
        resume_path, saved = None, None
        if resume:
            resume_path, saved = Checkpoint.open(self.run_dir / "checkpoints", resume)
        else:
            self._claim_run_folder(overwrite)

        self.text_encoder = builders.text_encoder(config, self.device)
        self.autoencoder = builders.autoencoder(config, self.device)
        model = builders.model(config, self.text_encoder, self.autoencoder, self.device)
        fitted = ""
        if saved:
            self._refuse_incompatible(saved, resume_path, model)
            fitted = self._fit_to_processes(saved, resume_path)
        self.precision = choose_precisions(config, self.device,
                                           (model, self.text_encoder, self.autoencoder),
                                           saved.precision if saved else None, agree=self._mean)
        self.fsdp = sharding.requested()
        if self.fsdp:
            if config.optimizer.name == "muon" or config.lora.rank:
                raise ConfigError("FSDP trains whole backbones with optimizer.name = \"adamw\": Muon "
                                  "orthogonalises whole matrices, and LoRA trains too few weights "
                                  "to shard")
            model = sharding.shard(model, self.device, Block)
        self.ema = builders.ema(config, model)  # under FSDP over the shards: each averages its own
        self.model = model if self.fsdp else self.accelerator.prepare_model(model)
        if config.train.compile:
            self.model = torch.compile(self.model)
        self.caches = {name: TensorShards(self.run_dir / "cache" / f"{name}-rank{self.rank}")
                       for name, on in (("text", config.train.cache_text),
                                        ("latents", config.train.cache_latents)) if on}
        self._warn_about_workers()
        self.progress = Progress(processes=self.accelerator.num_processes)
        self.monitor = builders.monitor(config, self.run_dir, self.accelerator.is_main_process)
        self.monitor.say("precision: autocast {autocast}, Muon {muon}, text encoder {text}".format(
            **{**self.precision, "autocast": self.precision["autocast"] or "off",
               "muon": self.precision["muon"] or "-"}))
        self._resume_state = self._restore(saved, resume_path, fitted) if saved else None
        self._stop_signal: int | None = None
        self._between_steps = False  # waiting for the first micro-batch of a step

    def _claim_run_folder(self, overwrite: bool) -> None:
        """A new run may not mix with another's checkpoints or model: refuse, or with
        ``overwrite`` clear the earlier run's outputs (the disk caches stay: their keys say what
        they hold). What an attempt that saved no checkpoint left (logs, samples) is no run to
        continue: it is cleared, with a warning."""
        earlier = list_checkpoints(self.run_dir / "checkpoints")
        outputs = [self.run_dir / name for name in RUN_OUTPUTS]
        finished = any((self.run_dir / name).exists() for name in FINISHED)
        if (earlier or finished) and not overwrite:
            held = f"checkpoints up to {earlier[-1].name}" if earlier else "a finished model"
            raise HomediffError(f"{self.run_dir} holds another run ({held}): continue it with "
                                "--resume latest, or start again with --overwrite (deletes it)")
        if self.accelerator.is_main_process:
            left = [path for path in outputs if path.exists()]
            if left and not (earlier or finished):
                logger.warning("%s: an earlier attempt saved no checkpoint; clearing what it left (%s)",
                               self.run_dir, ", ".join(path.name for path in left))
            for path in left:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.accelerator.wait_for_everyone()  # every process, whatever it saw before the deletion

    def _refuse_incompatible(self, saved: Checkpoint, path: Path, model) -> None:
        """A resume must continue the same run: the same backbone, and the same micro-batches and
        accumulation in the current stage as its config gives them for the number of processes the
        run began with (``_fit_to_processes`` fits them to another)."""
        built = {k: v for k, v in model.config.to_dict().items() if k != "gradient_checkpointing"}
        differ = [f"{k} {saved.model_config.get(k)!r} → {v!r}" for k, v in built.items()
                  if saved.model_config.get(k) != v]
        problems = [f"the model differs ({', '.join(differ)})"] if differ else []
        index = saved.progress["stage"]
        before = parse_toml(saved.config).get("stages", [])
        if index < min(len(before), len(self.config.stages)):
            for key in ("batch_size", "grad_accum"):
                old, new = before[index].get(key, 1), getattr(self.config.stages[index], key)
                if old != new:
                    problems.append(f"stages[{index}].{key} was {old}, now {new}")
        if problems:
            raise CheckpointError(f"{path}: cannot resume: {'; '.join(problems)}. Resume with the "
                                  "config the run was trained with (its config.toml), or start a "
                                  "new run")

    def _fit_to_processes(self, saved: Checkpoint, path: Path) -> str:
        """In another number of processes than the run began with, scale every remaining stage's
        grad_accum to keep its global batch, or refuse (see ``elastic``); returns what changed."""
        after = self.accelerator.num_processes
        try:
            elastic.refuse_shard_positions(saved.data, saved.processes, after)
            self.config, fitted = elastic.keep_global_batches(
                self.config, saved.progress["stage"], _begun_in(saved), after)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err
        return fitted

    @property
    def unwrapped(self) -> XUT:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _mean(self, value: float) -> float:
        """``value`` averaged over every process."""
        return self.accelerator.reduce(torch.tensor(value, device=self.device), "mean").item()

    def _warn_about_workers(self) -> None:
        cores = len(os.sched_getaffinity(0))
        if self.device.type == "cpu" and self.config.dataset.workers >= cores:
            logger.warning("dataset.workers = %d on a CPU with %d cores: loader processes compete "
                           "with the training threads and can slow steps down many times; use 0 "
                           "(small images) or fewer", self.config.dataset.workers, cores)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, callback=None) -> Path | None:
        """Train through every stage; returns the exported pipeline folder (rank 0). ``callback``
        (progress, batch), if given, sees every micro-batch."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self._stop_reason():  # resumed at or past --max-steps
                self.monitor.say(f"step {self.progress.step}: at --max-steps {self.max_steps} already")
                return None
            while self.progress.stage < len(self.config.stages):
                if not self._train_stage(callback):
                    return None
            return self._export()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.monitor.close()

    def _on_signal(self, signum, frame) -> None:
        """The first SIGINT/SIGTERM stops after the current step, with a checkpoint (at once when
        a single process is waiting for data between steps); the second stops at once."""
        if self._stop_signal is not None:
            raise KeyboardInterrupt(f"a second stop signal: stopped at once, the last checkpoint "
                                    f"in {self.run_dir / 'checkpoints'} is intact")
        self._stop_signal = signum
        self.monitor.say("stopping after this step with a checkpoint (a second Ctrl-C stops at once)")
        if self._between_steps and self.accelerator.num_processes == 1:
            raise _StopWhileWaiting

    def _train_stage(self, callback) -> bool:
        """Run the current stage to its end; False when stopped early (signal or --max-steps)."""
        index = self.progress.stage
        stage = self.config.stages[index]
        optimizer, total = self._start_stage(index, stage)
        parts = Components(self.model, self.text_encoder, self.autoencoder, self.caches)
        settings = LossSettings.of(self.config, stage, precision.DTYPES.get(self.precision["autocast"]))
        warmup, low = self.config.optimizer.warmup_steps, self.config.optimizer.min_lr_ratio
        started, first_step, bad_steps = self.clock(), self.progress.stage_step, 0
        try:
            for micro_batches in self._step_batches(stage.grad_accum, callback):
                loss = self._backward(micro_batches, parts, settings)
                set_lr(optimizer, stage.lr, lr_multiplier(self.progress.stage_step, total, warmup, low))
                if not torch.isfinite(self.accelerator.reduce(loss, "mean")):
                    bad_steps = self._skip_step(optimizer, bad_steps + 1)
                    continue
                bad_steps = 0
                self._optimizer_step(optimizer, stage, loss)
                if self.time_budget and self.progress.stage_step % REFIT_EVERY == 0:
                    total = self._fit_to_time_budget(started, first_step)
                done = self.progress.stage_step >= total
                self._watch(parts, settings, stage_end=done)
                stop = self._stop_reason()
                if done:
                    self._next_stage_position()
                if done or stop or self.progress.step % self.checkpoint_every == 0:
                    self.save_checkpoint(optimizer, index)
                if stop:
                    break
                if done:
                    return True
        except _StopWhileWaiting:
            self.save_checkpoint(optimizer, index)
            stop = f"signal {self._stop_signal}"
        self.monitor.say(f"stopped at step {self.progress.step} ({stop}); resume with --resume latest")
        return False

    def _start_stage(self, index: int, stage: StageConfig) -> tuple[torch.optim.Optimizer, int]:
        """The stage's data stream, optimiser (restored on a resume) and length in steps."""
        text = self.config.text_encoder.options
        self.text_encoder.config = dataclasses.replace(text, max_length=stage.text_length)
        self.stream = self.build.stream(self.config, index, self.device)
        self.held_out = None
        section, every = self.config.dataset, self.config.train.val_every
        if every and section.val_path and self.accelerator.is_main_process:
            self.held_out = held_out_batches(section, stage.resolution, stage.batch_size, self.stream)
            self.monitor.say(f"held-out loss of the {'EMA' if self.ema else 'trained'} weights every "
                             f"{every} steps on {sum(len(b['key']) for b in self.held_out)} images "
                             f"of {section.val_path}")
        total = stage.steps or stage_length(stage, len(self.stream))
        self._announce_caches(stage)
        muon = self.precision["muon"]
        optimizer = self.accelerator.prepare_optimizer(self.build.optimizer(
            self.config, stage, self.unwrapped, precision.DTYPES[muon] if muon else None, self.device))
        if self._resume_state:
            if self._resume_state["optimizer"] is not None:
                sharding.load_optimizer_state(self.unwrapped, optimizer.optimizer,
                                              self._resume_state["optimizer"], self.fsdp)
            if self.accelerator.scaler and self._resume_state["scaler"]:
                self.accelerator.scaler.load_state_dict(self._resume_state["scaler"])
            self.stream.load_state_dict(self._resume_state["data"])
            self._resume_state = None
        side = stage.resolution // self.autoencoder.factor
        flops = train_step_flops(self.unwrapped.config, side, side, stage.text_length, stage.tread_rate)
        self.monitor.start_stage(index, stage, total, self.progress.stage_step, flops)
        self.model.train()
        return optimizer, total

    def _step_batches(self, accumulate: int, callback):
        """The micro-batches of each optimiser step, epoch after epoch, counted in the progress
        in samples of all processes together (a resume in another number of them deals on from
        there)."""
        group, taken = [], self.stream.batch_size * self.accelerator.num_processes
        while True:
            epoch, start, seen = self.progress.epoch, self.progress.samples, 0
            batches = self.stream.epoch(epoch, start)
            while (batch := self._next_batch(batches, between_steps=not group)) is not None:
                if callback:
                    callback(self.progress, batch)
                self.monitor.count_problems(batch)
                self._count_samples(taken)
                seen += 1
                group.append(batch)
                if len(group) == accumulate:
                    yield group
                    group = []
            if not seen and not start:
                raise ConfigError(f"{self.config.dataset.path}: an epoch gave no batch (fewer "
                                  "usable images than the batch size?)")
            if self.progress.epoch == epoch:  # the epoch's rest, too few for a batch, is left out
                self.progress.epoch, self.progress.samples = epoch + 1, 0

    def _count_samples(self, taken: int) -> None:
        """Move the position on by ``taken`` samples; in a folder smaller than a batch of every
        process, a batch runs on into the next epochs, and so does the position."""
        self.progress.samples += taken
        if self.stream.kind == "folder":
            size = len(self.stream.dataset)
            self.progress.epoch, self.progress.samples = divmod(
                self.progress.epoch * size + self.progress.samples, size)

    def _next_batch(self, batches, between_steps: bool) -> dict | None:
        """The next batch of the epoch (None at its end), marking a wait between steps, when a
        stop signal can end the run at once."""
        self._between_steps = between_steps
        try:
            return next(batches, None)
        finally:
            self._between_steps = False

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

    def _stop_reason(self) -> str | None:
        """Why to stop now, the same on every process: a stop signal any of them has seen, or
        --max-steps reached."""
        if self._mean(float(self._stop_signal is not None)) > 0:
            return f"signal {self._stop_signal or 'on another process'}"
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

    def _next_stage_position(self) -> None:
        self.progress.stage += 1
        self.progress.stage_step = self.progress.epoch = self.progress.samples = 0

    def _announce_caches(self, stage: StageConfig) -> None:
        """Say how much disk the caches will take for one crop and caption per image."""
        if not self.caches:
            return
        images = len(self.stream.dataset) if self.stream.kind == "folder" else None
        sizes = {}
        if "latents" in self.caches:
            probe = torch.zeros(1, 3, stage.resolution, stage.resolution, device=self.device)
            sizes["latents"] = self.autoencoder.moments(probe).numel() * 2
        if "text" in self.caches:
            sizes["text"] = stage.text_length * self.text_encoder.dim * 2
        for name, size in sizes.items():
            total = f"{images * size / 2**30:.2f} GiB for the {images:,} images" if images else "per image"
            self.monitor.say(f"caching {name} in {self.caches[name].folder}: {size / 2**10:.1f} KiB per "
                             f"entry, {total} (each new random crop or caption variant adds one)")

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, optimizer: torch.optim.Optimizer, stage: int) -> Path | None:
        """Write a checkpoint (every process takes part; the main one writes)."""
        from accelerate.utils import gather_object

        for cache in self.caches.values():
            cache.flush()
        self.accelerator.wait_for_everyone()
        scaler = self.accelerator.scaler
        data = _merge_positions(gather_object([self.stream.state_dict()]))
        optimizer_state = sharding.optimizer_state(self.unwrapped, optimizer.optimizer, self.fsdp)
        within = self.progress.stage == stage  # at a stage's end the next builds its own of both
        checkpoint = Checkpoint(
            progress=dataclasses.asdict(self.progress), precision=self.precision,
            model=self._trained_state(),
            model_config=self.unwrapped.config.to_dict(), config=to_toml(self.run_config),
            optimizer={"optimizer": optimizer_state if within else None,
                       "scaler": scaler.state_dict() if scaler else None},
            ema=self.ema.state_dict() if self.ema else None,
            data=data if within else None,
            # each process draws its own noise, times and routing: keep every one's states
            rng=gather_object([{"global": rng_state(), "generator": self.generator.get_state()}]))
        path = None
        if self.accelerator.is_main_process:
            path = checkpoint.save(self.run_dir / "checkpoints", self.config.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()  # no process reads checkpoints before they are whole
        if path:
            self.monitor.checkpoint_line(path, self.progress, stage)
        return path

    def _trained_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: all of it, or a LoRA run's adapters."""
        state = sharding.model_state(self.unwrapped, self.fsdp)
        if not self.config.lora.rank:
            return state
        trained = {name for name, p in self.unwrapped.named_parameters() if p.requires_grad}
        return {name: value for name, value in state.items() if name in trained}

    def _restore(self, checkpoint: Checkpoint, path: Path, fitted: str) -> dict:
        """Load a checkpoint's weights, progress and random states (``fitted``: how the run was
        fitted to another number of processes); returns what the stage's optimiser and data stream
        restore when they exist."""
        if self.config.lora.rank:  # the adapters; the base weights came from init.from
            expected = set(self._trained_state())
            if set(checkpoint.model) != expected:
                raise CheckpointError(f"{path}: its adapter weights do not fit the config's [lora]")
            self.unwrapped.load_state_dict(checkpoint.model, strict=False)
        else:
            sharding.load_model_state(self.unwrapped, checkpoint.model, self.fsdp)
        if self.ema and checkpoint.ema:
            self.ema.load_state_dict(checkpoint.ema)
        self.progress = _progress(checkpoint, self.config)
        self.monitor.say(f"resumed from {path} at step {self.progress.step} "
                         f"(stage {self.progress.stage + 1}, step {self.progress.stage_step} of the stage)")
        if fitted:
            self.monitor.say(fitted)
        if checkpoint.processes == self.accelerator.num_processes:
            own = checkpoint.rng[self.rank]
            set_rng_state(own["global"])
            self.generator.set_state(own["generator"])
        else:
            elastic.seed_process(self.config.train.seed, self.progress.step, self.rank, self.generator)
            self.monitor.say(f"the checkpoint holds the random states of {checkpoint.processes} "
                             f"processes, not {self.accelerator.num_processes}: noise, flow times and "
                             "routing now come from states made from the seed, the step and the "
                             "process, and differ from an unbroken run's")
        return {**checkpoint.optimizer, "data": checkpoint.data}

    # -- samples and export ------------------------------------------------------------------

    def _final_weights(self) -> dict[str, torch.Tensor]:
        """The model's weights with the EMA's averages in place of the trained ones, whole: under
        FSDP every process must call this."""
        weights = sharding.model_state(self.unwrapped, self.fsdp)
        return {**weights, **self.ema.state_dict()["shadow"]} if self.ema else weights

    def _adapters(self) -> dict:
        return {"default": lora_settings(self.config)} if self.config.lora.rank else {}

    def _model_copy(self, weights: dict[str, torch.Tensor]) -> XUT:
        """A copy of the backbone in eval mode holding ``weights``, made without drawing from the
        global random generator (training's draws stay those of a run that never copies)."""
        with torch.random.fork_rng(devices=[]):
            model = XUT(self.unwrapped.config)
            for name, settings in self._adapters().items():
                lora.add_adapter(model, settings, name)
        model.to(self.device).load_state_dict(weights)
        return model.eval()

    def pipeline(self, weights: dict[str, torch.Tensor] | None = None):
        """A pipeline over a copy of the model holding ``weights``, by default ``_final_weights``."""
        from homediff.pipeline import HomeDiffPipeline

        model = self._model_copy(self._final_weights() if weights is None else weights)
        stage = self.config.stages[min(self.progress.stage, len(self.config.stages) - 1)]
        return HomeDiffPipeline(model, self.text_encoder, self.autoencoder,
                                sample_size=stage.resolution, adapters=self._adapters())

    def _watch(self, parts: Components, settings: LossSettings, stage_end: bool) -> None:
        """The sample sheet every ``sample_every`` steps, the validation loss every ``val_every``,
        and both at a stage's end."""
        step, train = self.progress.step, self.config.train
        if stage_end or (train.sample_every and step % train.sample_every == 0):
            self.sample()
        if train.val_every and self.config.dataset.val_path and (stage_end or step % train.val_every == 0):
            self.validate(parts, settings)

    def sample(self) -> None:
        """Write the sample sheet of the current weights (see ``Monitor.samples``)."""
        if not self.config.train.sample_prompts:
            return
        weights = self._final_weights()  # every process takes part in gathering them under FSDP
        if self.accelerator.is_main_process:
            self.monitor.samples(self.pipeline(weights), self.config.train, self.progress.step)

    def validate(self, parts: Components, settings: LossSettings) -> float | None:
        """The held-out loss of the EMA weights (the trained ones without an EMA), kept in the
        progress and logged. The main process computes it; every process gathers the weights."""
        weights = self._final_weights()
        if not self.accelerator.is_main_process:
            return None
        loss = validation_loss(self._model_copy(weights), self.held_out, parts, settings, self.device)
        self.progress.val_losses.append((self.progress.step, loss))
        self.monitor.validation(self.progress.step, loss)
        return loss

    def _export(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        weights = self._final_weights()
        if not self.accelerator.is_main_process:
            return None
        pipe = self.pipeline(weights)
        pipe.text_encoder.config = self.config.text_encoder.options
        out, staged = self.run_dir / "model", self.run_dir / "model.partial"
        shutil.rmtree(staged, ignore_errors=True)
        pipe.save_pretrained(staged)
        replace_folder(staged, out)
        backbone = pipe.transformer
        if self.config.lora.rank:  # the adapter alone, and the backbone with it fused
            write_atomically(self.run_dir / "lora.safetensors", lambda path: lora.save_adapter(
                path, pipe.transformer, lora_settings(self.config)))
            backbone = copy.deepcopy(pipe.transformer)
            lora.fuse(backbone)
            lora.remove_adapters(backbone)
        write_atomically(self.run_dir / "model.safetensors", lambda path: save_tensors(
            path, backbone.state_dict(), {"homediff_config": json.dumps(backbone.config.to_dict())}))
        self.monitor.finish(self.progress)
        self.monitor.say(f"done: pipeline folder {out}, single file {self.run_dir / 'model.safetensors'}")
        return out


def stage_length(stage: StageConfig, batches_per_epoch: int) -> int:
    """Optimiser steps of a stage given in epochs of ``batches_per_epoch`` micro-batches."""
    return max(1, math.ceil(stage.epochs * batches_per_epoch / stage.grad_accum))


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    handlers = []
    if config.train.fp16_grad_compression:
        handlers.append(DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.FP16))
    # several processes without GPUs (torchrun on CPUs) train over gloo
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=accelerator_precision(config), kwargs_handlers=handlers,
                       cpu=multi_cpu)


def _begun_in(checkpoint: Checkpoint) -> int:
    """The number of processes a checkpoint's run began with (earlier versions never changed it)."""
    return checkpoint.progress.get("processes", checkpoint.processes)


def _progress(checkpoint: Checkpoint, config: TrainConfig) -> Progress:
    """A checkpoint's progress. Earlier versions counted the epoch's position in micro-batches per
    process (``batch``): those become samples."""
    fields = {**checkpoint.progress, "processes": _begun_in(checkpoint)}
    if "batch" in fields:
        stage = config.stages[min(fields["stage"], len(config.stages) - 1)]
        fields["samples"] = fields.pop("batch") * stage.batch_size * checkpoint.processes
    return Progress(**fields)


def _merge_positions(states: list[dict | None]) -> dict | None:
    """One shard-stream state from every rank's (each rank's workers have their own ids)."""
    states = [s for s in states if s]
    if not states:
        return None
    return {"world": states[0]["world"],
            "positions": {k: v for s in states for k, v in s["positions"].items()}}


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
