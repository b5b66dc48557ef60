"""Pure metrics of the evaluations: caption retrieval ranks, top-k accuracy and its standard error, and
the Fréchet distance between two feature sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOPK = 10  # accuracies at k = 1..TOPK are kept for the plot


def caption_ranks(queries: torch.Tensor, query_captions: list[str], gallery: torch.Tensor,
                  gallery_captions: list[str]) -> torch.Tensor:
    """1-based rank of each query's caption among the gallery's captions (module docstring)."""
    names = sorted(set(gallery_captions))
    index = {c: i for i, c in enumerate(names)}
    missing = set(query_captions) - set(index)
    if missing:
        raise ValueError(f"{len(missing)} query captions have no gallery image, e.g. {min(missing)!r}")
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    owner = torch.tensor([index[c] for c in gallery_captions])
    scores = torch.full((len(queries), len(names)), -2.0, dtype=torch.float64)
    scores = scores.scatter_reduce(1, owner.expand(len(queries), -1), sims, "amax")
    own = scores.gather(1, torch.tensor([[index[c]] for c in query_captions]))
    return 1 + (scores > own).sum(1)


def topk_accuracy(ranks: torch.Tensor, ks=range(1, TOPK + 1)) -> list[float | None]:
    """Share of ranks within k, for each k (None without queries)."""
    return [float((ranks <= k).double().mean()) if len(ranks) else None for k in ks]


def topk_standard_error(ranks: torch.Tensor, captions: list[str],
                        ks=range(1, TOPK + 1)) -> list[float | None]:
    """Standard error of each top-k accuracy when the captions are a random draw: the spread of the
    per-caption accuracies over the square root of their number (a caption's images are not
    independent draws, so they count once). None with fewer than 2 captions."""
    index = {c: i for i, c in enumerate(sorted(set(captions)))}
    if len(index) < 2:
        return [None for _ in ks]
    owner = torch.tensor([index[c] for c in captions])

    def per_caption(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(index), dtype=torch.float64).index_add_(0, owner, values.double())

    images = per_caption(torch.ones(len(owner)))
    return [float((per_caption(ranks <= k) / images).std() / len(index) ** 0.5) for k in ks]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½) of Gaussians fitted to (N, D) sets."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(sa)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp(min=0).sqrt().sum()
    return max(float(mu @ mu + sa.trace() + sb.trace() - 2 * cross), 0.0)
