"""The parts of a training run, and the functions that build each one from the config.

``Builders`` holds one function per part (accelerator, text encoder, autoencoder, backbone, EMA,
optimiser, batch stream, monitor) and the loss; the Trainer makes its parts by calling the ones it
is given, by default the functions below. Tests hand in recording monitors, models or losses; the planning
rehearsal hands in stand-in encoders and a random batch stream. A fine-tune uses the default
builders: ``[init] from`` makes them load saved weights (``training.init``) and ``[lora]`` adds
adapters to the backbone. ``Components`` is what the loss reads at each step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from homediff.encoders.autoencoders import load_autoencoder
from homediff.encoders.text import TextEncoder
from homediff.models import XUT, XUTConfig, lora
from homediff.training.alignment import Aligner
from homediff.training.batches import BatchStream
from homediff.training.config import StageConfig, TrainConfig
from homediff.training.infrastructure import build_accelerator
from homediff.training.init import init_autoencoder, init_text_encoder, load_backbone
from homediff.training.monitor import Monitor
from homediff.training.objective import training_loss
from homediff.training.optim import EMA, MuonAdamW, mark_muon_groups, parameter_groups


@dataclass
class Components:
    """What the loss reads: the backbone as trained (wrapped for data parallelism or compiled),
    the frozen encoders, and the disk caches of their outputs (``"text"``, ``"latents"``)."""

    model: nn.Module
    text_encoder: TextEncoder
    autoencoder: nn.Module
    caches: dict = field(default_factory=dict)
    aligner: Aligner | None = None  # the representation alignment's frozen network (align_weight)


def build_text_encoder(config: TrainConfig, device: torch.device) -> TextEncoder:
    """The config's text encoder, or the ``init.from`` one (see ``training.init``)."""
    encoder = init_text_encoder(config)
    if encoder is None:
        options = dataclasses.asdict(config.text_encoder.options)
        encoder = TextEncoder.from_pretrained(config.text_encoder.name, **options)
    return encoder.to(device)


def build_autoencoder(config: TrainConfig, device: torch.device) -> nn.Module:
    """The config's autoencoder, or the ``init.from`` one."""
    autoencoder = init_autoencoder(config)
    if autoencoder is None:
        section = config.autoencoder
        options = {"factor": section.factor} if section.name == "pixel" else {}
        autoencoder = load_autoencoder(section.name, **options)
    return autoencoder.to(device)


def build_model(config: TrainConfig, text_encoder: TextEncoder, autoencoder: nn.Module,
                device: torch.device) -> XUT:
    """The backbone of the configured preset, sized to the encoders: freshly initialised, or
    holding the ``init.from`` weights; with ``[lora]``, adapters are added and only they train."""
    model_config = XUTConfig.preset(config.model.preset, **{
        "in_channels": autoencoder.channels, "ctx_dim": text_encoder.dim,
        "gradient_checkpointing": config.train.gradient_checkpointing, **config.model.overrides})
    model = XUT(model_config)
    if config.init.from_:
        load_backbone(model, config)
    if config.lora.rank:
        lora.add_adapter(model, lora_settings(config))
    return model.to(device)


def lora_settings(config: TrainConfig) -> lora.LoraSettings:
    section = config.lora
    return lora.LoraSettings(rank=section.rank, alpha=section.alpha or float(section.rank),
                             dropout=section.dropout, targets=tuple(section.targets))


def build_ema(config: TrainConfig, model: nn.Module) -> EMA | None:
    """The EMA of ``model``'s trained weights, beside them (build it after the model has moved)."""
    return EMA(model, config.ema.decay) if config.ema.enabled else None


def build_optimizer(config: TrainConfig, stage: StageConfig, model: nn.Module,
                    muon_dtype: torch.dtype | None, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or Muon for the hidden matrices with AdamW for the rest (Newton-Schulz in
    ``muon_dtype``), over ``model``'s trainable parameters with the stage's decay and betas."""
    opt = config.optimizer
    groups = parameter_groups(model, stage.weight_decay, opt.lr_rule, opt.decay_norms_and_biases)
    betas = tuple(stage.betas)
    if opt.name == "muon":
        return MuonAdamW(mark_muon_groups(model, groups), betas=betas, eps=opt.eps, ns_dtype=muon_dtype)
    return adamw(groups, device, betas=betas, eps=opt.eps)


#: Devices whose AdamW step torch runs as one fused kernel over all tensors.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(params, device: torch.device, **options) -> torch.optim.AdamW:
    """torch's AdamW, fused where the device has the kernel: one pass over each tensor's memory
    instead of several element-wise operations per tensor (benchmarks/RESULTS.md, "The step against
    the original with each side's own AdamW"). The same update either way, up to rounding."""
    return torch.optim.AdamW(params, fused=device.type in FUSED_ADAMW_DEVICES, **options)


def build_stream(config: TrainConfig, index: int, device: torch.device) -> BatchStream:
    """Stage ``index``'s batches (page-locked for a GPU, so that copies do not block)."""
    stage = config.stages[index]
    return BatchStream(config.dataset, stage.resolution, stage.batch_size, config.train.seed + index,
                       pin_memory=device.type == "cuda")


def build_monitor(config: TrainConfig, run_dir: Path, enabled: bool) -> Monitor:
    return Monitor(run_dir, enabled=enabled, wandb=config.train.wandb, config=config)


@dataclass(frozen=True)
class Builders:
    accelerator: Callable[[TrainConfig], object] = build_accelerator
    text_encoder: Callable[[TrainConfig, torch.device], TextEncoder] = build_text_encoder
    autoencoder: Callable[[TrainConfig, torch.device], nn.Module] = build_autoencoder
    model: Callable[[TrainConfig, TextEncoder, nn.Module, torch.device], nn.Module] = build_model
    ema: Callable[[TrainConfig, nn.Module], EMA | None] = build_ema
    optimizer: Callable[..., torch.optim.Optimizer] = build_optimizer
    stream: Callable[[TrainConfig, int, torch.device], BatchStream] = build_stream
    monitor: Callable[[TrainConfig, Path, bool], Monitor] = build_monitor
    loss: Callable[..., torch.Tensor] = training_loss
