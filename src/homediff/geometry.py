"""Position maps: where each token of an image sits, shared by data, models, pipeline and trainer.

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

import torch
import torch.nn.functional as F


def canonical_box(nh: int, nw: int) -> tuple[float, float]:
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
    half_y, half_x = canonical_box(nh, nw)
    ys, xs = _centres(half_y, nh, device), _centres(half_x, nw, device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)


def crop_window(full_h: int, full_w: int, top: int, left: int, height: int, width: int,
                device=None) -> torch.Tensor:
    """The (height·width, 2) window at (top, left) of the canonical grid of a full_h × full_w image."""
    if top < 0 or left < 0 or top + height > full_h or left + width > full_w:
        raise ValueError(
            f"crop window {height}x{width} at ({top}, {left}) lies outside a {full_h}x{full_w} grid")
    half_y, half_x = canonical_box(full_h, full_w)  # only the window's rows and columns are built
    ys = _centres(half_y, full_h, device)[top:top + height]
    xs = _centres(half_x, full_w, device)[left:left + width]
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)


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
