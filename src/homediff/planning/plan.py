"""The plan of a training run: per stage its samples, optimiser steps, FLOPs, time, cost and memory;
the size of its checkpoints and caches on disk; the totals.

``plan_run`` is a function of the config and of what the person assumes (the GPU, how many, the
MFU, the price, the data set's size). What it reads besides, ``encoder_shapes`` and
``dataset_images``, are separate: the encoders' configs (shipped with homediff for HDM's, else in a
local folder or the hub's local cache; nothing is downloaded) and the number of images of a folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from homediff import hub
from homediff.errors import ConfigError
from homediff.models.flops import text_encoder_flops, train_step_flops, vae_encoder_flops
from homediff.planning.gpus import GPU
from homediff.training.config import InitSection, StageConfig, TrainConfig

#: Encoders whose configs ship with homediff (HDM's), by hub id in lower case.
SHIPPED_CONFIGS = {"qwen/qwen3-0.6b": "qwen3-0.6b.json", "kblueleaf/eq-sdxl-vae": "eq-sdxl-vae.json"}
CACHE_BYTES_PER_VALUE = 2  # the disk caches store float16
STATE_BYTES_PER_VALUE = 4  # weights, EMA and optimiser moments are float32
SHARDINGS = ("ddp", "fsdp")


@dataclass(frozen=True)
class EncoderShapes:
    """What the plan needs of the encoders: the text model's config.json values, the VAE's (None:
    pixel space), pixels per latent side and latent channels."""

    text: dict
    vae: dict | None
    factor: int
    channels: int

    @property
    def moment_channels(self) -> int:
        """Channels of what a latent cache stores: the posterior's mean and log-variance."""
        return 2 * self.channels if self.vae else self.channels


@dataclass
class MemoryRow:
    """Peak memory per GPU under one sharding ("ddp", "fsdp"), with or without checkpointing."""

    sharding: str
    checkpointing: bool
    parts: dict[str, int]
    total: int
    fits: bool


@dataclass
class StagePlan:
    """One stage. ``flops``: training FLOPs per sample by part (backbone, text_encoder,
    vae_encoder; an encoder whose outputs are cached counts 0). ``cache_bytes``: what the stage
    writes to the disk caches that are on: one entry per image, or per sample when the number of
    images is unknown."""

    name: str
    resolution: int
    text_length: int
    tread_rate: float
    micro_batch: int  # per process
    global_batch: int
    steps: int
    samples: int
    flops: dict[str, int]
    hours: float
    gpu_hours: float
    cost: float | None
    cache_bytes: dict[str, int] = field(default_factory=dict)
    memory: list[MemoryRow] = field(default_factory=list)

    @property
    def flops_per_sample(self) -> int:
        return sum(self.flops.values())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "flops_per_sample": self.flops_per_sample}


@dataclass
class Plan:
    gpu: GPU
    gpus: int
    mfu: float
    price_per_hour: float | None
    parameters: int  # trained parameters
    images: int | None  # the data set's size as assumed (None: unknown)
    stages: list[StagePlan]
    checkpoint_bytes: dict[str, int]  # one checkpoint's tensors by file: model, ema, optimizer
    checkpoints_kept: int

    @property
    def hours(self) -> float:
        return sum(s.hours for s in self.stages)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def cost(self) -> float | None:
        return None if self.price_per_hour is None else self.gpu_hours * self.price_per_hour

    @property
    def checkpoint_disk(self) -> int:
        """Disk of the kept checkpoints and the one being written."""
        return (self.checkpoints_kept + 1) * sum(self.checkpoint_bytes.values())

    def cache_bytes(self) -> dict[str, int]:
        """Each cache's size at the end: text entries are shared by stages of one text length."""
        text: dict[int, int] = {}
        for s in self.stages:
            if "text" in s.cache_bytes:
                text[s.text_length] = max(text.get(s.text_length, 0), s.cache_bytes["text"])
        sizes = {"text": sum(text.values())} if text else {}
        if any("latents" in s.cache_bytes for s in self.stages):
            sizes["latents"] = sum(s.cache_bytes["latents"] for s in self.stages)
        return sizes

    def to_dict(self) -> dict:
        return {"gpu": self.gpu.to_dict(), "gpus": self.gpus, "mfu": self.mfu,
                "price_per_hour": self.price_per_hour, "parameters": self.parameters,
                "images": self.images, "stages": [s.to_dict() for s in self.stages],
                "checkpoint_bytes": self.checkpoint_bytes, "checkpoints_kept": self.checkpoints_kept,
                "total": {"samples": sum(s.samples for s in self.stages),
                          "steps": sum(s.steps for s in self.stages),
                          "flops": sum(s.samples * s.flops_per_sample for s in self.stages),
                          "hours": self.hours, "gpu_hours": self.gpu_hours, "cost": self.cost,
                          "checkpoint_disk_bytes": self.checkpoint_disk,
                          "cache_bytes": self.cache_bytes()}}


