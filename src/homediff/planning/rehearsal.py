"""``homediff train CONFIG --rehearse``: a few real optimiser steps of every stage at its real
shapes, measured against the plan, before a run costs money.

Each stage runs in its own child process (so that its peak memory is its own) through the same
``Trainer`` a run uses, with the encoders and data replaced by stand-ins (``planning.standins``:
the real architectures with random weights, random images and captions at the stage's
resolution). What changes from the config, and is reported: the micro-batch (on a CPU 1 by
default; on a GPU the stage's batch, halved until the memory estimate fits the free memory),
the stage's length (``steps`` optimiser steps), no sample sheets, no held-out loss, no ``init``
weights; the precisions the config leaves to measurement ("auto") are measured by the first stage
and kept by the later ones, as a run decides them once. The loop ends by writing one checkpoint,
which is then read back into the model.

Measured against the plan (``planning.plan`` on this device, ``planning.memory``): seconds per
sample after the first step (and the stage's hours at that rate, its samples shared by ``gpus``
processes), the stage's rehearsal in seconds of wall time, the peak memory of training (CUDA's
most allocated, or on a CPU the process's peak resident memory, both taken before the checkpoint
is written), the checkpoint's size on disk and the time to write and to read it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from homediff.errors import ConfigError, HomediffError
from homediff.training.config import InitSection, TrainConfig, config_from_dict, parse_toml, to_toml

FREE_MEMORY_SHARE = 0.9  # a GPU micro-batch is chosen to fit this share of the free memory


@dataclass
class StageRehearsal:
    """One stage's measurements (``measured``) beside the plan's (``planned``), in seconds and
    bytes; ``changes``: how the rehearsal departed from the config."""

    name: str
    resolution: int
    micro_batch: int
    grad_accum: int
    steps: int
    device: str
    precision: dict
    changes: list[str]
    measured: dict
    planned: dict
    memory_parts: dict[str, int] = field(default_factory=dict)

    @property
    def memory_error(self) -> float:
        """Measured peak memory against the estimate: 0.1 is 10 % more than planned."""
        return self.measured["peak_bytes"] / self.planned["peak_bytes"] - 1

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "memory_error": self.memory_error}


def select_stages(config: TrainConfig, names: list[str] | None) -> list[int]:
    """Indices of the stages named (by name, or by resolution as "512" / "512px"); all without names."""
    if not names:
        return list(range(len(config.stages)))
    found = []
    for name in names:
        matches = [i for i, s in enumerate(config.stages)
                   if name in (s.name, str(s.resolution), f"{s.resolution}px")]
        if not matches:
            known = ", ".join(s.name or str(s.resolution) for s in config.stages)
            raise ConfigError(f"--stage {name}: the config has no such stage (its stages: {known})")
        found += [i for i in matches if i not in found]
    return found


def rehearse(config: TrainConfig, *, steps: int = 2, stages: list[str] | None = None,
             micro_batch: int | None = None, gpus: int = 1,
             work_dir: str | Path | None = None) -> list[StageRehearsal]:
    """Rehearse the chosen stages of ``config`` (see the module's docstring), each in a child
    process with its run folder under ``work_dir`` (default a temporary folder, removed after)."""
    if steps < 1 or gpus < 1 or (micro_batch is not None and micro_batch < 1):
        raise ConfigError(f"--steps, --gpus and --micro-batch must be positive, got {steps}, {gpus} "
                          f"and {micro_batch}")
    indices = select_stages(config, stages)
    planned = _planned(config, gpus)
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="homediff-rehearsal-") as folder:
            return rehearse(config, steps=steps, stages=stages, micro_batch=micro_batch, gpus=gpus,
                            work_dir=folder)
    results = []
    for index in indices:
        run_dir = Path(work_dir) / f"stage-{index}"
        request = {"config": to_toml(config), "index": index, "steps": steps,
                   "micro_batch": micro_batch, "run_dir": str(run_dir)}
        started = time.perf_counter()
        measured = _child(request, Path(work_dir) / f"stage-{index}.json")
        measured["measured"]["wall_seconds"] = time.perf_counter() - started
        config, fixed = decided(config, measured["precision"])
        if fixed and index != indices[-1]:
            measured["changes"].append(f"the later stages keep these precisions ({', '.join(fixed)})")
        stage = config.stages[index]
        plan = planned[index]
        seconds = measured["measured"]["seconds_per_sample"]
        measured["measured"]["projected_hours"] = (None if seconds is None
                                                   else plan["samples"] / gpus * seconds / 3600)
        results.append(StageRehearsal(
            name=stage.name or f"{stage.resolution}px", resolution=stage.resolution,
            planned={**measured.pop("planned"), **plan}, **measured))
    return results


def decided(config: TrainConfig, precision: dict) -> tuple[TrainConfig, list[str]]:
    """``config`` with its "auto" precisions set to what a stage's trainer chose, and the settings
    made: a run decides them once, at its start, so the later stages of a rehearsal do not measure
    again."""
    names = {None: "no", "bfloat16": "bf16", "float16": "fp16"}
    train, text, optimizer = config.train, config.text_encoder.options, config.optimizer
    fixed = []
    if train.mixed_precision == "auto":
        train = dataclasses.replace(train, mixed_precision=names[precision["autocast"]])
        fixed.append(f"train.mixed_precision = {train.mixed_precision}")
    if text.dtype == "auto":
        text = dataclasses.replace(text, dtype=precision["text"])
        fixed.append(f"text_encoder.options.dtype = {text.dtype}")
    if optimizer.muon_dtype == "auto" and precision.get("muon"):
        optimizer = dataclasses.replace(optimizer, muon_dtype=precision["muon"])
        fixed.append(f"optimizer.muon_dtype = {optimizer.muon_dtype}")
    section = dataclasses.replace(config.text_encoder, options=text)
    return dataclasses.replace(config, train=train, text_encoder=section, optimizer=optimizer), fixed


def _planned(config: TrainConfig, gpus: int) -> list[dict]:
    """Per stage the plan on this machine's accelerator class (its peak and default MFU): samples,
    hours, FLOPs and seconds per sample of one process, and the checkpoint's tensor bytes."""
    from homediff.planning.calibration import default_mfu
    from homediff.planning.gpus import local_gpu
    from homediff.planning.plan import plan_run

    gpu = local_gpu()
    mfu, _ = default_mfu(gpu)
    plan = plan_run(config, gpu, gpus, mfu)
    checkpoint = sum(plan.checkpoint_bytes.values())
    return [{"samples": s.samples, "hours": s.hours, "gpu": gpu.name, "peak_tflops": gpu.peak_tflops,
             "mfu": mfu, "flops_per_sample": s.flops_per_sample,
             "seconds_per_sample": s.hours * 3600 * gpus / s.samples, "checkpoint_bytes": checkpoint}
            for s in plan.stages]


def _child(request: dict, result: Path) -> dict:
    """Run one stage's rehearsal in a fresh interpreter; its progress shows on this stderr."""
    result.parent.mkdir(parents=True, exist_ok=True)
    request_path = result.with_suffix(".request.json")
    request_path.write_text(json.dumps({**request, "result": str(result)}), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "homediff.planning.rehearsal", str(request_path)])
    if not result.is_file():
        raise HomediffError(f"the rehearsal of stage {request['index'] + 1} stopped (exit code "
                            f"{done.returncode}) before it reported; its output is above")
    answer = json.loads(result.read_text(encoding="utf-8"))
    if "error" in answer:
        raise HomediffError(f"the rehearsal of stage {request['index'] + 1} failed: {answer['error']}")
    return answer


