"""The dtypes a training run computes in, chosen once when it starts.

``train.mixed_precision = "auto"`` is bf16 (else fp16 with loss scaling) on GPUs. On a CPU it is
decided in two steps: bfloat16's speedup on the model's largest products (``precision.speedup_at``:
a probe of bounded size, remembered per machine), which settles it where bfloat16 is emulated (a
CPU without bfloat16 kernels runs it many times slower); where that speedup is large enough, a
training step timed and compared with and without bfloat16 autocast. Muon's Newton-Schulz dtype and
the text encoder's dtype are chosen by the speedup on their products when set to ``"auto"``. On a
CPU, attention's path (``models.attention``) is timed in float32 and in the autocast dtype over the
first stage's attention layers, before the autocast step is, so that a bfloat16 step is timed with
the attention it would run. A resumed run on the same machine reuses its checkpoint's choices, so
that it continues with the same numerics.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Callable

import torch

from homediff import precision
from homediff.models import attention
from homediff.training.checkpoint import Precisions
from homediff.training.config import TrainConfig
from homediff.training.objective import LossSettings, flow_matching_loss
from homediff.training.optim import is_hidden_matrix

logger = logging.getLogger(__name__)


def accelerator_precision(config: TrainConfig) -> str:
    """accelerate's mixed precision: as configured; ``"auto"`` defers to ``accelerate launch
    --mixed_precision`` or ``accelerate config`` when they ask for bf16 or fp16 (``"no"`` is also
    accelerate's default, so it does not count as asked), else is bf16 (else fp16) on GPUs and
    ``"no"`` on a CPU, where autocast is decided by measurement (``choose_precisions``). A value in
    the config wins over accelerate's, and says so."""
    wanted = config.train.mixed_precision
    launched = launched_precision()
    if wanted != "auto":
        if launched and launched != wanted:
            logger.warning("train.mixed_precision = %r in the config wins over accelerate's %r",
                           wanted, launched)
        return wanted
    if launched:
        return launched
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def launched_precision() -> str | None:
    """The mixed precision ``accelerate launch`` was asked for, if bf16 or fp16."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION")
    return value if value in ("bf16", "fp16") else None


def choose_precisions(config: TrainConfig, device: torch.device, parts: tuple | None = None,
                      saved: Precisions | None = None, agree: Callable[[float], float] = float) -> Precisions:
    """The run's ``Precisions``: the dtype names of CPU autocast (None: off), Muon's iteration
    and the text encoder, and the machine they were chosen on. ``parts``: the
    (model, text encoder, autoencoder) a run built, else they are built here as a run with the
    default builders would build them, so no trainer is needed. ``saved``: a checkpoint's choices,
    reused on the same machine. ``agree`` averages a measurement over processes so that every
    process chooses alike."""
    if parts is None:
        from homediff.training.components import Builders

        build = Builders()
        text_encoder = build.text_encoder(config, device)
        autoencoder = build.autoencoder(config, device)
        parts = (build.model(config, text_encoder, autoencoder, device), text_encoder, autoencoder)
    model, text_encoder, autoencoder = parts
    latent_channels, latent_factor = autoencoder.channels, autoencoder.factor
    machine = precision.machine_key(device)
    reuse = saved if saved and saved.machine == machine else None
    autocast = {"no": None, "bf16": "bfloat16", "fp16": "float16"}.get(accelerator_precision(config))
    auto = config.train.mixed_precision == "auto" and not launched_precision() and device.type == "cpu"
    if reuse:
        matmul_attention = reuse.attention
        autocast = reuse.autocast if auto else autocast  # None (float32) is a choice too
    else:
        layers = _attention_layers(config, model, latent_factor)
        dtypes = [torch.float32] + ([precision.DTYPES[autocast]] if autocast and not auto else [])
        model.use_matmul_attention(_choose_attention(layers, dtypes, device, agree))
        if auto:
            autocast = _choose_autocast(config, model, text_encoder.dim, latent_channels,
                                        latent_factor, device, agree)
        computed = {torch.float32} | ({precision.DTYPES[autocast]} if autocast else set())
        matmul_attention = tuple(sorted(map(precision.dtype_name, model.matmul_attention_dtypes & computed)))
    model.use_matmul_attention(precision.DTYPES[name] for name in matmul_attention)
    muon = None
    if config.optimizer.name == "muon":
        setting = config.optimizer.muon_dtype
        muon = reuse.muon if reuse and setting == "auto" else None
        muon = muon or precision.choose_matmul_dtype(
            setting, device, _newton_schulz_shape(model), "Muon's Newton-Schulz iteration",
            agree=agree).name
    text = precision.dtype_name(text_encoder.model.dtype)
    if config.text_encoder.options.dtype == "auto" and reuse:
        text = reuse.text
        text_encoder.to(dtype=precision.DTYPES[text])
    return Precisions(machine, autocast, muon, text, matmul_attention)


def _choose_autocast(config: TrainConfig, model: torch.nn.Module, text_dim: int, channels: int,
                     factor: int, device: torch.device, agree: Callable[[float], float]) -> str | None:
    """``"bfloat16"`` or None (float32) for CPU autocast: off without timing a step where bfloat16
    matrix products are not even ``MIN_AUTOCAST_SPEEDUP`` faster at the model's sizes; else as a
    training step with and without autocast compares (speed, loss and gradients)."""
    products = agree(precision.speedup_at(_step_shape(config, model, factor), device))
    if products < precision.MIN_AUTOCAST_SPEEDUP:
        logger.info("CPU mixed precision: float32 (bf16 matrix products measured %.2f× float32's "
                    "speed at the model's sizes)", products)
        return None
    layers = _attention_layers(config, model, factor)
    model.use_matmul_attention(model.matmul_attention_dtypes
                               | _choose_attention(layers, [torch.bfloat16], device, agree))
    probe = _probe_model(model, device)
    check = precision.check_autocast(
        probe, _probe_loss(probe, config, text_dim, channels, factor, device), device)
    faster = agree(check.speedup) >= precision.MIN_AUTOCAST_SPEEDUP
    close = agree(float(check.close)) == 1.0
    autocast = "bfloat16" if faster and close else None
    logger.info("CPU mixed precision: %s (bf16 autocast measured %.2f× float32's step speed; "
                "loss differs by %.2g, gradient cosine %.4f)", autocast or "float32",
                check.speedup, check.loss_error, check.grad_cosine)
    return autocast


def _step_shape(config: TrainConfig, model: torch.nn.Module, factor: int) -> tuple[int, int, int]:
    """The feed-forward product of a first-stage training step: (tokens of the batch, width,
    feed-forward width)."""
    stage, c = config.stages[0], model.config
    side = stage.resolution // factor // c.patch_size
    return stage.batch_size * (side * side + stage.text_length), c.dim, c.mlp_dim


def _attention_layers(config: TrainConfig, model: torch.nn.Module, factor: int):
    """The attention layers of a first-stage training step (``XUT.attention_layers``)."""
    stage = config.stages[0]
    side = stage.resolution // factor
    return model.attention_layers(stage.batch_size, side, side, stage.text_length, stage.tread_rate)


def _choose_attention(layers, dtypes: list[torch.dtype], device: torch.device,
                      agree: Callable[[float], float]) -> frozenset[torch.dtype]:
    chosen, found = attention.choose_matmul_dtypes(layers, dtypes, device, agree)
    logger.info("attention: %s", found)
    return chosen


def _newton_schulz_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """The product that dominates Muon's orthogonalisation of the model's largest hidden matrix X
    (r × c, r ≤ c): X Xᵀ, an (r, c, r) product."""
    shape = max((p.shape for n, p in model.named_parameters() if is_hidden_matrix(n, p)),
                key=lambda s: s.numel(), default=(64, 64))
    return min(shape), max(shape), min(shape)


def _probe_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of ``model`` whose zero-initialised layers are made random: a fresh model's zero
    output layer would hide every difference between two precisions."""
    probe = copy.deepcopy(model)
    draw = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            if not p.any():
                p.normal_(std=0.02, generator=draw)
    return probe


def _probe_loss(model, config: TrainConfig, text_dim: int, channels: int, factor: int,
                device: torch.device) -> Callable[[], torch.Tensor]:
    """The training loss of ``model`` on random inputs of the first stage's shapes, with the same
    draws at every call (for timing and comparing precisions)."""
    stage = config.stages[0]
    side = stage.resolution // factor
    draw = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(stage.batch_size, channels, side, side, generator=draw, device=device)
    ctx = torch.randn(stage.batch_size, stage.text_length, text_dim, generator=draw, device=device)
    settings = LossSettings(tread_rate=stage.tread_rate)
    return lambda: flow_matching_loss(model, x0, ctx, settings, torch.Generator(device).manual_seed(1))