# -- what the plan reads ------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what}: cannot read its config {path} ({err})") from err


def encoder_config(name: str, what: str) -> dict:
    """The ``config.json`` values of an encoder a config names: shipped with homediff, in a local
    folder, in the hub's local cache, or (text) the installed offline default."""
    shipped = SHIPPED_CONFIGS.get(name.lower())
    if shipped:
        return json.loads(resources.files("homediff.encoders").joinpath("configs", shipped)
                          .read_text(encoding="utf-8"))
    folder = Path(name).expanduser()
    if not folder.is_dir() and hub.is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        owner, repo, *inside = name.split("/")
        found = try_to_load_from_cache(f"{owner}/{repo}", "/".join([*inside, "config.json"]))
        if isinstance(found, str):
            return _read_json(Path(found), f"{what} {name}")
    elif not folder.is_dir() and what == "text encoder":
        from homediff.encoders.text import resolve_text_encoder  # the offline default's folder

        folder = Path(resolve_text_encoder(name))
    if (folder / "config.json").is_file():
        return _read_json(folder / "config.json", f"{what} {name}")
    raise ConfigError(f"{what} {name!r}: its config.json is not in a local folder or the hub's local "
                      "cache, and homediff ships no copy; give a local folder (the plan reads only "
                      "config.json)")


def encoder_shapes(config: TrainConfig) -> EncoderShapes:
    """The shapes of the config's text encoder and autoencoder, from their configs."""
    text = encoder_config(config.text_encoder.name, "text encoder")
    if config.autoencoder.name == "pixel":
        factor = config.autoencoder.factor
        return EncoderShapes(text, None, factor, 3 * factor * factor)
    vae = encoder_config(config.autoencoder.name, "autoencoder")
    return EncoderShapes(text, vae, 2 ** (len(vae["block_out_channels"]) - 1),
                         vae.get("latent_channels", 4))


def dataset_images(config: TrainConfig) -> int | None:
    """Images per epoch of the config's folder data set (repeats counted); None when the path is
    not a folder of images (absent, or tar shards)."""
    from homediff.data.folder import scan_folder
    from homediff.data.shards import dataset_kind

    section = config.dataset
    if not section.path or not Path(section.path).is_dir():
        return None
    if dataset_kind(section.path, section.kind) != "folder":
        return None
    options = section.options
    entries = scan_folder(section.path, caption_extension=options.caption_extension,
                          outside_links=options.allow_outside_links)
    return sum(entry.repeats for entry in entries) or None


# -- the plan ------------------------------------------------------------------------------------

def backbone(config: TrainConfig, shapes: EncoderShapes):
    """The backbone as the trainer builds it (with LoRA adapters if configured), on the meta
    device: shapes without memory."""
    import torch

    from homediff.training.components import build_model

    settings = dataclasses.replace(config, init=InitSection())  # shapes only: no weights to load
    with torch.device("meta"):
        return build_model(settings, SimpleNamespace(dim=shapes.text["hidden_size"]),
                           SimpleNamespace(channels=shapes.channels), torch.device("meta"))


def checkpoint_bytes(config: TrainConfig, model) -> dict[str, int]:
    """Tensor bytes of one checkpoint's files as the trainer writes them (``Checkpoint.save``):
    the model (whole, or a LoRA run's adapters), the EMA of the trained weights and the optimiser
    state (AdamW: two moments and a step per tensor; Muon: a momentum per hidden matrix)."""
    from homediff.training.optim import is_hidden_matrix

    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict() if not config.lora.rank else trained
    parts = {"model": sum(t.numel() * t.element_size() for t in state.values())}
    if config.ema.enabled:
        parts["ema"] = sum(p.numel() for p in trained.values()) * STATE_BYTES_PER_VALUE
    muon = config.optimizer.name == "muon"
    optimizer = 0
    for name, p in trained.items():
        if muon and is_hidden_matrix(name, p):
            optimizer += p.numel() * STATE_BYTES_PER_VALUE
        else:  # torch's AdamW keeps its step as a float32 tensor; MuonAdamW as a number
            optimizer += (2 * p.numel() + (0 if muon else 1)) * STATE_BYTES_PER_VALUE
    parts["optimizer"] = optimizer
    return parts


