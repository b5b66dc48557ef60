"""Rectified flow for training: time sampling, noising, the velocity target and the loss.

Convention: flow time t ∈ [0, 1] with t = 1 pure noise. For data x0 and noise ε ~ N(0, I),

    x_t = t·ε + (1 − t)·x0,        target velocity v = dx_t/dt = ε − x0,

and the model is trained with the plain MSE between its prediction and v, optionally minus λ times
the MSE to another sample's velocity in the batch (contrastive flow matching, ΔFM: conditional flows
pushed apart, so a caption's flow is less an average of everyone's). Times are drawn from a
logit-normal, t = sigmoid(mean + std·u) with u ~ N(0, 1) (HDM: mean 0, std 1), optionally shifted
towards noise for larger images: t ← s·t / (1 + (s − 1)·t), with s = √(pixels / base pixels) from
``resolution_shift`` (SD3's rule; the trainer's ``train.time_shift_base``, off by default as in HDM). Pure functions over tensors; every random draw takes a generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from homediff.errors import ConfigError


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t ← s·t / (1 + (s − 1)·t): s > 1 moves times towards noise, s = 1 is the identity."""
    if shift <= 0:
        raise ConfigError(f"time shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(height: int, width: int, base: int = 256) -> float:
    """The shift for a height × width image relative to a base × base one: √(H·W / base²)."""
    return math.sqrt(height * width) / base


def sample_time(batch: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Flow times (B,) from the logit-normal(mean, std), shifted by ``shift``."""
    if std < 0:
        raise ConfigError(f"logit-normal std must be >= 0, got {std}")
    draw_device = generator.device if generator is not None else device
    u = torch.randn(batch, generator=generator, device=draw_device)
    t = shift_time(torch.sigmoid(mean + std * u), shift)
    return t if device is None else t.to(device)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t·ε + (1 − t)·x0 with t (B,) or a scalar."""
    t = _per_sample(t, x0)
    return t * noise + (1 - t) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0, the velocity of the straight path from data to noise."""
    return noise - x0


def flow_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
              contrastive: float = 0.0) -> torch.Tensor:
    """Mean squared error between predicted and target velocity, over every element; with
    ``contrastive`` λ > 0, minus λ times the error to the next sample's target (batch rolled by one)."""
    prediction, target = prediction.float(), velocity_target(x0, noise).float()
    loss = F.mse_loss(prediction, target)
    if contrastive and len(target) > 1:
        loss = loss - contrastive * F.mse_loss(prediction, target.roll(1, dims=0))
    return loss
