"""Representation alignment (``train.align_weight``): the backbone's middle tokens learn how a
frozen image network groups the same image's patches.

REPA (Yu et al. 2025) regresses a diffusion transformer's middle tokens, through a learned head,
onto a frozen encoder's patch features, and so speeds up its early training. Here there is no
head: the loss matches the two token-by-token cosine-similarity matrices of each image (which
patches belong together, as the frozen network sees them), so nothing is added to the backbone,
its checkpoints or its exports. The frozen network is EfficientNet-Lite0 (``encoders.effnet``,
the ``eval`` extra) cut after block ``BLOCK`` (stride 16, 112 channels): the clean training crop,
resized to 16 × the backbone's token grid, gives one feature per token. Grids larger than
``MAX_SIDE`` (HDM's 1024² crops have 64 × 64 tokens) are averaged down to it first, which bounds
the cost at any size. A crop's features are computed once and kept in memory (``capacity`` crops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from homediff.caching import MemoryCache, cache_key

BLOCK = 10
STRIDE = 16
MAX_SIDE = 16  # at most 256 tokens per image compared: a 256 × 256 similarity matrix


class Aligner:
    """The frozen network and its features of the crops seen so far."""

    def __init__(self, device: torch.device, capacity: int = 8192):
        from homediff.encoders.effnet import load_effnet

        self.network = load_effnet(device)
        self.cache = MemoryCache(capacity)

    def loss(self, tokens: torch.Tensor, images: torch.Tensor, pos: torch.Tensor,
             keys: list[str]) -> torch.Tensor:
        """Mean squared difference between the token similarity matrices of ``tokens``
        (B, side², D) and of the frozen features of ``images`` (B, 3, H, W, in [−1, 1])."""
        side = round(tokens.shape[1] ** 0.5)
        if side * side != tokens.shape[1]:
            raise ValueError(f"alignment needs a square token grid, got {tokens.shape[1]} tokens")
        if side > MAX_SIDE:
            grid = tokens.float().transpose(1, 2).unflatten(2, (side, side))
            tokens, side = F.adaptive_avg_pool2d(grid, MAX_SIDE).flatten(2).transpose(1, 2), MAX_SIDE
        target = self.targets(images, pos, keys, side).to(tokens.device)
        return (similarities(tokens.float()) - similarities(target)).square().mean()

    @torch.no_grad()
    def targets(self, images: torch.Tensor, pos: torch.Tensor, keys: list[str], side: int) -> torch.Tensor:
        """The frozen features (B, side², 112) of each crop, from memory where seen before."""
        from homediff.encoders.effnet import prepare

        names = [cache_key("align", k, side, p[0].tolist(), p[-1].tolist()) for k, p in zip(keys, pos)]
        rows = [self.cache.get(name) for name in names]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            x = prepare(images[missing].to(next(self.network.parameters()).device), side * STRIDE)
            computed = self.network.block_features(x, BLOCK).flatten(2).transpose(1, 2)
            for i, row in zip(missing, computed.half().cpu()):
                rows[i] = row
                self.cache.put(names[i], row)
        return torch.stack(rows).float()


def similarities(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) → (B, N, N) cosine similarities between each image's tokens."""
    unit = F.normalize(tokens, dim=-1)
    return unit @ unit.transpose(1, 2)