# -- inside the child process ------------------------------------------------------------------

def peak_memory(device) -> int:
    """Bytes: CUDA's most allocated since the last reset, or this process's peak resident memory."""
    import torch

    from homediff.planning.memory import peak_resident_bytes

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_resident_bytes()


def default_micro_batch(config: TrainConfig, index: int, device) -> int:
    """1 on a CPU; on a GPU the stage's batch, halved until the memory estimate fits."""
    from homediff.planning.memory import estimate_memory
    from homediff.precision import available_memory

    if device.type != "cuda":
        return 1
    free, micro = available_memory(device) * FREE_MEMORY_SHARE, config.stages[index].batch_size
    while micro > 1 and estimate_memory(config, index, micro_batch=micro).total > free:
        micro //= 2
    return micro


def single_stage(config: TrainConfig, index: int, micro_batch: int) -> tuple[TrainConfig, list[str]]:
    """The config of stage ``index`` alone as the rehearsal runs it, and what it changed."""
    stage = config.stages[index]
    changes = ["no sample sheets or held-out loss; random images and captions"]
    if micro_batch != stage.batch_size:
        changes.append(f"micro-batch {stage.batch_size} → {micro_batch} (samples per step "
                       f"{stage.batch_size * stage.grad_accum} → {micro_batch * stage.grad_accum})")
    if config.init.from_:
        changes.append(f"init.from {config.init.from_} not loaded: random weights")
    train = dataclasses.replace(config.train, sample_prompts=[], val_every=0, wandb=False,
                                checkpoint_every=10 ** 9, keep_checkpoints=1)
    dataset = dataclasses.replace(config.dataset, workers=0, val_path="")
    one = dataclasses.replace(config, stages=[dataclasses.replace(stage, batch_size=micro_batch)],
                              train=train, dataset=dataset, init=InitSection())
    return one, changes


