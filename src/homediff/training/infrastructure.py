"""What a run trains on: the accelerator (processes, mixed precision), the backbone sharded or
wrapped for data parallelism and compiled, and the disk caches of the encoders' outputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from homediff.caching import TensorShards
from homediff.errors import ConfigError
from homediff.models.layers import Block
from homediff.training import sharding
from homediff.training.compiling import compile_backbone
from homediff.training.config import StageConfig, TrainConfig
from homediff.training.precisions import accelerator_precision

logger = logging.getLogger(__name__)


def build_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    handlers = []
    if config.train.fp16_grad_compression:
        handlers.append(DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.FP16))
    # several processes without GPUs (torchrun on CPUs) train over gloo
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=accelerator_precision(config), kwargs_handlers=handlers,
                       cpu=multi_cpu)


def shard_if_requested(model: nn.Module, config: TrainConfig, device: torch.device) -> tuple[nn.Module, bool]:
    """The backbone sharded over the processes when FSDP is requested (``sharding``); and whether."""
    if not sharding.requested():
        return model, False
    if config.optimizer.name == "muon" or config.lora.rank:
        raise ConfigError("FSDP trains whole backbones with optimizer.name = \"adamw\": Muon "
                          "orthogonalises whole matrices, and LoRA trains too few weights to shard")
    return sharding.shard(model, device, Block), True


def prepare_model(model: nn.Module, accelerator, config: TrainConfig, fsdp: bool) -> nn.Module:
    """The backbone as the loop trains it: wrapped for data parallelism (a sharded one already
    is), and compiled with ``train.compile = true`` ("auto" decides during the run:
    ``training.compiling``)."""
    model = model if fsdp else accelerator.prepare_model(model)
    return compile_backbone(model) if config.train.compile is True else model


def build_caches(config: TrainConfig, run_dir: Path, rank: int) -> dict[str, TensorShards]:
    """This process's disk caches of text states and latents, as the config asks."""
    return {name: TensorShards(run_dir / "cache" / f"{name}-rank{rank}")
            for name, on in (("text", config.train.cache_text),
                             ("latents", config.train.cache_latents)) if on}


def warn_about_workers(config: TrainConfig, device: torch.device) -> None:
    cores = len(os.sched_getaffinity(0))
    if device.type == "cpu" and config.dataset.workers >= cores:
        logger.warning("dataset.workers = %d on a CPU with %d cores: loader processes compete "
                       "with the training threads and can slow steps down many times; use 0 "
                       "(small images) or fewer", config.dataset.workers, cores)


def cache_sizes(caches: dict, stage: StageConfig, images: int | None, autoencoder, text_encoder,
                device: torch.device) -> list[str]:
    """A line per cache saying how much disk it will take for one crop and caption per image
    (``images``: the data set's size, None for shards)."""
    sizes = {}
    if "latents" in caches:
        probe = torch.zeros(1, 3, stage.resolution, stage.resolution, device=device)
        sizes["latents"] = autoencoder.moments(probe).numel() * 2
    if "text" in caches:
        sizes["text"] = stage.text_length * text_encoder.dim * 2
    lines = []
    for name, size in sizes.items():
        total = f"{images * size / 2**30:.2f} GiB for the {images:,} images" if images else "per image"
        lines.append(f"caching {name} in {caches[name].folder}: {size / 2**10:.1f} KiB per entry, "
                     f"{total} (each new random crop or caption variant adds one)")
    return lines
