"""2-D axial rotary position embedding (RoPE) over the position maps of ``homediff.geometry``."""

from __future__ import annotations

import math

import torch
from torch import nn


class AxialRoPE(nn.Module):
    """Rotary embedding over (y, x) with learned log-frequencies, one table per attention layer.

    ``freqs`` has shape (heads, head_dim/4, 2): log-frequency per head, slot and axis. The angle of
    pair i of a head is pos[axis]·exp(freqs[head, i // 2, axis]) with axis = i mod 2 (y for even
    pairs, x for odd), and pair i is the adjacent channels (2i, 2i+1): every channel is rotated.
    Position (0, 0) (text tokens) is the identity.

    ``init="hdm"`` starts every log-frequency at ln π, as the original does (a shape slip in its
    initialiser); ``init="spaced"`` spreads each head's slots from π to 5π, as intended.
    """

    def __init__(self, heads: int, head_dim: int, init: str = "spaced"):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"axial RoPE needs a head dimension divisible by 4, got {head_dim}")
        slots = head_dim // 4
        if init == "hdm":
            log_freqs = torch.full((slots,), math.log(math.pi))
        elif init == "spaced":
            log_freqs = torch.linspace(math.log(math.pi), math.log(5 * math.pi), slots)
        else:
            raise ValueError(f"unknown RoPE init {init!r}: use 'spaced' or 'hdm'")
        self.freqs = nn.Parameter(log_freqs.view(1, slots, 1).repeat(heads, 1, 2))

    def rotation(self, pos: torch.Tensor) -> torch.Tensor:
        """(cos θ, sin θ) of every channel pair for positions (B, N, 2): (B, N, H, Dh/2, 2)."""
        angles = (pos[:, :, None, None, :].float() * self.freqs.float().exp()).flatten(-2)
        return torch.stack((angles.cos(), angles.sin()), dim=-1)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (..., Dh) by ``rotation`` (..., Dh/2, 2), in float32.

    The complex product (a + ib)·e^{iθ} = (a cos θ − b sin θ) + i(b cos θ + a sin θ), written in real
    arithmetic so that torch.compile generates kernels for it (inductor has none for complex tensors).
    """
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rotation.unbind(-1)
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)
