"""Attention kernels, and which one a CPU run uses, chosen by measurement.

Two ways to compute softmax(q·kᵀ/√d)·v over (B, H, N, Dh) tensors:

- ``"sdpa"``: ``scaled_dot_product_attention``, a fused kernel that never stores the (N, M) scores
  (flash attention on GPUs and CPUs). The default, and the only path on GPUs.
- ``"matmul"``: two batched matrix products around a float32 softmax. It stores the scores for the
  backward pass, so it is used only where they are few (``MAX_SCORES``); where it is used, it runs
  the products on the CPU's matrix kernels. On a Zen 4 CPU in bfloat16, the flash kernel's backward
  pass is slower than its float32 one, while bfloat16 products are twice float32's speed: the
  matmul path then trains several times faster at short sequences (benchmarks/RESULTS.md).

A model keeps the dtypes in which it takes the matmul path (``XUT.use_matmul_attention``); none by
default. ``choose_matmul_dtypes`` times both paths, forward and backward, over the attention layers
of a run's step (with routing, most of them see the kept tokens only), in each dtype it may
compute in, and keeps the matmul path where it is ``MIN_SPEEDUP`` faster; the measurement is
remembered per machine with the precisions' (``precision.attention_speedup``). The timing is of
eager kernels: under torch.compile the matmul path's element-wise work fuses, and gains more.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from homediff import precision

#: The matmul path stores B·H·N·M probabilities per layer (in float32 and in the compute dtype) for
#: the backward pass: above this many (2²², ~25 MB a layer) the fused kernel runs whatever was chosen.
MAX_SCORES = 2**22
#: The matmul path must be at least this much faster to be chosen: it stores what SDPA does not.
MIN_SPEEDUP = 1.25
PROBE_ROUNDS = 5  # timings of each path, alternating; their ratios' median counts


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v by two batched products, the softmax in float32 at least; (B, H, N, Dh)
    tensors."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype) @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           matmul_dtypes: frozenset[torch.dtype] = frozenset()) -> torch.Tensor:
    """Attention over (B, N, H, Dh) tensors, returning (B, N, H·Dh): the matmul path where q's dtype
    is in ``matmul_dtypes`` and the scores are at most ``MAX_SCORES``, else SDPA."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.dtype in matmul_dtypes and fits(*q.shape[:3], k.shape[2]):
        out = matmul_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


#: An attention layer's work in a step: its (B, H, N, Dh) shape and how many layers have it.
Layers = tuple[tuple[tuple[int, int, int, int], int], ...]


def fits(batch: int, heads: int, queries: int, keys: int) -> bool:
    """Whether an attention may take the matmul path: at most ``MAX_SCORES`` scores."""
    return batch * heads * queries * keys <= MAX_SCORES


def matmul_speedup(layers: Layers, dtype: torch.dtype, device: torch.device | str,
                   rounds: int = PROBE_ROUNDS) -> float:
    """SDPA's time / the matmul path's, forward and backward, over ``layers`` in ``dtype``: the
    median over ``rounds`` of the two paths timed one after the other (a shared machine's drift
    hits both alike), after a round that warms both up."""
    device = torch.device(device)
    draw = torch.Generator(device).manual_seed(0)
    cases = []
    for shape, count in layers:
        q, k, v = (torch.randn(shape, generator=draw, device=device).to(dtype).requires_grad_()
                   for _ in range(3))
        cases.append((count, q, k, v, torch.randn(shape, generator=draw, device=device).to(dtype)))

    def seconds(path: Callable) -> float:
        return sum(count * precision.seconds(lambda: path(q, k, v).backward(grad), device,
                                             repeats=1, warm=False)
                   for count, q, k, v, grad in cases)

    seconds(F.scaled_dot_product_attention), seconds(matmul_attention)
    return statistics.median(seconds(F.scaled_dot_product_attention) / seconds(matmul_attention)
                             for _ in range(rounds))


def describe(layers: Layers) -> str:
    return " + ".join(f"{count}×{'×'.join(map(str, shape))}" for shape, count in layers)


def choose_matmul_dtypes(layers: Layers, dtypes: Iterable[torch.dtype], device: torch.device | str,
                         agree: Callable[[float], float] = float) -> tuple[frozenset[torch.dtype], str]:
    """The dtypes among ``dtypes`` in which the matmul path is ``MIN_SPEEDUP`` faster over a step's
    attention ``layers`` (those that may take it: ``fits``), and what was measured, in words. None
    on a GPU, nor where no layer fits. ``agree`` averages a measurement over processes."""
    device = torch.device(device)
    if device.type != "cpu":
        return frozenset(), "SDPA (GPU)"
    layers = tuple((tuple(shape), count) for shape, count in layers if fits(*shape[:3], shape[2]))
    if not layers:
        return frozenset(), f"SDPA (every layer has more than {MAX_SCORES} scores)"
    chosen, found = set(), []
    for dtype in dtypes:
        speedup = agree(precision.attention_speedup(
            describe(layers), dtype, device, lambda dtype=dtype: matmul_speedup(layers, dtype, device)))
        found.append(f"{precision.dtype_name(dtype)} {speedup:.2f}×")
        if speedup >= MIN_SPEEDUP:
            chosen.add(dtype)
    path = ", ".join(sorted(map(precision.dtype_name, chosen))) or "none"
    return frozenset(chosen), (f"matrix products in: {path} (their speed over SDPA's for "
                               f"{describe(layers)}: {', '.join(found)})")
