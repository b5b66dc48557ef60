"""How an edited view relates to the canonical square view: the camera that best explains it.

A view of h × w pixels has the canonical grid G (``homediff.geometry.canonical_grid``). A camera
edit (zoom z, shift s = (y, x)) asks pixel p to show what the canonical square view shows at
``(G(p) + s) / z`` (``homediff.geometry.camera``). The canonical square view spans [−1, 1]² with
its pixel centres exactly where ``grid_sample`` (align_corners=False) reads, so resampling it at
those positions predicts the edited view wherever they fall inside [−1, 1]² (the overlap).

``align`` searches the (z, s) whose prediction best matches an image: the Pearson correlation of
image and prediction over the overlap (at least ``MIN_OVERLAP`` of the image), on a coarse grid of
log-zooms and shifts (with both images at most ``COARSE_SIDE`` on the canonical side), then refined
at ``ANALYSIS_SIDE`` by a pattern search that halves its steps. The correlation at
the found camera is the edit's consistency; the same search between images of different seeds is
the baseline that says "nothing in common". Positions do not depend on resolution, so measuring
smaller copies of both images changes nothing but the detail the search sees.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from homediff.geometry import canonical_grid

MIN_OVERLAP = 0.25
ANALYSIS_SIDE = 64
COARSE_SIDE = 16
COARSE_LOG_ZOOM = torch.linspace(math.log(0.5), math.log(2.5), 25)
COARSE_SHIFT = torch.linspace(-0.75, 0.75, 13)
REFINE_STEPS = (0.04, 0.0625, 0.0625)  # first steps of (log z, y, x); halved down to FINEST
FINEST = 1e-3
MAX_MOVES = 200
CHUNK = 2048


@dataclass(frozen=True)
class Camera:
    """A camera edit: pos ← (pos + (y, x)) / zoom."""

    zoom: float = 1.0
    y: float = 0.0
    x: float = 0.0


@dataclass(frozen=True)
class Alignment:
    camera: Camera
    similarity: float  # Pearson correlation over the overlap
    overlap: float  # share of the image's pixels the canonical view predicts


def predict(canonical: torch.Tensor, params: torch.Tensor, height: int, width: int):
    """The canonical (3, S, S) view resampled for K cameras ``params`` (K, 3) = (log z, y, x) on an
    h × w view: ((K, 3, h, w) prediction, (K, h, w) mask of positions inside [−1, 1]²)."""
    params = params.reshape(-1, 3).double()
    grid = canonical_grid(height, width).double().view(1, height, width, 2)
    zoom = params[:, 0].exp().view(-1, 1, 1, 1)
    pos = (grid + params[:, 1:].view(-1, 1, 1, 2)) / zoom
    mask = (pos.abs() <= 1).all(-1)
    source = canonical.to(pos.dtype).expand(len(params), *canonical.shape)
    pred = F.grid_sample(source, pos.flip(-1), mode="bilinear", padding_mode="border",
                         align_corners=False)
    return pred, mask


def similarity(image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
    """(correlation, overlap) of a (3, h, w) image with K predictions over their masks; the
    correlation is −1 where the overlap is below ``MIN_OVERLAP``."""
    image = image.to(pred.dtype)
    weight = mask.unsqueeze(1).to(pred.dtype).expand_as(pred)
    count = weight.sum((1, 2, 3)).clamp(min=1)
    centred_image = (image - (image * weight).sum((1, 2, 3), keepdim=True)
                     / count.view(-1, 1, 1, 1)) * weight
    centred_pred = (pred - (pred * weight).sum((1, 2, 3), keepdim=True)
                    / count.view(-1, 1, 1, 1)) * weight
    norms = (centred_image.square().sum((1, 2, 3)) * centred_pred.square().sum((1, 2, 3))).sqrt()
    corr = (centred_image * centred_pred).sum((1, 2, 3)) / norms.clamp(min=1e-12)
    overlap = mask.flatten(1).double().mean(1)
    return torch.where(overlap >= MIN_OVERLAP, corr, torch.full_like(corr, -1.0)), overlap


def score(canonical: torch.Tensor, image: torch.Tensor, params: torch.Tensor):
    """(correlation, overlap) of ``image`` with the canonical view under each camera, in chunks."""
    parts = [similarity(image, *predict(canonical, chunk, *image.shape[-2:]))
             for chunk in params.reshape(-1, 3).split(CHUNK)]
    return torch.cat([c for c, _ in parts]), torch.cat([o for _, o in parts])


def _at_most(canonical: torch.Tensor, image: torch.Tensor, limit: int = ANALYSIS_SIDE):
    """Both images scaled by one factor so the canonical side is at most ``limit``."""
    side = canonical.shape[-1]
    if side <= limit:
        return canonical, image
    factor = limit / side
    size = tuple(max(1, round(n * factor)) for n in image.shape[-2:])
    return _resize(canonical, (limit, limit)), _resize(image, size)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0]


def align(canonical: torch.Tensor, image: torch.Tensor) -> Alignment:
    """The camera under which the canonical (3, S, S) view best predicts ``image`` (3, h, w)."""
    if canonical.shape[-1] != canonical.shape[-2]:
        raise ValueError(f"the canonical view must be square, got {tuple(canonical.shape[-2:])}")
    canonical, image = _at_most(canonical.double(), image.double())
    coarse = torch.cartesian_prod(COARSE_LOG_ZOOM, COARSE_SHIFT, COARSE_SHIFT).double()
    corr, _ = score(*_at_most(canonical, image, COARSE_SIDE), coarse)
    best = coarse[corr.argmax()]
    best_corr = float(score(canonical, image, best[None])[0][0])
    steps = torch.tensor(REFINE_STEPS, dtype=torch.float64)
    moves = torch.tensor([m for m in itertools.product((-1, 0, 1), repeat=3) if any(m)],
                         dtype=torch.float64)
    for _ in range(MAX_MOVES):
        if float(steps.max()) <= FINEST:
            break
        candidates = best + moves * steps
        corr, _ = score(canonical, image, candidates)
        if float(corr.max()) > best_corr:
            best, best_corr = candidates[corr.argmax()], float(corr.max())
        else:
            steps = steps / 2
    corr, overlap = score(canonical, image, best[None])
    return Alignment(Camera(math.exp(float(best[0])), float(best[1]), float(best[2])),
                     float(corr[0]), float(overlap[0]))


def similarity_at(canonical: torch.Tensor, image: torch.Tensor, camera: Camera) -> float:
    """The correlation of ``image`` with the canonical view under a given camera (−1 when the
    overlap is too small)."""
    canonical, image = _at_most(canonical.double(), image.double())
    params = torch.tensor([[math.log(camera.zoom), camera.y, camera.x]], dtype=torch.float64)
    return float(score(canonical, image, params)[0][0])
