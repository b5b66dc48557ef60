"""XUT, the Cross-U-Transformer, with TREAD routing: configuration, presets and the model.

Layout of one forward pass over [image tokens (L) ; text tokens (T)]:

    patches + projected text ─► pre-routing blocks ─► route (keep K of L image tokens, all text)
        ─► U core: `depth` encoder groups, then `depth` decoder groups whose first block
           cross-attends to an encoder output ─► merge ─► post-routing blocks ─► unpatch image tokens

Skip wiring ``"last"``: every decoder group attends to the final encoder output (the original code
and the released weights). ``"mirror"``: decoder group i attends to encoder group depth − 1 − i (the
HDM report's figure). ``"none"``: no cross-attention, a plain stack of the same blocks (for
ablations).

``pooled_text`` (not in HDM): the mean of the text states, through a small MLP whose last layer
starts at zero, is added to the time embedding that drives the shared adaLN, as SD3 and Flux add a
pooled text vector. Every block is then modulated by the caption as well as by the time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from homediff.errors import ConfigError
from homediff.geometry import canonical_grid, resize_to_patches
from homediff.models import tread
from homediff.models.layers import (Block, CrossAttention, Modulations, PatchEmbed, SelfAttention,
                                    TimestepEmbedding, UnPatch, modulation, shared_adaln)


@dataclass
class XUTConfig:
    """Hyper-parameters of an XUT backbone. The defaults are the released HDM model (XUT-base)."""

    patch_size: int = 2
    in_channels: int = 4
    dim: int = 1024
    ctx_dim: int = 1024
    head_dim: int = 64
    mlp_dim: int = 3072
    depth: int = 4
    enc_blocks: int | list[int] = 1
    dec_blocks: int | list[int] = 3
    tread_pre_blocks: int = 1
    tread_post_blocks: int = 3
    tread_rate: float = 0.5
    aspect_embedding: bool = True
    pooled_text: bool = False
    skip: str = "last"
    rope_init: str = "spaced"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("patch_size", "in_channels", "dim", "ctx_dim", "head_dim", "mlp_dim", "depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.dim % self.head_dim or self.head_dim % 4:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must divide model.dim ({self.dim}) "
                              "and be divisible by 4 (axial RoPE)")
        if self.skip not in ("last", "mirror", "none"):
            raise ConfigError(f"model.skip must be 'last', 'mirror' or 'none', got {self.skip!r}")
        if self.rope_init not in ("spaced", "hdm"):
            raise ConfigError(f"model.rope_init must be 'spaced' or 'hdm', got {self.rope_init!r}")
        if not 0 <= self.tread_rate < 1:
            raise ConfigError(f"model.tread_rate must be in [0, 1), got {self.tread_rate}")
        self.block_counts("enc_blocks"), self.block_counts("dec_blocks")

    def block_counts(self, name: str) -> list[int]:
        """Blocks per group of the encoder or decoder (a scalar applies to every group)."""
        value = getattr(self, name)
        counts = [value] * self.depth if isinstance(value, int) else list(value)
        if len(counts) != self.depth or min(counts) < 1:
            raise ConfigError(f"model.{name} must be a positive integer or a list of {self.depth}, "
                              f"got {value!r}")
        return counts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "XUTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> "XUTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_hdm_config(cls, cfg: dict) -> "XUTConfig":
        """Translate an original HDM arch JSON (``XUDiT`` keyword arguments) into a config."""
        unsupported = {"class_cond": 0, "double_t": False, "dec_ctx": False, "concat_ctx": True,
                       "use_dyt": False, "shared_adaln": True}
        for key, wanted in unsupported.items():
            if key in cfg and cfg[key] != wanted:
                raise ConfigError(f"HDM config option {key}={cfg[key]!r} is not supported "
                                  f"(only {key}={wanted!r} is)")
        addon = cfg.get("addon_info_embs_dim")
        if addon not in (None, 0, 1):
            raise ConfigError(f"HDM config addon_info_embs_dim={addon} is not supported (use 1)")
        known = {"patch_size", "input_dim", "dim", "ctx_dim", "ctx_size", "heads", "dim_head",
                 "mlp_dim", "depth", "enc_blocks", "dec_blocks", "tread_config",
                 "addon_info_embs_dim", *unsupported}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown HDM config key(s): {', '.join(unknown)}")
        tread_cfg = cfg.get("tread_config") or {}
        return cls(
            patch_size=cfg.get("patch_size", 2), in_channels=cfg.get("input_dim", 4),
            dim=cfg.get("dim", 1024), ctx_dim=cfg.get("ctx_dim", 1024),
            head_dim=cfg.get("dim_head", 64), mlp_dim=cfg.get("mlp_dim", 3072),
            depth=cfg.get("depth", 8), enc_blocks=cfg.get("enc_blocks", 1),
            dec_blocks=cfg.get("dec_blocks", 2),
            tread_pre_blocks=tread_cfg.get("prev_trns_depth", 0),
            tread_post_blocks=tread_cfg.get("post_trns_depth", 0),
            tread_rate=tread_cfg.get("dropout_ratio", 0.0),
            aspect_embedding=addon == 1, skip="last", rope_init="hdm")

    def to_hdm_config(self) -> dict:
        """The original HDM arch JSON (``XUDiT`` keyword arguments) of this config, the inverse of
        ``from_hdm_config``. ``rope_init`` and ``gradient_checkpointing`` do not change the
        trained function, so they are left out; what the original cannot build is refused."""
        if self.skip != "last":
            raise ConfigError(f"model.skip={self.skip!r} cannot be written as an HDM arch config: "
                              "the original's decoder groups all attend to the last encoder "
                              "output (skip='last')")
        if self.pooled_text:
            raise ConfigError("model.pooled_text=true cannot be written as an HDM arch config: "
                              "the original has no pooled-text embedding")
        routed = self.tread_pre_blocks or self.tread_post_blocks or self.tread_rate
        tread_config = {"prev_trns_depth": self.tread_pre_blocks,
                        "post_trns_depth": self.tread_post_blocks,
                        "dropout_ratio": self.tread_rate} if routed else None
        blocks = {name: value if isinstance(value, int) else list(value)
                  for name, value in (("enc_blocks", self.enc_blocks), ("dec_blocks", self.dec_blocks))}
        return {"patch_size": self.patch_size, "input_dim": self.in_channels, "dim": self.dim,
                "ctx_dim": self.ctx_dim, "heads": self.dim // self.head_dim,
                "dim_head": self.head_dim, "mlp_dim": self.mlp_dim, "depth": self.depth, **blocks,
                "tread_config": tread_config,
                "addon_info_embs_dim": 1 if self.aspect_embedding else None}


PRESETS: dict[str, dict] = {
    # The HDM report's sizes (XUT-base is the released model).
    "xut-small": dict(dim=896, ctx_dim=640, head_dim=64, mlp_dim=3072, dec_blocks=2),
    "xut-base": dict(),
    "xut-large": dict(dim=1280, ctx_dim=1152, head_dim=128, mlp_dim=4096),
    # Small enough to train on a CPU; ctx_dim 384 fits all-MiniLM-L6-v2.
    "xut-tiny": dict(dim=128, ctx_dim=384, head_dim=32, mlp_dim=384, depth=2, dec_blocks=2,
                     tread_post_blocks=1),
    "xut-mini": dict(dim=256, ctx_dim=384, head_dim=64, mlp_dim=768, depth=2, dec_blocks=2,
                     tread_post_blocks=1),
}


class BlockStack(nn.Module):
    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class UCore(nn.Module):
    """Encoder groups, then decoder groups whose first block cross-attends to an encoder output."""

    def __init__(self, config: XUTConfig, make_block):
        super().__init__()
        self.skip = config.skip
        self.enc_blocks = nn.ModuleList(nn.ModuleList(make_block() for _ in range(n))
                                        for n in config.block_counts("enc_blocks"))
        cross = config.skip != "none"
        self.dec_blocks = nn.ModuleList(nn.ModuleList(make_block(cross=cross and i == 0) for i in range(n))
                                        for n in config.block_counts("dec_blocks"))

    def forward(self, x, pos, mods, run):
        encoded = []
        for group in self.enc_blocks:
            for block in group:
                x = run(block, x, pos, mods)
            encoded.append(x)
        for g, group in enumerate(self.dec_blocks):
            skip = {"last": encoded[-1], "mirror": encoded[len(encoded) - 1 - g]}.get(self.skip)
            x = run(group[0], x, pos, mods, skip)
            for block in group[1:]:
                x = run(block, x, pos, mods)
        return x


class XUT(nn.Module):
    """The Cross-U-Transformer backbone; predicts the flow velocity of a noisy input."""

    def __init__(self, config: XUTConfig):
        super().__init__()
        self.config = c = config

        def make_block(cross: bool = False) -> Block:
            return Block(c.dim, c.head_dim, c.mlp_dim, c.rope_init, cross=cross)

        self.in_patch = PatchEmbed(c.in_channels, c.dim, c.patch_size)
        self.time_emb = TimestepEmbedding(c.dim)
        if c.aspect_embedding:
            self.addon_info_embs_proj = nn.Sequential(nn.Linear(1, c.dim), nn.Mish(),
                                                      nn.Linear(c.dim, c.dim))
            nn.init.zeros_(self.addon_info_embs_proj[2].weight)
            nn.init.zeros_(self.addon_info_embs_proj[2].bias)
        if c.pooled_text:
            self.pooled_text_proj = nn.Sequential(nn.Linear(c.ctx_dim, c.dim), nn.Mish(),
                                                  nn.Linear(c.dim, c.dim))
            nn.init.zeros_(self.pooled_text_proj[2].weight)
            nn.init.zeros_(self.pooled_text_proj[2].bias)
        self.shared_adaln_attn = shared_adaln(c.dim)
        self.shared_adaln_xattn = shared_adaln(c.dim)
        self.shared_adaln_ffw = shared_adaln(c.dim)
        self.ctx_proj = nn.Linear(c.ctx_dim, c.dim)
        self.prev_tread_trns = BlockStack([make_block() for _ in range(c.tread_pre_blocks)])
        self.backbone = UCore(c, make_block)
        self.post_tread_trns = BlockStack([make_block() for _ in range(c.tread_post_blocks)])
        self.out_patch = UnPatch(c.dim, c.in_channels, c.patch_size)
        nn.init.zeros_(self.out_patch.proj.weight)
        nn.init.zeros_(self.out_patch.proj.bias)

    @classmethod
    def from_hdm_config(cls, cfg: dict) -> "XUT":
        """Build a model from an original HDM arch JSON (the released model's ``config``)."""
        return cls(XUTConfig.from_hdm_config(cfg))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "XUT":
        return cls(XUTConfig.preset(name, **overrides))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _attentions(self):
        return (m for m in self.modules() if isinstance(m, (SelfAttention, CrossAttention)))

    def use_matmul_attention(self, dtypes) -> None:
        """Compute attention by the matmul path in these dtypes (``models.attention``), by SDPA in
        any other; none (the default): SDPA everywhere."""
        dtypes = frozenset(dtypes)
        for module in self._attentions():
            module.matmul_dtypes = dtypes

    @property
    def matmul_attention_dtypes(self) -> frozenset[torch.dtype]:
        """The dtypes in which attention takes the matmul path (``use_matmul_attention``)."""
        return next(self._attentions()).matmul_dtypes

    def attention_layers(self, batch: int, height: int, width: int, text_tokens: int,
                         tread_rate: float) -> tuple[tuple[tuple[int, int, int, int], int], ...]:
        """The attention of a step on (batch, C, height, width) inputs: each (B, heads, tokens,
        head width) and how many layers attend at it (the routed core sees the kept tokens)."""
        c = self.config
        heads, n_image = c.dim // c.head_dim, (height // c.patch_size) * (width // c.patch_size)
        full = n_image + text_tokens
        core = (tread.kept_count(n_image, tread_rate) if tread_rate > 0 else n_image) + text_tokens
        core_layers = (sum(c.block_counts("enc_blocks")) + sum(c.block_counts("dec_blocks"))
                       + (c.depth if c.skip != "none" else 0))
        counts = {full: c.tread_pre_blocks + c.tread_post_blocks}
        counts[core] = counts.get(core, 0) + core_layers
        return tuple(((batch, heads, tokens, c.head_dim), count) for tokens, count in counts.items() if count)

    def routing_rate(self, tread_rate: float | None) -> float:
        """None: the configured rate when training, none in eval mode; 0: no routing."""
        if tread_rate is None:
            return self.config.tread_rate if self.training else 0.0
        return float(tread_rate)

    def _run(self, block: Block, *args):
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _conditioning(self, t, aspect, ctx, height: int, width: int) -> Modulations:
        """The shared adaLN modulations of (time, aspect, pooled text), computed outside autocast:
        (B, 1, D) work is cheap in the weights' dtype, and under bfloat16 autocast torch.compile
        mis-generates the identical bias gradients of the pooled-text and aspect embeddings (two
        stores of one bfloat16 reduction; the generated C++ does not compile)."""
        device = ctx.device.type
        if not torch.amp.is_autocast_available(device):  # the meta device (FLOP counts, plans)
            return self._modulations(t, aspect, ctx, height, width)
        with torch.autocast(device, enabled=False):
            return self._modulations(t, aspect, ctx, height, width)

    def _modulations(self, t, aspect, ctx, height: int, width: int) -> Modulations:
        batch, device = ctx.shape[0], ctx.device
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(batch)
        cond = self.time_emb(t)
        if self.config.pooled_text:
            cond = cond + self.pooled_text_proj(ctx.mean(dim=1, keepdim=True).to(cond.dtype))
        if self.config.aspect_embedding:
            if aspect is None:
                aspect = math.log(width / height)
            aspect = torch.as_tensor(aspect, device=device).reshape(-1, 1).expand(batch, 1)
            cond = cond + self.addon_info_embs_proj(aspect.to(cond.dtype)).unsqueeze(1)
        return Modulations(modulation(self.shared_adaln_attn, cond),
                           modulation(self.shared_adaln_xattn, cond),
                           modulation(self.shared_adaln_ffw, cond))

    def forward(self, x: torch.Tensor, t, ctx: torch.Tensor, *, pos_map: torch.Tensor | None = None,
                aspect=None, tread_rate: float | None = None,
                generator: torch.Generator | None = None,
                features: list | None = None) -> torch.Tensor:
        """Velocity for noisy input x (B, C, H, W) at flow time t (B,) given text states ctx (B, T, Dc).

        pos_map: (B, H·W, 2) (y, x) at x's resolution, default the canonical grid. aspect: ln(W/H)
        of the full image per sample, default that of x. tread_rate: see ``routing_rate``;
        generator: draws the routing, so a fixed generator repeats it. features: a list that gets
        the image tokens after the middle blocks (B, h·w, D), for a training signal on them.
        """
        batch, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} is not divisible by the patch size {p}")
        h, w = height // p, width // p
        n_image = h * w
        if pos_map is None:
            pos = canonical_grid(h, w, x.device).expand(batch, -1, -1)
        elif pos_map.shape != (batch, height * width, 2):
            raise ValueError(f"pos_map must have shape ({batch}, {height * width}, 2) for a "
                             f"{height}x{width} input, got {tuple(pos_map.shape)}")
        else:
            pos = resize_to_patches(pos_map, height, width, p)
        mods = self._conditioning(t, aspect, ctx, height, width)
        seq = torch.cat((self.in_patch(x), self.ctx_proj(ctx)), dim=1)
        pos = torch.cat((pos, pos.new_zeros(batch, ctx.shape[1], 2)), dim=1)

        for block in self.prev_tread_trns.blocks:
            seq = self._run(block, seq, pos, mods)
        rate = self.routing_rate(tread_rate)
        if rate > 0:
            kept = tread.choose(batch, n_image, rate, generator=generator, device=x.device)
            core = self.backbone(tread.select(seq, kept, n_image), tread.select(pos, kept, n_image),
                                 mods, self._run)
            seq = tread.merge(seq, core, kept, n_image)
        else:
            seq = self.backbone(seq, pos, mods, self._run)
        if features is not None:
            features.append(seq[:, :n_image])
        for block in self.post_tread_trns.blocks:
            seq = self._run(block, seq, pos, mods)
        return self.out_patch(seq[:, :n_image], h, w)
