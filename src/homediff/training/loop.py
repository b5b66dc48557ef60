"""The training loop: stages, optimiser, EMA, checkpoints and logs. The only module using accelerate.

    trainer = Trainer(load_config("configs/tiny-emoji.toml"), "runs/emoji")
    trainer.run()                   # or Trainer(..., resume="latest").run()

A run folder holds ``checkpoints/`` (every ``checkpoint_every`` steps and at each stage's end),
``logs/`` (TensorBoard), ``samples/`` (grids of fixed prompts and seeds from the EMA weights) and,
at the end, ``model/`` (a pipeline folder of the EMA weights), ``model.safetensors`` (the EMA
backbone in one file) and ``loss.png``. The same code runs on a CPU, one GPU, or many GPUs and
nodes under ``accelerate launch`` or ``torchrun``.

FSDP (``ACCELERATE_USE_FSDP=true`` under torch.distributed) shards the backbone: see ``sharding``;
AdamW only, since Muon needs whole matrices.

``time_budget`` (seconds, single-stage configs; ``homediff demo``): every ``REFIT_EVERY`` steps the
stage's length is re-fitted so that training ends on the budget at the mean step time so far, and
the cosine learning-rate schedule follows the new length.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from homediff import precision
from homediff.diffusion import flow
from homediff.encoders.autoencoders import load_autoencoder
from homediff.encoders.text import TextEncoder
from homediff.errors import ConfigError, HomediffError
from homediff.models import XUT, XUTConfig
from homediff.models.flops import train_step_flops
from homediff.models.layers import Block
from homediff.training import sharding
from homediff.training.batches import BatchStream
from homediff.training.cache import DiskCache, cache_key, cached_rows
from homediff.training.checkpoint import (latest_checkpoint, load_tensors, rng_state, save_tensors,
                                          set_rng_state, write_checkpoint)
from homediff.training.config import StageConfig, TrainConfig, to_toml
from homediff.training.monitor import Monitor
from homediff.training.optim import (EMA, MuonAdamW, full_tensor, is_hidden_matrix, lr_multiplier,
                                     mark_muon_groups, orthogonalize, parameter_groups, set_lr)

logger = logging.getLogger(__name__)

REFIT_EVERY = 10


class TrainingStopped(HomediffError):
    """Training stopped before its end (bad steps in a row)."""


@dataclass
class Progress:
    """Where a run is; saved with every checkpoint."""

    step: int = 0  # optimiser steps over the whole run
    stage: int = 0
    stage_step: int = 0  # optimiser steps in the current stage
    epoch: int = 0  # epoch within the current stage
    batch: int = 0  # micro-batches of the current epoch already consumed
    losses: list[tuple[int, float]] = field(default_factory=list)


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | Path, *, resume: str | None = None,
                 max_steps: int | None = None, checkpoint_every: int | None = None,
                 time_budget: float | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

        self.config = config
        self.run_dir = Path(run_dir)
        self.max_steps = max_steps
        if time_budget is not None and (time_budget <= 0 or len(config.stages) != 1):
            raise ConfigError("a time budget needs a positive number of seconds and a config with "
                              f"one stage (got {time_budget} s, {len(config.stages)} stages)")
        self.time_budget = time_budget
        self.checkpoint_every = checkpoint_every or config.train.checkpoint_every
        handlers = []
        if config.train.fp16_grad_compression:
            handlers.append(DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.FP16))
        # several processes without GPUs (torchrun on CPUs) train over gloo
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(mixed_precision=self._accelerator_precision(),
                                       kwargs_handlers=handlers, cpu=multi_cpu)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        torch.manual_seed(config.train.seed)
        self.generator = torch.Generator(self.device).manual_seed(config.train.seed * 1009 + self.rank)
        resume_path = self._checkpoint_path(resume) if resume else None
        saved = torch.load(resume_path / "state.pt", weights_only=False) if resume_path else {}

        self.text_encoder = TextEncoder.from_pretrained(
            config.text_encoder.name, **dataclasses.asdict(config.text_encoder.options)).to(self.device)
        self.autoencoder = load_autoencoder(config.autoencoder.name, **self._ae_options()).to(self.device)
        model_config = XUTConfig.preset(config.model.preset, **{
            "in_channels": self.autoencoder.channels, "ctx_dim": self.text_encoder.dim,
            "gradient_checkpointing": config.train.gradient_checkpointing,
            **config.model.overrides})
        model, self.ema = self._build_model(model_config)
        self.precision = self._choose_precisions(model, saved.get("precision"))
        self.fsdp = sharding.requested()
        if self.fsdp:
            if config.optimizer.name == "muon":
                raise ConfigError("Muon orthogonalises whole matrices and FSDP splits them between "
                                  "processes: use optimizer.name = \"adamw\" with FSDP")
            model = sharding.shard(model, self.device, Block)
            if self.ema:  # over the shards: each process averages its own
                self.ema = EMA(model, config.ema.decay)
        self.model = model if self.fsdp else self.accelerator.prepare_model(model)
        if config.train.compile:
            self.model = torch.compile(self.model)
        self.caches = self._caches()
        cores = len(os.sched_getaffinity(0))
        if self.device.type == "cpu" and config.dataset.workers >= cores:
            logger.warning("dataset.workers = %d on a CPU with %d cores: loader processes compete with "
                           "the training threads and can slow steps down many times; use 0 (small "
                           "images) or fewer", config.dataset.workers, cores)
        self.progress = Progress()
        self.monitor = Monitor(self.run_dir, enabled=self.accelerator.is_main_process,
                               wandb=config.train.wandb, config=config)
        self.monitor.say("precision: autocast {autocast}, Muon {muon}, text encoder {text}".format(
            **{**self.precision, "autocast": self.precision["autocast"] or "off",
               "muon": self.precision["muon"] or "-"}))
        self._resume_state = self._load(resume_path, saved) if resume_path else None
        self._stop_signal: int | None = None

    # -- set-up ------------------------------------------------------------------------------

    def _build_model(self, model_config: XUTConfig) -> tuple[XUT, EMA | None]:
        """The backbone on the training device, then its EMA beside it (an EMA built before the
        move would stay on the CPU while the model trains on a GPU)."""
        model = XUT(model_config).to(self.device)
        ema = EMA(model, self.config.ema.decay) if self.config.ema.enabled else None
        return model, ema

    def _accelerator_precision(self) -> str:
        """accelerate's mixed precision: as configured; ``"auto"`` is bf16 (else fp16 with loss
        scaling) on GPUs and is decided by measurement on a CPU (see ``_choose_precisions``)."""
        wanted = self.config.train.mixed_precision
        if wanted != "auto":
            return wanted
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"

    def _choose_precisions(self, model: XUT, saved: dict | None) -> dict[str, str | None]:
        """The dtypes of CPU autocast (None: off), Muon's Newton-Schulz iteration and the text
        encoder. ``"auto"`` settings are measured once per run: a resumed run on the same machine
        reuses its checkpoint's choices, so that it continues with the same numerics."""
        machine = precision.machine_key(self.device)
        reuse = saved if saved and saved.get("machine") == machine else {}
        agree = lambda value: self.accelerator.reduce(  # noqa: E731  every process chooses alike
            torch.tensor(value, device=self.device), "mean").item()
        mixed = self.config.train.mixed_precision
        autocast = {"no": None, "bf16": "bfloat16", "fp16": "float16"}.get(
            self._accelerator_precision())
        if mixed == "auto" and self.device.type == "cpu":
            if "autocast" in reuse:  # None (float32) is a choice too
                autocast = reuse["autocast"]
            else:
                probe = self._probe_model(model)
                check = precision.check_autocast(probe, self._probe_loss(probe), self.device)
                faster = agree(check.speedup) >= precision.MIN_AUTOCAST_SPEEDUP
                close = agree(float(check.close)) == 1.0
                autocast = "bfloat16" if faster and close else None
                logger.info("CPU mixed precision: %s (bf16 autocast measured %.2f× float32's step "
                            "speed; loss differs by %.2g, gradient cosine %.4f)",
                            autocast or "float32", check.speedup, check.loss_error, check.grad_cosine)
        muon = None
        if self.config.optimizer.name == "muon":
            setting = self.config.optimizer.muon_dtype
            muon = reuse.get("muon") if setting == "auto" else None
            muon = muon or precision.choose_dtype(setting, self.device, self._newton_schulz_probe(model),
                                                  "Muon's Newton-Schulz iteration", agree=agree).name
        text = str(self.text_encoder.model.dtype).removeprefix("torch.")
        if self.config.text_encoder.options.dtype == "auto" and "text" in reuse:
            text = reuse["text"]
            self.text_encoder.to(dtype=precision.DTYPES[text])
        return {"machine": machine, "autocast": autocast, "muon": muon, "text": text}

    def _probe_model(self, model: XUT) -> XUT:
        """A copy of ``model`` whose zero-initialised layers are made random: a fresh model's
        zero output layer would hide every difference between two precisions."""
        probe = copy.deepcopy(model)
        draw = torch.Generator(self.device).manual_seed(0)
        with torch.no_grad():
            for p in probe.parameters():
                if not p.any():
                    p.normal_(std=0.02, generator=draw)
        return probe

    def _probe_loss(self, model: XUT):
        """A training loss of ``model`` on random inputs of the first stage's shapes, the same at
        every call (for timing and comparing precisions)."""
        stage = self.config.stages[0]
        side = stage.resolution // self.autoencoder.factor
        batch = stage.batch_size
        length = stage.text_length
        draw = torch.Generator(self.device).manual_seed(0)
        x = torch.randn(batch, self.autoencoder.channels, side, side, generator=draw, device=self.device)
        ctx = torch.randn(batch, length, self.text_encoder.dim, generator=draw, device=self.device)
        t = torch.rand(batch, generator=draw, device=self.device)
        target = torch.randn(x.shape, generator=draw, device=self.device)

        def loss() -> torch.Tensor:
            routing = torch.Generator(self.device).manual_seed(1)
            out = model(x, t, ctx, tread_rate=stage.tread_rate, generator=routing)
            return F.mse_loss(out.float(), target)
        return loss

    def _newton_schulz_probe(self, model: XUT):
        """``run(dtype)``: Muon's orthogonalisation of the model's largest hidden matrix."""
        shape = max((p.shape for n, p in model.named_parameters() if is_hidden_matrix(n, p)),
                    key=lambda s: s.numel(), default=(64, 64))
        matrix = torch.randn(shape, device=self.device)
        return lambda dtype: orthogonalize(matrix, dtype=dtype)

    def _ae_options(self) -> dict:
        return {"factor": self.config.autoencoder.factor} if self.config.autoencoder.name == "pixel" else {}

    def _caches(self) -> dict[str, DiskCache]:
        """The optional disk caches of text states and autoencoder moments (one folder per rank)."""
        train = self.config.train
        wanted = {"text": train.cache_text, "latents": train.cache_latents}
        return {name: DiskCache(self.run_dir / "cache" / f"{name}-rank{self.rank}")
                for name, on in wanted.items() if on}

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
            sizes["text"] = self.text_encoder.config.max_length * self.text_encoder.dim * 2
        for name, size in sizes.items():
            total = f"{images * size / 2**30:.2f} GiB for the {images:,} images" if images else "per image"
            self.monitor.say(f"caching {name} in {self.caches[name].folder}: {size / 2**10:.1f} KiB per "
                             f"entry, {total} (each new random crop or caption variant adds one)")

    @property
    def unwrapped(self) -> XUT:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _optimizer(self, stage: StageConfig) -> torch.optim.Optimizer:
        opt = self.config.optimizer
        decay = stage.weight_decay
        groups = parameter_groups(self.unwrapped, decay, opt.lr_rule, opt.decay_norms_and_biases)
        betas = tuple(stage.betas)
        if opt.name == "muon":
            optimizer = MuonAdamW(mark_muon_groups(self.unwrapped, groups), betas=betas, eps=opt.eps,
                                  ns_dtype=precision.DTYPES[self.precision["muon"]])
        else:  # one fused kernel for all tensors on a GPU
            optimizer = torch.optim.AdamW(groups, betas=betas, eps=opt.eps,
                                          fused=self.device.type == "cuda")
        return self.accelerator.prepare_optimizer(optimizer)

    @staticmethod
    def stage_length(stage: StageConfig, batches_per_epoch: int) -> int:
        """Optimiser steps of a stage given in epochs of ``batches_per_epoch`` micro-batches."""
        return max(1, math.ceil(stage.epochs * batches_per_epoch / stage.grad_accum))

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, optimizer: torch.optim.Optimizer, stage: int) -> Path | None:
        from accelerate.utils import gather_object

        for cache in self.caches.values():
            cache.flush()
        self.accelerator.wait_for_everyone()
        data = gather_object([self.stream.state_dict()])  # every rank's shard positions
        # every rank's random states: each rank draws its own noise, times and routing
        ranks = gather_object([{"rng": rng_state(), "generator": self.generator.get_state()}])
        weights = sharding.model_state(self.unwrapped, self.fsdp)
        optimizer_state = sharding.optimizer_state(self.unwrapped, optimizer.optimizer, self.fsdp)
        ema = self.ema.state_dict()["shadow"] if self.ema else None
        path = self._write_checkpoint(optimizer_state, weights, ema, data, ranks) \
            if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()  # no process reads checkpoints before they are whole
        if path:
            self.monitor.checkpoint_line(path, self.progress, stage)
        return path

    def _write_checkpoint(self, optimizer_state: dict, weights: dict, ema: dict | None,
                          data: list, ranks: list) -> Path:
        scaler = self.accelerator.scaler
        state = {"progress": dataclasses.asdict(self.progress), "rng": rng_state(),
                 "generator": self.generator.get_state(), "ranks": ranks,
                 "ema": {"decay": self.ema.decay, "updates": self.ema.updates} if self.ema else None,
                 "precision": self.precision}
        writers = {
            "model.safetensors": lambda p: save_tensors(p, weights),
            "optimizer.pt": lambda p: torch.save({"optimizer": optimizer_state,
                                                  "scaler": scaler.state_dict() if scaler else None,
                                                  "data": _merge_positions(data)}, p),
            "state.pt": lambda p: torch.save(state, p),
            "config.toml": lambda p: p.write_text(to_toml(self.config)),
            "model_config.json": lambda p: p.write_text(json.dumps(self.unwrapped.config.to_dict())),
        }
        if self.ema:
            writers["ema.safetensors"] = lambda p: save_tensors(p, ema)
        return write_checkpoint(self.run_dir / "checkpoints", self.progress.step, writers,
                                self.config.train.keep_checkpoints)

    def _checkpoint_path(self, resume: str) -> Path:
        path = latest_checkpoint(self.run_dir / "checkpoints") if resume == "latest" else Path(resume)
        if path is None:
            raise HomediffError(f"--resume latest: no checkpoint in {self.run_dir / 'checkpoints'}")
        if not (path / "state.pt").is_file():
            raise HomediffError(f"{path}: not a checkpoint folder (no state.pt)")
        return path

    def _load(self, path: Path, state: dict) -> dict:
        weights = load_tensors(path / "model.safetensors")
        sharding.load_model_state(self.unwrapped, weights, self.fsdp)
        if self.ema and state["ema"]:
            self.ema.load_state_dict({**state["ema"], "shadow": load_tensors(path / "ema.safetensors")})
        self.progress = Progress(**state["progress"])
        ranks = state.get("ranks", [])  # absent from older checkpoints
        own = ranks[self.rank] if len(ranks) == self.accelerator.num_processes else state
        set_rng_state(own["rng"])
        self.generator.set_state(own["generator"])
        self.monitor.say(f"resumed from {path} at step {self.progress.step} "
                         f"(stage {self.progress.stage + 1}, step {self.progress.stage_step} of the stage)")
        return torch.load(path / "optimizer.pt", weights_only=False)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, callback=None) -> Path | None:
        """Train through every stage; returns the exported pipeline folder (rank 0). ``callback``
        (progress, batch), if given, sees every micro-batch."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.progress.stage < len(self.config.stages):
                if not self._train_stage(callback):
                    return None
            return self._export()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.monitor.close()

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _train_stage(self, callback) -> bool:
        """Run the current stage to its end; False when stopped early (signal or --max-steps)."""
        index = self.progress.stage
        stage = self.config.stages[index]
        data = self.config.dataset
        text = self.config.text_encoder.options
        self.text_encoder.config = dataclasses.replace(text, max_length=stage.text_length)
        self.stream = BatchStream(data, stage.resolution, stage.batch_size, self.config.train.seed + index,
                                  pin_memory=self.device.type == "cuda")
        total = stage.steps or self.stage_length(stage, len(self.stream))
        self._announce_caches(stage)
        optimizer = self._optimizer(stage)
        if self._resume_state:
            sharding.load_optimizer_state(self.unwrapped, optimizer.optimizer,
                                          self._resume_state["optimizer"], self.fsdp)
            if self.accelerator.scaler and self._resume_state["scaler"]:
                self.accelerator.scaler.load_state_dict(self._resume_state["scaler"])
            self.stream.load_state_dict(self._resume_state["data"])
            self._resume_state = None
        clip = stage.grad_clip
        flops = train_step_flops(self.unwrapped.config, *self._latent_size(stage.resolution),
                                 self.text_encoder.config.max_length, stage.tread_rate)
        self.monitor.start_stage(index, stage, total, self.progress.stage_step, flops)
        self.model.train()
        bad_steps, micro, losses = 0, 0, []
        started, first_step = time.perf_counter(), self.progress.stage_step
        while self.progress.stage_step < total:
            for batch in self.stream.epoch(self.progress.epoch, self.progress.batch):
                if callback:
                    callback(self.progress, batch)
                self.monitor.count_problems(batch)
                self.progress.batch += 1
                micro += 1
                last = micro == stage.grad_accum
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                    loss = self._loss(batch, stage)
                    self.accelerator.backward(loss / stage.grad_accum)
                losses.append(loss.detach())
                if not last:
                    continue
                micro = 0
                set_lr(optimizer, stage.lr, lr_multiplier(self.progress.stage_step, total,
                                                          self.config.optimizer.warmup_steps,
                                                          self.config.optimizer.min_lr_ratio))
                step_loss = torch.stack(losses).mean()
                losses = []
                if not torch.isfinite(self.accelerator.reduce(step_loss, "mean")):
                    optimizer.zero_grad(set_to_none=True)
                    bad_steps += 1
                    self.monitor.say(f"step {self.progress.step}: non-finite loss, step skipped "
                                     f"({bad_steps} in a row)")
                    if bad_steps >= self.config.train.max_bad_steps:
                        raise TrainingStopped(f"{bad_steps} non-finite losses in a row at step "
                                              f"{self.progress.step}: lower the learning rate or use "
                                              "bf16/fp32; the last checkpoint is intact")
                    continue
                bad_steps = 0
                grad_norm = full_tensor(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if self.ema:
                    self.ema.update(self.unwrapped)
                self.progress.step += 1
                self.progress.stage_step += 1
                self.progress.losses.append((self.progress.step, step_loss.item()))
                self.monitor.step(self.progress, step_loss.item(), optimizer.param_groups, grad_norm,
                                  stage.batch_size * stage.grad_accum * self.accelerator.num_processes)
                if self._should_sample():
                    self.sample()
                if self.time_budget and self.progress.stage_step % REFIT_EVERY == 0:
                    total = self._fit_to_time_budget(started, first_step)
                    self.monitor.set_total(total)
                done = self.progress.stage_step >= total
                stop = self._stop_signal is not None or self.progress.step == self.max_steps
                if done or stop or self.progress.step % self.checkpoint_every == 0:
                    if done:
                        self._next_stage_position()
                    self.save_checkpoint(optimizer, index)
                if stop:
                    why = f"signal {self._stop_signal}" if self._stop_signal else "--max-steps"
                    self.monitor.say(f"stopped at step {self.progress.step} ({why}); resume with "
                                     "--resume latest")
                    return False
                if done:
                    if self.config.train.sample_every == 0:
                        self.sample()
                    return True
            self.progress.epoch += 1
            self.progress.batch = 0
        return True

    def _fit_to_time_budget(self, started: float, first_step: int) -> int:
        """The stage length at which this run's training ends on its time budget, from the mean
        time of the steps so far (every process gets the same answer)."""
        elapsed = self.accelerator.reduce(torch.tensor(time.perf_counter() - started,
                                                       device=self.device), "mean").item()
        done = self.progress.stage_step - first_step
        return max(self.progress.stage_step + 1, first_step + round(done * self.time_budget / elapsed))

    def _next_stage_position(self) -> None:
        self.progress.stage += 1
        self.progress.stage_step = self.progress.epoch = self.progress.batch = 0

    def _should_sample(self) -> bool:
        every = self.config.train.sample_every
        return every > 0 and self.progress.step % every == 0

    def _latent_size(self, resolution: int) -> tuple[int, int]:
        side = resolution // self.autoencoder.factor
        return side, side

    def _loss(self, batch: dict, stage: StageConfig) -> torch.Tensor:
        images = batch["image"].to(self.device, non_blocking=True)
        pos = batch["pos"].to(self.device, non_blocking=True)
        with torch.no_grad():
            x0 = self.autoencoder.latents_from(self._moments(images, pos, batch["key"]), self.generator)
            ctx = self._text_states(batch["caption"])
        factor = images.shape[-1] // x0.shape[-1]
        if factor > 1:  # the crop's pixel position map, averaged over each latent cell
            side = images.shape[-1]
            grid = pos.transpose(1, 2).reshape(-1, 2, side, side)
            pos = F.avg_pool2d(grid, factor).flatten(2).transpose(1, 2)
        base = self.config.train.time_shift_base
        t = flow.sample_time(x0.shape[0], mean=self.config.train.time_mean,
                             std=self.config.train.time_std, generator=self.generator, device=self.device,
                             shift=flow.resolution_shift(*images.shape[-2:], base) if base else 1.0)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        dtype = self.precision["autocast"]
        with torch.autocast(self.device.type, dtype=precision.DTYPES[dtype or "float32"],
                            enabled=dtype is not None):
            prediction = self.model(flow.add_noise(x0, noise, t), t, ctx.to(self.device, torch.float32),
                                    pos_map=pos, aspect=batch["aspect"].to(self.device),
                                    tread_rate=stage.tread_rate, generator=self.generator)
        return flow.flow_loss(prediction, x0, noise, self.config.train.contrastive_weight)

    def _moments(self, images: torch.Tensor, pos: torch.Tensor, keys: list[str]) -> torch.Tensor:
        cache = self.caches.get("latents")
        if cache is None:
            return self.autoencoder.moments(images)
        keys = [cache_key(k, images.shape[-1], p[0].tolist(), p[-1].tolist()) for k, p in zip(keys, pos)]
        rows = cached_rows(cache, keys, lambda idx: self.autoencoder.moments(images[idx]))
        return rows.to(self.device, torch.float32)

    def _text_states(self, captions: list[str]) -> torch.Tensor:
        cache = self.caches.get("text")
        if cache is None:
            return self.text_encoder.encode(captions)
        length = self.text_encoder.config.max_length
        keys = [cache_key(c, length, self.config.text_encoder.name) for c in captions]
        rows = cached_rows(cache, keys, lambda idx: self.text_encoder.encode([captions[i] for i in idx]))
        return rows.to(self.device, self.text_encoder.model.dtype)

    # -- samples and export ------------------------------------------------------------------

    def _final_weights(self) -> dict[str, torch.Tensor]:
        """The EMA weights (or the raw ones), whole: under FSDP every process must call this."""
        return self.ema.state_dict()["shadow"] if self.ema else sharding.model_state(self.unwrapped,
                                                                                      self.fsdp)

    def pipeline(self, weights: dict[str, torch.Tensor] | None = None):
        """A pipeline over a copy of the model holding ``weights``, by default ``_final_weights``."""
        from homediff.pipeline import HomeDiffPipeline

        model = XUT(self.unwrapped.config).to(self.device)
        model.load_state_dict(self._final_weights() if weights is None else weights)
        stage = self.config.stages[min(self.progress.stage, len(self.config.stages) - 1)]
        return HomeDiffPipeline(model.eval(), self.text_encoder, self.autoencoder,
                                sample_size=stage.resolution)

    def sample(self) -> None:
        if not self.config.train.sample_prompts:
            return
        weights = self._final_weights()  # every process takes part in gathering them under FSDP
        if self.accelerator.is_main_process:
            self.monitor.samples(self.pipeline(weights), self.config.train, self.progress.step)

    def _export(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        weights = self._final_weights()
        if not self.accelerator.is_main_process:
            return None
        pipe = self.pipeline(weights)
        pipe.text_encoder.config = self.config.text_encoder.options
        out = self.run_dir / "model"
        pipe.save_pretrained(out)
        save_tensors(self.run_dir / "model.safetensors", pipe.transformer.state_dict(),
                     {"homediff_config": json.dumps(pipe.transformer.config.to_dict())})
        self.monitor.finish(self.progress)
        self.monitor.say(f"done: pipeline folder {out}, single file {self.run_dir / 'model.safetensors'}")
        return out


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
    return out
