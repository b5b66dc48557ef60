"""Where a run stands, as a checkpoint keeps it: ``RunState`` (progress, precisions, every
process's random states, the optimiser's state and the data stream's position), the weights a
checkpoint keeps, and the checks that a checkpoint can continue this run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from homediff.errors import CheckpointError
from homediff.training import elastic, sharding
from homediff.training.checkpoint import Checkpoint, Precisions, Progress, set_rng_state
from homediff.training.config import TrainConfig, parse_toml


@dataclass
class RunState:
    """What a checkpoint carries of a run besides its weights, EMA and config. ``optimizer`` and
    ``data`` are None at a stage's end: the next stage builds its own."""

    progress: Progress
    precision: Precisions | None
    rng: list[dict]  # each process's random states, in rank order
    optimizer: dict | None = None
    scaler: dict | None = None
    data: dict | None = None  # the shard stream's position (folders resume from the progress)

    def to_checkpoint(self, model: dict[str, torch.Tensor], model_config: dict, config: str,
                      ema: dict | None) -> Checkpoint:
        return Checkpoint(progress=self.progress, precision=self.precision,
                          model=model, model_config=model_config, config=config,
                          optimizer={"optimizer": self.optimizer, "scaler": self.scaler},
                          ema=ema, data=self.data, rng=self.rng)

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> RunState:
        return cls(checkpoint.progress, checkpoint.precision, checkpoint.rng or [],
                   checkpoint.optimizer.get("optimizer"), checkpoint.optimizer.get("scaler"),
                   checkpoint.data)

    def restore_stage(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, stream,
                      fsdp: bool) -> None:
        """Hand the resumed stage's optimiser, loss scaler and data stream their saved states."""
        if self.optimizer is not None:
            sharding.load_optimizer_state(model, optimizer, self.optimizer, fsdp)
        if scaler and self.scaler:
            scaler.load_state_dict(self.scaler)
        stream.load_state_dict(self.data)

    def restore_random(self, rank: int, processes: int, seed: int,
                       generator: torch.Generator) -> str | None:
        """Set this process's random states as the run left them; in another number of processes,
        states made from the seed, the step and the rank, with a line saying so."""
        if len(self.rng) == processes:
            set_rng_state(self.rng[rank]["global"])
            generator.set_state(self.rng[rank]["generator"])
            return None
        elastic.seed_process(seed, self.progress.step, rank, generator)
        return (f"the checkpoint holds the random states of {len(self.rng)} processes, not "
                f"{processes}: noise, flow times and routing now come from states made from the "
                "seed, the step and the process, and differ from an unbroken run's")


def merge_positions(states: list[dict | None]) -> dict | None:
    """One shard-stream state from every rank's (each rank's workers have their own ids)."""
    states = [s for s in states if s]
    if not states:
        return None
    return {"world": states[0]["world"],
            "positions": {k: v for s in states for k, v in s["positions"].items()}}


def trained_state(model: nn.Module, fsdp: bool, config: TrainConfig) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: all of it, or a LoRA run's adapters."""
    state = sharding.model_state(model, fsdp)
    if not config.lora.rank:
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: value for name, value in state.items() if name in trained}


def load_trained_state(model: nn.Module, checkpoint: Checkpoint, path: Path, fsdp: bool,
                       config: TrainConfig) -> None:
    """Load what ``trained_state`` kept: a LoRA run's adapters (the base weights came from
    ``init.from``), or the whole model."""
    if config.lora.rank:
        if set(checkpoint.model) != set(trained_state(model, fsdp, config)):
            raise CheckpointError(f"{path}: its adapter weights do not fit the config's [lora]")
        model.load_state_dict(checkpoint.model, strict=False)
    else:
        sharding.load_model_state(model, checkpoint.model, fsdp)


def check_resumable(saved: Checkpoint, path: Path, config: TrainConfig, model_config: dict) -> None:
    """A resume must continue the same run: the same backbone, and the same micro-batches and
    accumulation in the current stage as its config gives them for the number of processes the
    run began with (``fit_to_processes`` fits them to another)."""
    built = {k: v for k, v in model_config.items() if k != "gradient_checkpointing"}
    differ = [f"{k} {saved.model_config.get(k)!r} → {v!r}" for k, v in built.items()
              if saved.model_config.get(k) != v]
    problems = [f"the model differs ({', '.join(differ)})"] if differ else []
    index = saved.progress.stage
    before = parse_toml(saved.config).get("stages", [])
    if index < min(len(before), len(config.stages)):
        for key in ("batch_size", "grad_accum"):
            old, new = before[index].get(key, 1), getattr(config.stages[index], key)
            if old != new:
                problems.append(f"stages[{index}].{key} was {old}, now {new}")
    if problems:
        raise CheckpointError(f"{path}: cannot resume: {'; '.join(problems)}. Resume with the "
                              "config the run was trained with (its config.toml), or start a "
                              "new run")


def fit_to_processes(saved: Checkpoint, path: Path, config: TrainConfig,
                     processes: int) -> tuple[TrainConfig, str]:
    """In another number of processes than the run began with, every remaining stage's grad_accum
    scaled to keep its global batch, or a refusal (see ``elastic``); returns the config and what
    changed."""
    try:
        elastic.refuse_shard_positions(saved.data, saved.processes, processes)
        return elastic.keep_global_batches(config, saved.progress.stage, saved.progress.processes,
                                           processes)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