def stage_samples(stage: StageConfig, gpus: int, images: int | None) -> tuple[int, int]:
    """(optimiser steps, samples) of a stage on ``gpus`` processes, as the trainer counts them."""
    from homediff.training.loop import stage_length

    per_step = stage.batch_size * stage.grad_accum * gpus
    if stage.steps:
        return stage.steps, stage.steps * per_step
    if not images:
        raise ConfigError(f"stage {stage.name or stage.resolution} is given in epochs, so the plan "
                          "needs the data set's size: point dataset.path at the image folder, or "
                          "give --images N")
    # at least one batch per epoch: a folder smaller than a batch fills it from the next epochs
    steps = stage_length(stage, max(1, images // stage.batch_size // gpus))
    return steps, steps * per_step


def stage_flops(config: TrainConfig, model_config, shapes: EncoderShapes,
                stage: StageConfig) -> dict[str, int]:
    """Training FLOPs per sample: the backbone's step, and the forward passes of the encoders
    whose outputs are not cached (a text encoder padding to the longest prompt counts the stage's
    text length, its most)."""
    side = stage.resolution // shapes.factor
    return {"backbone": train_step_flops(model_config, side, side, stage.text_length, stage.tread_rate),
            "text_encoder": 0 if config.train.cache_text
            else text_encoder_flops(shapes.text, stage.text_length),
            "vae_encoder": 0 if config.train.cache_latents or not shapes.vae
            else vae_encoder_flops(shapes.vae, stage.resolution, stage.resolution)}


def _cache_bytes(config: TrainConfig, shapes: EncoderShapes, stage: StageConfig,
                 entries: int) -> dict[str, int]:
    sizes = {}
    if config.train.cache_text:
        sizes["text"] = entries * stage.text_length * shapes.text["hidden_size"]
    if config.train.cache_latents:
        sizes["latents"] = entries * shapes.moment_channels * (stage.resolution // shapes.factor) ** 2
    return {name: size * CACHE_BYTES_PER_VALUE for name, size in sizes.items()}


def _memory_rows(config: TrainConfig, index: int, gpu: GPU, gpus: int,
                 memory: Callable) -> list[MemoryRow]:
    rows = []
    shardings = SHARDINGS if config.optimizer.name == "adamw" else ("ddp",)  # FSDP2: AdamW only
    for sharding in shardings:
        for checkpointing in (False, True):
            estimate = memory(config, index, checkpointing=checkpointing, processes=gpus,
                              sharding=sharding, device="cpu" if gpu.kind == "cpu" else "cuda")
            rows.append(MemoryRow(sharding, checkpointing, dict(estimate.parts), estimate.total,
                                  estimate.total <= gpu.memory_gib * 2 ** 30))
    return rows


def plan_run(config: TrainConfig, gpu: GPU, gpus: int, mfu: float,
             price_per_hour: float | None = None, images: int | None = None, *,
             shapes: EncoderShapes | None = None, memory: Callable | None = None) -> Plan:
    """The plan of ``config`` on ``gpus`` × ``gpu`` at ``mfu`` of its peak. ``images``: the data
    set's size, needed by stages given in epochs. ``memory``: an estimator with the signature of
    ``homediff.planning.memory.estimate_memory``, called per stage for DDP and FSDP2 with and
    without gradient checkpointing (None: no memory rows)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    if price_per_hour is not None and price_per_hour < 0:
        raise ConfigError(f"--price-per-hour must be >= 0, got {price_per_hour}")
    shapes = shapes or encoder_shapes(config)
    model = backbone(config, shapes)
    rate = gpus * gpu.peak_tflops * 1e12 * mfu
    stages = []
    for index, stage in enumerate(config.stages):
        steps, samples = stage_samples(stage, gpus, images)
        flops = stage_flops(config, model.config, shapes, stage)
        hours = samples * sum(flops.values()) / rate / 3600
        stages.append(StagePlan(
            name=stage.name or f"stage {index + 1}", resolution=stage.resolution,
            text_length=stage.text_length, tread_rate=stage.tread_rate,
            micro_batch=stage.batch_size, global_batch=stage.batch_size * stage.grad_accum * gpus,
            steps=steps, samples=samples,
            flops=flops, hours=hours, gpu_hours=hours * gpus,
            cost=None if price_per_hour is None else hours * gpus * price_per_hour,
            cache_bytes=_cache_bytes(config, shapes, stage, min(samples, images or samples)),
            memory=_memory_rows(config, index, gpu, gpus, memory) if memory else []))
    written = sum(s.steps for s in stages) // config.train.checkpoint_every + len(stages)
    kept = min(config.train.keep_checkpoints, written) if config.train.keep_checkpoints else written
    return Plan(gpu=gpu, gpus=gpus, mfu=mfu, price_per_hour=price_per_hour,
                parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                images=images, stages=stages, checkpoint_bytes=checkpoint_bytes(config, model),
                checkpoints_kept=kept)
