"""The building blocks of XUT: patches, time embedding, shared adaLN, attention, SwiGLU, the block.

Token tensors are (B, N, D). Attribute names follow the original implementation's state-dict keys,
so released checkpoints load without renaming.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from homediff.models.attention import attend
from homediff.models.rope import AxialRoPE, rotate


class Modulation(NamedTuple):
    """One sub-layer kind's adaLN triple, each (B, 1, D), stored as used: 1 + scale, shift, 1 + gate."""

    scale: torch.Tensor
    shift: torch.Tensor
    gate: torch.Tensor


class Modulations(NamedTuple):
    attn: Modulation
    xattn: Modulation
    ffw: Modulation


def shared_adaln(dim: int) -> nn.Sequential:
    """One global modulation network: LayerNorm → Linear(D, 4D) → Mish → Linear(4D, 3D), last zeroed.

    Its output splits as scale, shift, gate (in that order), and every block uses it.
    """
    net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, 3 * dim))
    nn.init.zeros_(net[3].weight)
    nn.init.zeros_(net[3].bias)
    return net


def modulation(net: nn.Sequential, cond: torch.Tensor) -> Modulation:
    scale, shift, gate = net(cond).chunk(3, dim=-1)
    return Modulation(1 + scale, shift, 1 + gate)


class TimestepEmbedding(nn.Module):
    """Flow time t ∈ [0, 1] → (B, 1, D): [cos ‖ sin] of 1000·t·10000^(−k/(D/2)), Linear, Mish.

    The angles are computed in float32 whatever the model's dtype (fine frequencies need it). The
    ``freqs`` buffer holds the same table only so that state dicts match the original's keys.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.half = dim // 2
        self.register_buffer("freqs", self.frequencies(), persistent=True)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Mish())

    def frequencies(self, device=None) -> torch.Tensor:
        k = torch.arange(self.half, dtype=torch.float32, device=device)
        return torch.exp(-math.log(10000.0) * k / self.half)[None]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 1000 * t.float().reshape(-1, 1) * self.frequencies(t.device)
        emb = torch.cat((angles.cos(), angles.sin()), dim=-1)
        return self.proj(emb.to(self.proj[0].weight.dtype)).unsqueeze(1)


class PatchEmbed(nn.Module):
    """(B, C, H, W) → (B, (H/p)·(W/p), D) by a p×p convolution with stride p, tokens row-major."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class UnPatch(nn.Module):
    """(B, h·w, D) → (B, C, h·p, w·p); a token's p·p·C outputs are ordered (row, column, channel)."""

    def __init__(self, dim: int, out_channels: int, patch: int):
        super().__init__()
        self.patch, self.out_channels = patch, out_channels
        self.proj = nn.Linear(dim, patch * patch * out_channels)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.patch, self.out_channels
        out = self.proj(x).view(x.shape[0], h, w, p, p, c)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, w * p)


class ModulatedNorm(nn.Module):
    """RMSNorm(x; g, eps 1e-6) ⊙ (1 + scale) + shift, with the scale and shift given.

    The gain g is folded into the (B, 1, D) scale, which saves a full-size multiplication.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        normed = F.rms_norm(x, self.norm.normalized_shape, None, self.norm.eps)
        return torch.addcmul(mod.shift, normed, self.norm.weight * mod.scale)


class SwiGLU(nn.Module):
    """w3(silu(a) ⊙ b) with [a ‖ b] = w12(x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class SelfAttention(nn.Module):
    """Multi-head self-attention with axial RoPE on queries and keys; no mask. ``matmul_dtypes``:
    where the attention takes the matmul path (``models.attention``)."""

    def __init__(self, dim: int, head_dim: int, rope_init: str):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.matmul_dtypes: frozenset[torch.dtype] = frozenset()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.rope = AxialRoPE(self.heads, head_dim, rope_init)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        rotation = self.rope.rotation(pos)
        return self.out(attend(rotate(q, rotation), rotate(k, rotation), v, self.matmul_dtypes))


class CrossAttention(nn.Module):
    """Queries from the stream, keys and values from a context of the same token set (a U skip)."""

    def __init__(self, dim: int, ctx_dim: int, head_dim: int, rope_init: str):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.matmul_dtypes: frozenset[torch.dtype] = frozenset()
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(ctx_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.rope = AxialRoPE(self.heads, head_dim, rope_init)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        rotation = self.rope.rotation(pos)
        q = rotate(self.q(x).unflatten(-1, (self.heads, self.head_dim)), rotation)
        k, v = self.kv(ctx).unflatten(-1, (2, self.heads, self.head_dim)).unbind(2)
        return self.out(attend(q, rotate(k, rotation), v, self.matmul_dtypes))


class Block(nn.Module):
    """A transformer block with shared adaLN and, optionally, cross-attention to a skip input.

    The residual is added to the modulated normalisation of the stream (as the released weights
    were trained), with gates applied as (1 + gate):

        h = mod_attn(x);   x = h + SelfAttn(h)·(1 + g_attn)
        h = mod_xattn(x);  x = h + CrossAttn(h, skip)·(1 + g_xattn)      (cross blocks only)
        h = mod_ffw(x);    y = h + SwiGLU(h)·(1 + g_ffw)
    """

    def __init__(self, dim: int, head_dim: int, mlp_dim: int, rope_init: str, cross: bool = False):
        super().__init__()
        self.attn_pre_norm = ModulatedNorm(dim)
        self.attn = SelfAttention(dim, head_dim, rope_init)
        if cross:
            self.xattn_pre_norm = ModulatedNorm(dim)
            self.xattn = CrossAttention(dim, dim, head_dim, rope_init)
        self.mlp_pre_norm = ModulatedNorm(dim)
        self.mlp = SwiGLU(dim, mlp_dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mods: Modulations,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn_pre_norm(x, mods.attn)
        x = torch.addcmul(h, self.attn(h, pos), mods.attn.gate)
        if skip is not None:
            h = self.xattn_pre_norm(x, mods.xattn)
            x = torch.addcmul(h, self.xattn(h, skip, pos), mods.xattn.gate)
        h = self.mlp_pre_norm(x, mods.ffw)
        return torch.addcmul(h, self.mlp(h), mods.ffw.gate)
