"""LoRA adapters on the backbone, through PEFT: which layers take them, and adding, saving, loading,
scaling, fusing and removing them.

Layers are chosen by readable names (``TARGET_PATTERNS``, matched against module names):

    attention        the self-attention projections (qkv, out), over image and text tokens
    cross_attention  the skip connections' cross-attention (q, kv, out)
    mlp              the feed-forward layers (w12, w3)
    adaln            the shared adaLN modulation
    text             the projection of the text encoder's states (ctx_proj)

A layer with adapters computes ``W x + Σ scale_i · (alpha_i / rank_i) · B_i A_i x``; B starts at
zero, so a new adapter leaves the model's output as it was. An adapter file is safetensors: each
layer's ``lora_A``/``lora_B`` weight under the layer's module name, the settings in the metadata.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from homediff.errors import CheckpointError, ConfigError
from homediff.extras import require

TARGET_PATTERNS = {
    "attention": r"\.attn\.(qkv|out)$",
    "cross_attention": r"\.xattn\.(q|kv|out)$",
    "mlp": r"\.mlp\.(w12|w3)$",
    "adaln": r"^shared_adaln_\w+\.\d+$",
    "text": r"^ctx_proj$",
}
DEFAULT_TARGETS = ("attention", "cross_attention", "mlp")
_ADAPTER_KEY = re.compile(r"^(.*)\.(lora_A|lora_B)\.([^.]+)\.weight$")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 8.0  # scale alpha / rank
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(TARGET_PATTERNS))
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets must be some of {', '.join(TARGET_PATTERNS)}, got "
                              f"{list(self.targets)}")
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1), got rank "
                              f"{self.rank}, alpha {self.alpha}, dropout {self.dropout}")


def _peft():
    return require("peft", "lora", "peft")


def target_modules(model: nn.Module, targets) -> list[str]:
    """The names of the linear layers that ``targets`` select."""
    patterns = [re.compile(TARGET_PATTERNS[t]) for t in targets]
    linear = [name.removesuffix(".base_layer") for name, module in model.named_modules()
              if isinstance(module, nn.Linear)]  # a layer with adapters holds its own as base_layer
    names = [name for name in linear if any(p.search(name) for p in patterns)]
    if not names:
        raise ConfigError(f"no layer of this model matches the LoRA targets {list(targets)}")
    return names


def lora_layers(model: nn.Module) -> list[nn.Module]:
    layer_type = _peft().tuners.lora.LoraLayer
    return [m for m in model.modules() if isinstance(m, layer_type)]


def adapters(model: nn.Module) -> list[str]:
    """The adapters the model holds, in the order they were added."""
    layers = lora_layers(model)
    return list(layers[0].lora_A.keys()) if layers else []


def add_adapter(model: nn.Module, settings: LoraSettings, name: str = "default") -> None:
    """Add a zero-initialised adapter (its B matrices are zero) to the layers ``settings``
    selects; every weight outside the adapters is frozen."""
    peft = _peft()
    if name in adapters(model):
        raise ConfigError(f"the model already has an adapter named {name!r}")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=target_modules(model, settings.targets))
    with warnings.catch_warnings():  # PEFT warns at a second adapter, which is what we want
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    for param_name, param in model.named_parameters():
        param.requires_grad_(f".{name}." in param_name and ".lora_" in param_name)


def set_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Make exactly the adapters in ``scales`` active, each at its scale (0: no effect)."""
    for layer in lora_layers(model):
        trainable = {n: p.requires_grad for n, p in layer.named_parameters()}
        layer.set_adapter(list(scales))
        for name, scale in scales.items():
            layer.set_scale(name, scale)
        for n, p in layer.named_parameters():  # activating must not unfreeze anything
            p.requires_grad_(trainable[n])


def adapter_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """An adapter's weights, keyed ``LAYER.lora_A.weight`` / ``LAYER.lora_B.weight``."""
    state = {}
    for key, value in model.state_dict().items():
        match = _ADAPTER_KEY.match(key)
        if match and match.group(3) == name:
            state[f"{match.group(1)}.{match.group(2)}.weight"] = value
    if not state:
        raise ConfigError(f"the model has no adapter named {name!r}")
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Copy ``adapter_state``-style weights into adapter ``name`` (added beforehand), exactly."""
    own = {key: value for key, value in model.state_dict().items()
           if (m := _ADAPTER_KEY.match(key)) and m.group(3) == name}
    wanted = {re.sub(r"\.(lora_A|lora_B)\.weight$", rf".\1.{name}.weight", k): v for k, v in state.items()}
    missing, unexpected = sorted(set(own) - set(wanted)), sorted(set(wanted) - set(own))
    wrong = [k for k in set(own) & set(wanted) if own[k].shape != wanted[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source}: the adapter does not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shapes {wrong[:3]})")
    with torch.no_grad():
        for key, value in wanted.items():
            own[key].copy_(value)


def fuse(model: nn.Module, names: list[str] | None = None) -> None:
    """Add the active adapters (or ``names``) into the base weights, at their current scales."""
    for layer in lora_layers(model):
        layer.merge(adapter_names=names)


def unfuse(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def is_fused(model: nn.Module) -> bool:
    return any(layer.merged for layer in lora_layers(model))


def remove_adapters(model: nn.Module) -> None:
    """Put each adapted layer's base layer back (fused adapters stay in its weights)."""
    adapted = {id(layer) for layer in lora_layers(model)}
    for name, module in list(model.named_modules()):
        if id(module) in adapted:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights under their plain names, without adapters (fused ones included)."""
    return {key.replace(".base_layer.", "."): value for key, value in model.state_dict().items()
            if not _ADAPTER_KEY.match(key)}


def save_adapter(path: str | Path, model: nn.Module, settings: LoraSettings, name: str = "default") -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model, name).items()}
    save_file(state, str(path), {"homediff_lora": json.dumps(asdict(settings))})


def read_adapter(path: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """An adapter file's settings and weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            meta = json.loads((file.metadata() or {})["homediff_lora"])
        state = load_file(path)
    except KeyError:
        raise CheckpointError(f"{path}: not a homediff LoRA file (no homediff_lora settings)") from None
    except Exception as err:  # a missing or damaged file
        raise CheckpointError(f"{path}: cannot read the adapter ({err})") from err
    meta["targets"] = tuple(meta["targets"])
    return LoraSettings(**meta), state