def _timed_load(trainer, path: Path) -> float:
    """Seconds to read a checkpoint back into the trainer's model and EMA."""
    from homediff.training.checkpoint import Checkpoint

    start = time.perf_counter()
    checkpoint = Checkpoint.load(path)
    trainer.unwrapped.load_state_dict(checkpoint.model)
    if trainer.ema and checkpoint.ema:
        trainer.ema.load_state_dict(checkpoint.ema)
    return time.perf_counter() - start


def rehearse_stage(config: TrainConfig, index: int, steps: int, micro_batch: int | None,
                   run_dir: Path) -> dict:
    """Train stage ``index`` for ``steps`` optimiser steps, write and read a checkpoint; the
    measurements and the memory estimate for what ran."""
    import torch

    from homediff.planning import standins
    from homediff.planning.memory import estimate_memory
    from homediff.training.components import Builders
    from homediff.training.loop import Trainer
    from homediff.training.monitor import Monitor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    micro_batch = micro_batch or default_micro_batch(config, index, device)
    one, changes = single_stage(config, index, micro_batch)
    stage = one.stages[0]
    stamps: list[float] = []

    class TimedMonitor(Monitor):
        def step(self, *args, **kwargs) -> None:
            stamps.append(time.perf_counter())
            super().step(*args, **kwargs)

    builders = Builders(text_encoder=standins.text_encoder, autoencoder=standins.autoencoder,
                        stream=standins.random_stream,
                        monitor=lambda c, folder, on: TimedMonitor(folder, enabled=on, wandb=False, config=c))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(one, run_dir, max_steps=steps, checkpoint_every=10 ** 9, builders=builders,
                      overwrite=True)  # the folder is the rehearsal's own
    saved: dict = {}
    write = trainer.save_checkpoint

    def timed_write(optimizer, stage_index):
        saved["peak"] = peak_memory(device)
        start = time.perf_counter()
        saved["path"] = write(optimizer, stage_index)
        saved["seconds"] = time.perf_counter() - start
        return saved["path"]

    trainer.save_checkpoint = timed_write
    trainer.run()
    load_seconds = _timed_load(trainer, saved["path"])
    samples = stage.batch_size * stage.grad_accum
    precision = dataclasses.asdict(trainer.precision)
    estimate = estimate_memory(one, 0, micro_batch=micro_batch, device=device.type, precisions=precision)
    return {"micro_batch": micro_batch, "grad_accum": stage.grad_accum, "steps": steps,
            "device": str(device), "precision": precision, "changes": changes,
            "measured": {
                "seconds_per_sample": ((stamps[-1] - stamps[0]) / ((len(stamps) - 1) * samples)
                                       if len(stamps) > 1 else None),
                "peak_bytes": saved["peak"], "peak_with_checkpoint_bytes": peak_memory(device),
                "checkpoint_bytes": sum(f.stat().st_size for f in Path(saved["path"]).iterdir()),
                "save_seconds": saved["seconds"], "load_seconds": load_seconds},
            "planned": {"peak_bytes": estimate.total},
            "memory_parts": estimate.parts}


def main(argv: list[str]) -> int:
    """The child process: read the request, rehearse its stage, write the result (or the error)."""
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_dict(parse_toml(request["config"]))
        answer = rehearse_stage(config, request["index"], request["steps"], request["micro_batch"],
                                Path(request["run_dir"]))
    except HomediffError as err:
        answer = {"error": " ".join(str(err).split())}
    Path(request["result"]).write_text(json.dumps(answer), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
