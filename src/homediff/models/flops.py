"""Analytic FLOP counts: the XUT backbone's training step and the frozen encoders' forward passes.

A count is what ``torch.utils.flop_counter`` counts (the tests hold the two equal): matrix products,
convolutions and attention, 2 FLOPs per multiply-add, attention over every query-key pair whatever
the mask. Norms, activations, RoPE and the routing's gathers are element-wise and left out. These are
model FLOPs, the numerator of MFU: the forward passes that gradient checkpointing repeats are extra
work of the hardware, not of the model, and are not counted.

The encoders are described by their configs as plain dicts (a transformers ``config.json``, a
diffusers AutoencoderKL ``config.json``), so this module needs neither library.
"""

from __future__ import annotations

from collections.abc import Mapping

from homediff.errors import ConfigError
from homediff.models.tread import kept_count
from homediff.models.xut import XUTConfig


def _attention(queries: int, keys: int, width: int) -> int:
    """Scores and weighted values of attention over a total head width ``width``."""
    return 4 * queries * keys * width


def _block_flops(c: XUTConfig, tokens: int, skip_tokens: int = 0) -> int:
    d = c.dim
    flops = 2 * tokens * d * 3 * d + _attention(tokens, tokens, d) + 2 * tokens * d * d  # self-attention
    flops += 2 * tokens * d * 2 * c.mlp_dim + 2 * tokens * c.mlp_dim * d  # SwiGLU
    if skip_tokens:  # cross-attention to the skip: q, kv, attention, out
        flops += 2 * tokens * d * d + 2 * skip_tokens * d * 2 * d
        flops += _attention(tokens, skip_tokens, d) + 2 * tokens * d * d
    return flops


def _input_flops(c: XUTConfig, n_image: int, text_tokens: int) -> int:
    """The layers that read the inputs (patches, text states, flow time, aspect, pooled text)."""
    d = c.dim
    flops = 2 * n_image * c.in_channels * c.patch_size ** 2 * d + 2 * text_tokens * c.ctx_dim * d
    flops += 2 * d * d  # the time embedding's linear layer
    if c.aspect_embedding:
        flops += 2 * d
    if c.pooled_text:
        flops += 2 * c.ctx_dim * d
    return flops


def _adaln_flops(c: XUTConfig) -> int:
    return 2 * c.dim * 4 * c.dim + 2 * 4 * c.dim * 3 * c.dim


def forward_flops(c: XUTConfig, height: int, width: int, text_tokens: int,
                  tread_rate: float = 0.0) -> int:
    """FLOPs of one sample's forward pass for an input of height × width (latent pixels)."""
    p, d = c.patch_size, c.dim
    n_image = (height // p) * (width // p)
    full = n_image + text_tokens
    core = kept_count(n_image, tread_rate) + text_tokens
    flops = _input_flops(c, n_image, text_tokens)
    flops += 2 * n_image * d * p * p * c.in_channels  # unpatch
    flops += 3 * _adaln_flops(c)  # the three shared adaLN networks
    if c.aspect_embedding:
        flops += 2 * d * d
    if c.pooled_text:
        flops += 2 * d * d
    flops += (c.tread_pre_blocks + c.tread_post_blocks) * _block_flops(c, full)
    flops += sum(c.block_counts("enc_blocks")) * _block_flops(c, core)
    cross = core if c.skip != "none" else 0
    for n in c.block_counts("dec_blocks"):
        flops += _block_flops(c, core, skip_tokens=cross) + (n - 1) * _block_flops(c, core)
    return flops


def train_step_flops(c: XUTConfig, height: int, width: int, text_tokens: int,
                     tread_rate: float = 0.0) -> int:
    """FLOPs of one sample's forward and backward pass.

    The backward pass of a matrix product costs two forward ones (the gradients of its input and
    of its weight), except where the input is data, which needs no gradient: the layers that read
    the patches, text states, time and aspect cost one. Without skips (``skip="none"``) the
    cross-attention's adaLN network runs but feeds nothing, so it has no backward pass.
    """
    n_image = (height // c.patch_size) * (width // c.patch_size)
    unused = _adaln_flops(c) if c.skip == "none" else 0
    return (3 * forward_flops(c, height, width, text_tokens, tread_rate)
            - _input_flops(c, n_image, text_tokens) - 2 * unused)


#: transformers model types by MLP: gated (SwiGLU: gate, up, down) or plain (up, down; BERT).
GATED_TEXT_MODELS = ("qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2")
PLAIN_TEXT_MODELS = ("bert",)


def text_encoder_flops(config: Mapping, tokens: int) -> int:
    """Forward FLOPs of a transformers text model as ``AutoModel`` loads it (no language-model head)
    over one prompt of ``tokens`` tokens, from its ``config.json`` values: a decoder with a gated
    MLP and grouped-query attention (Qwen3, Llama) or a BERT encoder (plain MLP, pooler). Every
    layer runs whichever layer's states are used."""
    kind = config.get("model_type")
    if kind not in GATED_TEXT_MODELS + PLAIN_TEXT_MODELS:
        raise ConfigError(f"cannot count the FLOPs of a {kind!r} text encoder: homediff knows "
                          f"{', '.join(GATED_TEXT_MODELS + PLAIN_TEXT_MODELS)}")
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    queries = heads * head_dim
    keys = config.get("num_key_value_heads", heads) * head_dim
    per_layer = 2 * tokens * hidden * (queries + 2 * keys) + _attention(tokens, tokens, queries)
    per_layer += 2 * tokens * queries * hidden
    per_layer += 2 * tokens * hidden * inner * (3 if kind in GATED_TEXT_MODELS else 2)
    pooler = 2 * hidden * hidden if kind in PLAIN_TEXT_MODELS else 0  # BERT's pooler: first token
    return config["num_hidden_layers"] * per_layer + pooler


def _conv(out_pixels: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * out_pixels * c_in * c_out * kernel * kernel


def vae_encoder_flops(config: Mapping, height: int, width: int) -> int:
    """Forward FLOPs of a diffusers ``AutoencoderKL.encode`` (encoder and quant conv) of one
    height × width image, from its ``config.json`` values.

    Each down block holds ``layers_per_block`` ResNet blocks (two 3×3 convolutions, and a 1×1 one
    on the shortcut where the width changes), then, except the last, a 3×3 convolution of stride 2;
    the middle has two ResNet blocks around one single-head attention layer.
    """
    widths = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 1)
    latent = config.get("latent_channels", 4)

    def resnet(pixels: int, c_in: int, c_out: int) -> int:
        shortcut = _conv(pixels, c_in, c_out, 1) if c_in != c_out else 0
        return _conv(pixels, c_in, c_out, 3) + _conv(pixels, c_out, c_out, 3) + shortcut

    h, w = height, width
    flops = _conv(h * w, config.get("in_channels", 3), widths[0], 3)
    previous = widths[0]
    for i, channels in enumerate(widths):
        for _ in range(layers):
            flops += resnet(h * w, previous, channels)
            previous = channels
        if i < len(widths) - 1:
            h, w = h // 2, w // 2
            flops += _conv(h * w, channels, channels, 3)
    tokens, top = h * w, widths[-1]
    flops += 2 * resnet(tokens, top, top)
    if config.get("mid_block_add_attention", True):
        flops += 4 * 2 * tokens * top * top + _attention(tokens, tokens, top)  # q, k, v, out
    flops += _conv(tokens, top, 2 * latent, 3)
    if config.get("use_quant_conv", True):
        flops += _conv(tokens, 2 * latent, 2 * latent, 1)
    return flops
