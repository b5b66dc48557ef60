"""Analytic FLOP count of an XUT forward pass (matrix products only, 2 FLOPs per multiply-add).

As in nanoGPT's MFU estimate, a training step (forward + backward) costs three forward passes.
Norms, activations and RoPE are element-wise and left out: they are a few percent at most.
"""

from __future__ import annotations

from homediff.models.tread import kept_count
from homediff.models.xut import XUTConfig


def _block_flops(c: XUTConfig, tokens: int, skip_tokens: int = 0) -> int:
    d = c.dim
    flops = 2 * tokens * d * 3 * d + 4 * tokens * tokens * d + 2 * tokens * d * d  # self-attention
    flops += 2 * tokens * d * 2 * c.mlp_dim + 2 * tokens * c.mlp_dim * d  # SwiGLU
    if skip_tokens:  # cross-attention: q, kv, scores, values, out
        flops += 2 * tokens * d * d + 2 * skip_tokens * d * 2 * d + 4 * tokens * skip_tokens * d
        flops += 2 * tokens * d * d
    return flops


def forward_flops(c: XUTConfig, height: int, width: int, text_tokens: int,
                  tread_rate: float = 0.0) -> int:
    """FLOPs of one sample's forward pass for an input of height × width (latent pixels)."""
    p, d = c.patch_size, c.dim
    n_image = (height // p) * (width // p)
    full = n_image + text_tokens
    core = kept_count(n_image, tread_rate) + text_tokens
    flops = 2 * n_image * c.in_channels * p * p * d * 2  # patch embedding and unpatch
    flops += 2 * text_tokens * c.ctx_dim * d  # text projection
    flops += 2 * d * d + 3 * (2 * d * 4 * d + 2 * 4 * d * 3 * d)  # time embedding, shared adaLN
    if c.aspect_embedding:
        flops += 2 * d + 2 * d * d
    if c.pooled_text:
        flops += 2 * c.ctx_dim * d + 2 * d * d
    flops += (c.tread_pre_blocks + c.tread_post_blocks) * _block_flops(c, full)
    flops += sum(c.block_counts("enc_blocks")) * _block_flops(c, core)
    for n in c.block_counts("dec_blocks"):
        cross = core if c.skip != "none" else 0
        flops += _block_flops(c, core, skip_tokens=cross) + (n - 1) * _block_flops(c, core)
    return flops


def train_step_flops(c: XUTConfig, height: int, width: int, text_tokens: int,
                     tread_rate: float = 0.0) -> int:
    """FLOPs of one sample's forward and backward pass."""
    return 3 * forward_flops(c, height, width, text_tokens, tread_rate)
