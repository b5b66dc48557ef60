"""Position maps and 2-D axial rotary position embedding (RoPE).

Position maps are tensors of shape (..., N, 2) holding (y, x) per token, row-major.

The canonical grid of an nh × nw image (pixels, latents or patches alike) places cell centres in a
box whose long side spans [−1, 1] and whose short side spans ±short/long, centred at 0:

    y_i = y_min + (i + ½)·(y_max − y_min)/nh,   x_j likewise,

so a 2:1 landscape grid has y ∈ [−½, ½] and x ∈ [−1, 1]. A square crop of a larger image carries its
window of the full image's grid (``crop_window``); this is what lets a model trained on square crops
generate any aspect ratio. At inference the camera edits the map (``camera``):

    pos ← (pos + (y_shift, x_shift)) / zoom

shift first, then divide: zoom > 1 shrinks the visible window (zooms in), x_shift > 0 moves the view
to larger x (right), y_shift > 0 moves it down. The backbone resizes a map given at the input's
resolution to its patch grid (``resize_to_patches``) with antialiased bilinear filtering, exactly as
the released HDM weights were trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _box(nh: int, nw: int) -> tuple[float, float]:
    """Half-extents (y, x) of the canonical box: the long side spans [−1, 1]."""
    aspect = nw / nh
    if aspect > 1:
        return 1 / aspect, 1.0
    if aspect < 1:
        return 1.0, aspect
    return 1.0, 1.0


def _centres(half: float, n: int, device=None) -> torch.Tensor:
    edges = torch.linspace(-half, half, n + 1, device=device)
    return (edges[:-1] + edges[1:]) / 2


def canonical_grid(nh: int, nw: int, device=None) -> torch.Tensor:
    """The canonical position map of an nh × nw grid, shape (nh·nw, 2), (y, x), float32."""
    half_y, half_x = _box(nh, nw)
    ys, xs = _centres(half_y, nh, device), _centres(half_x, nw, device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)


def crop_window(full_h: int, full_w: int, top: int, left: int, height: int, width: int,
                device=None) -> torch.Tensor:
    """The (height·width, 2) window at (top, left) of the canonical grid of a full_h × full_w image."""
    if top < 0 or left < 0 or top + height > full_h or left + width > full_w:
        raise ValueError(
            f"crop window {height}x{width} at ({top}, {left}) lies outside a {full_h}x{full_w} grid")
    grid = canonical_grid(full_h, full_w, device).view(full_h, full_w, 2)
    return grid[top:top + height, left:left + width].reshape(-1, 2)


def camera(pos: torch.Tensor, zoom: float = 1.0, x_shift: float = 0.0,
           y_shift: float = 0.0) -> torch.Tensor:
    """Camera edit of a position map: pos ← (pos + (y_shift, x_shift)) / zoom."""
    if zoom <= 0:
        raise ValueError(f"zoom must be positive, got {zoom}")
    shift = pos.new_tensor([y_shift, x_shift])
    return (pos + shift) / zoom


def resize_to_patches(pos: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Resize a (B, height·width, 2) map to the (height/patch)·(width/patch) patch grid.

    Bilinear with antialiasing (align_corners=False): interior patches get their exact centre, the
    border row and column are pulled slightly inward, as in the original implementation.
    """
    b = pos.shape[0]
    grid = pos.reshape(b, height, width, 2).permute(0, 3, 1, 2)
    small = F.interpolate(grid.float(), size=(height // patch, width // patch), mode="bilinear",
                          antialias=True, align_corners=False)
    return small.flatten(2).transpose(1, 2).to(pos.dtype)


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
