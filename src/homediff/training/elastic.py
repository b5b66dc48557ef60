"""Resuming a run with another number of processes than the one that wrote its checkpoint.

A step's global batch is ``batch_size × grad_accum × processes``. A resume with another number of
processes keeps every remaining stage's global batch by scaling its ``grad_accum``, and refuses
where that is not a whole number. The data position is counted in samples of the epoch taken by all
processes together (``Progress.samples``), from which any number of processes deals on
(``EpochSampler``). Random states are per process: with another number, each process's are derived
from the seed, the step and its rank, so noise, flow times and routing differ from the unbroken
run's. Tar shards resume at each loader worker's stream position, which only the same number of
processes can continue.
"""

from __future__ import annotations

import dataclasses
import math
import random
from fractions import Fraction

import numpy as np
import torch

from homediff.errors import CheckpointError
from homediff.training.config import TrainConfig


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _counts(before: int, stages: list) -> str:
    """The numbers of processes that keep the global batch of every one of ``stages``."""
    whole = math.gcd(*(stage.grad_accum * before for stage in stages))
    counts = [str(n) for n in range(1, whole + 1) if whole % n == 0]
    if len(counts) == 1:
        return "1 process"
    return f"{', '.join(counts[:-1])} or {counts[-1]} processes"


def keep_global_batches(config: TrainConfig, stage: int, before: int,
                        after: int) -> tuple[TrainConfig, str]:
    """``config`` with the ``grad_accum`` of stage ``stage`` and every later one scaled so that
    ``after`` processes take the global batches that ``before`` took, and a line saying so (empty
    when nothing changes). Raises ``CheckpointError`` (one line) where a stage's cannot be kept."""
    if before == after:
        return config, ""
    stages, changes = list(config.stages), []
    for index in range(stage, len(stages)):
        old = stages[index]
        accumulate = Fraction(old.grad_accum * before, after)
        if accumulate.denominator != 1:
            raise CheckpointError(
                f"cannot resume in {_processes(after)}: the global batch of stages[{index}], "
                f"{old.batch_size * old.grad_accum * before} (batch_size {old.batch_size} × grad_accum "
                f"{old.grad_accum} × {_processes(before)}), would need grad_accum {accumulate}; resume "
                f"in {_counts(before, stages[stage:])}, or start a new run")
        stages[index] = dataclasses.replace(old, grad_accum=int(accumulate))
        changes.append(f"stages[{index}].grad_accum {old.grad_accum} → {accumulate} keeps the global "
                       f"batch of {old.batch_size * old.grad_accum * before}")
    if not changes:  # the run is past its last stage
        return config, ""
    line = f"{_processes(before)} → {after}: {'; '.join(changes)}"
    return dataclasses.replace(config, stages=stages), line


def refuse_shard_positions(data: dict | None, before: int, after: int) -> None:
    """A checkpoint inside a stage over tar shards (``data``: its stream positions) continues only
    in as many processes as wrote it."""
    if data and before != after:
        raise CheckpointError(
            f"cannot resume in {_processes(after)}: this stage reads tar shards, whose stream positions "
            f"are per process and loader worker and continue exactly only in {_processes(before)}; "
            "resume in as many, and change the number of processes at the start of a later stage")


def seed_process(seed: int, step: int, rank: int, generator: torch.Generator) -> None:
    """Seed every global random generator of this process and ``generator`` from (``seed``,
    ``step``, ``rank``): the same states on every resume at that step, different between ranks."""
    states = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    global_seed, own_seed = (int(s) for s in states)
    random.seed(global_seed)
    np.random.seed(global_seed)
    torch.manual_seed(global_seed)
    generator.manual_seed(own_seed)
