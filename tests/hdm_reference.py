"""The original HDM backbone's forward pass (``XUDiT``, eval mode: no routing), written from the
specification (hdm-spec §2, §3.1, §7) and independent of homediff's model code.

It is built from an arch JSON (the original's ``config/arch`` keyword arguments) and reads the
weights by the original's key names (§7.3), so a test can check that a file homediff exports is
read as the original reads it. Everything runs in float64 but the position grid and the time
embedding's angles, which the original makes in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``XUDiT.__init__`` defaults (§2.1) for the keys used here that an arch JSON leaves out (the
#: other sizes come with the weights; the head count is dim // dim_head whatever ``heads`` says).
DEFAULTS = {"patch_size": 2, "input_dim": 4, "dim": 1024, "dim_head": 64, "depth": 8, "enc_blocks": 1,
            "dec_blocks": 2, "tread_config": None, "addon_info_embs_dim": None}


def mish(x):
    return x * torch.tanh(F.softplus(x))


def linear(w, name, x):
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def axial_grid(nh: int, nw: int) -> torch.Tensor:
    """Cell centres (nh·nw, 2), (y, x): the long side spans [−1, 1], the short side ±short/long (§3.1)."""
    ar = nw / nh
    y_half, x_half = (1 / ar, 1.0) if ar > 1 else (1.0, ar)
    y = [-y_half + (i + 0.5) * 2 * y_half / nh for i in range(nh)]
    x = [-x_half + (j + 0.5) * 2 * x_half / nw for j in range(nw)]
    return torch.tensor([[a, b] for a in y for b in x])  # float32, as the original's grid


def rope(log_freqs, x, pos):
    """Rotate adjacent pairs of every head dimension (§2.6): pair i turns by pos[axis]·exp(log_freq)
    with axis y for even i and x for odd i, frequency slot ⌊i/2⌋. x (B, N, nH, Dh), pos (B, N, 2)."""
    theta = pos[:, :, None, None, :] * log_freqs.exp()  # (B, N, nH, Dh/4, 2)
    theta = theta.flatten(-2)  # (B, N, nH, Dh/2): [f0 y, f0 x, f1 y, …]
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = theta.cos(), theta.sin()
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)


def attention(q, k, v, heads: int):
    """Plain softmax attention over (B, N, D) inputs split into heads, no mask."""
    split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(-2)


def rms(x, gain):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain


def block(w, name, x, pos, mods, arch, context=None):
    """A transformer block (§2.5); ``context`` given: the block has cross-attention."""
    heads, dh = arch["dim"] // arch["dim_head"], arch["dim_head"]
    dim = arch["dim"]

    def modulated(kind, norm, stream):
        scale, shift, _ = mods[kind]
        return rms(stream, w[f"{name}.{norm}.norm.weight"]) * (1 + scale) + shift

    h = modulated("attn", "attn_pre_norm", x)
    q, k, v = linear(w, f"{name}.attn.qkv", h).split(dim, dim=-1)
    freqs = w[f"{name}.attn.rope.freqs"]
    q, k = (rope(freqs, t.unflatten(-1, (heads, dh)), pos).flatten(-2) for t in (q, k))
    x = h + linear(w, f"{name}.attn.out", attention(q, k, v, heads)) * (1 + mods["attn"][2])
    if context is not None:
        h = modulated("xattn", "xattn_pre_norm", x)
        q = linear(w, f"{name}.xattn.q", h)
        k, v = linear(w, f"{name}.xattn.kv", context).split(dim, dim=-1)
        freqs = w[f"{name}.xattn.rope.freqs"]
        q, k = (rope(freqs, t.unflatten(-1, (heads, dh)), pos).flatten(-2) for t in (q, k))
        x = h + linear(w, f"{name}.xattn.out", attention(q, k, v, heads)) * (1 + mods["xattn"][2])
    h = modulated("ffw", "mlp_pre_norm", x)
    gate, value = linear(w, f"{name}.mlp.w12", h).chunk(2, dim=-1)
    return h + linear(w, f"{name}.mlp.w3", F.silu(gate) * value) * (1 + mods["ffw"][2])


def per_group(value, depth: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * depth


def original_forward(arch: dict, weights: dict[str, torch.Tensor], x, t, ctx, addon_info=None,
                     pos_map=None) -> torch.Tensor:
    """``XUDiT.forward`` in eval mode (§2.9) with the weights under their bare names (§7.3).
    x (B, C, H, W) latent; t (B,); ctx (B, T, ctx_dim); addon_info (B,) = ln(W/H); pos_map
    (B, H·W, 2) at latent resolution, or None for the grid at patch resolution."""
    arch = DEFAULTS | arch
    w = {k: v.double() for k, v in weights.items()}
    x, ctx = x.double(), ctx.double()
    p, batch, (height, width) = arch["patch_size"], x.shape[0], x.shape[-2:]
    h, wd = height // p, width // p

    tokens = F.conv2d(x, w["in_patch.proj.weight"], w["in_patch.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    if pos_map is None:
        pos = axial_grid(h, wd).double().expand(batch, -1, -1)
    else:  # latent-resolution map resized to the patch grid, bilinear with antialiasing (§2.2)
        grid = pos_map.double().unflatten(1, (height, width)).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, wd), mode="bilinear", antialias=True, align_corners=False)
        pos = grid.flatten(2).transpose(1, 2)

    # the time embedding's angles in float32, from the float32 t and frequency buffer as in the original
    angles = 1000 * t.float().view(-1, 1) * weights["time_emb.freqs"].float().view(1, -1)
    embedding = torch.cat((angles.cos(), angles.sin()), -1).double()
    cond = mish(linear(w, "time_emb.proj.0", embedding))[:, None]
    if arch["addon_info_embs_dim"]:
        addon = mish(linear(w, "addon_info_embs_proj.0", addon_info.double().view(-1, 1)))
        cond = cond + linear(w, "addon_info_embs_proj.2", addon)[:, None]
    mods = {}
    for kind in ("attn", "xattn", "ffw"):
        name = f"shared_adaln_{kind}"
        normed = F.layer_norm(cond, (arch["dim"],), w[f"{name}.0.weight"], w[f"{name}.0.bias"], 1e-5)
        mods[kind] = linear(w, f"{name}.3", mish(linear(w, f"{name}.1", normed))).chunk(3, dim=-1)

    length = tokens.shape[1]
    stream = torch.cat((tokens, linear(w, "ctx_proj", ctx)), dim=1)
    pos = torch.cat((pos, pos.new_zeros(batch, ctx.shape[1], 2)), dim=1)
    tread = arch["tread_config"] or {}
    for i in range(tread.get("prev_trns_depth", 0)):
        stream = block(w, f"prev_tread_trns.blocks.{i}", stream, pos, mods, arch)
    depth = arch["depth"]
    for g, count in enumerate(per_group(arch["enc_blocks"], depth)):
        for j in range(count):
            stream = block(w, f"backbone.enc_blocks.{g}.{j}", stream, pos, mods, arch)
    encoded = stream  # every decoder group attends to the last encoder output (§2.8)
    for g, count in enumerate(per_group(arch["dec_blocks"], depth)):
        for j in range(count):
            stream = block(w, f"backbone.dec_blocks.{g}.{j}", stream, pos, mods, arch,
                           context=encoded if j == 0 else None)
    for i in range(tread.get("post_trns_depth", 0)):
        stream = block(w, f"post_tread_trns.blocks.{i}", stream, pos, mods, arch)

    out = linear(w, "out_patch.proj", stream[:, :length])  # (row·p + col)·C + channel (§2.3)
    channels = arch["input_dim"]
    out = out.view(batch, h, wd, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(batch, channels, height, width)

