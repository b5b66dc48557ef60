"""TREAD token routing: a random subset of image tokens bypasses the middle of the network.

A sequence is [image tokens (L) ; text tokens (T)]. At rate r, each sample keeps L − ⌊r·L⌋ image
tokens, chosen uniformly at random and kept in their original order, plus every text token. The
routed core runs on the kept tokens only; ``merge`` puts its outputs back in place while bypassed
tokens keep the values they had when routing began.
"""

from __future__ import annotations

import math

import torch


def kept_count(n_image: int, rate: float) -> int:
    """How many of n_image tokens go through the routed core at this rate."""
    if not 0 <= rate < 1:
        raise ValueError(f"routing rate must be in [0, 1), got {rate}")
    return n_image - math.floor(n_image * rate)


def choose(batch: int, n_image: int, rate: float, *,
           generator: torch.Generator | list[torch.Generator] | None = None,
           device: torch.device | None = None) -> torch.Tensor:
    """Indices (B, K) of the kept image tokens per sample, ascending; drawn from ``generator``, or
    sample i's from ``generator[i]`` given a list (one per sample)."""
    keep = kept_count(n_image, rate)
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        scores = torch.cat([torch.rand(1, n_image, generator=g, device=g.device).to(generator[0].device)
                            for g in generator])
    else:
        draw_device = generator.device if generator is not None else device
        scores = torch.rand(batch, n_image, generator=generator, device=draw_device)
    kept = scores.argsort(dim=1)[:, :keep].sort(dim=1).values
    return kept if device is None else kept.to(device)


def select(x: torch.Tensor, kept: torch.Tensor, n_image: int) -> torch.Tensor:
    """The kept image tokens of x (B, L + T, ...) followed by all its text tokens: (B, K + T, ...)."""
    index = kept.view(*kept.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.cat((x[:, :n_image].gather(1, index), x[:, n_image:]), dim=1)


def merge(x: torch.Tensor, routed: torch.Tensor, kept: torch.Tensor, n_image: int) -> torch.Tensor:
    """Write the core's outputs ``routed`` (B, K + T, D) back into the full sequence x (B, L + T, D)."""
    keep = kept.shape[1]
    routed = routed.to(x.dtype)  # under autocast the core may return a lower precision than x has
    index = kept.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    image = x[:, :n_image].scatter(1, index, routed[:, :keep])
    return torch.cat((image, routed[:, keep:]), dim=1)
