"""Optimiser parameter groups, the learning-rate schedule, and an EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn


def fan_in(p: torch.Tensor) -> int:
    """Inputs per output unit: the product of all but the first dimension; a vector's length."""
    return p[0].numel() if p.dim() >= 2 else p.numel()


def is_decayed(name: str, p: torch.Tensor) -> bool:
    """Weight decay goes to matrices and kernels, not to norms, biases or RoPE frequencies."""
    return p.dim() >= 2 and not name.endswith("rope.freqs")


def parameter_groups(model: nn.Module, weight_decay: float, lr_rule: str = "fan_in",
                     decay_norms_and_biases: bool = False) -> list[dict]:
    """AdamW groups with a per-tensor LR multiplier ``lr_scale``.

    ``lr_rule="fan_in"`` is HDM's "muP, base_dim=1": each tensor's LR is the base LR / fan-in, so a
    base LR of 0.5 gives a width-1024 linear layer about 5e-4. ``"plain"`` uses the base LR as is.
    Tensors with the same multiplier and decay share a group.
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0 / fan_in(p) if lr_rule == "fan_in" else 1.0
        decay = weight_decay if decay_norms_and_biases or is_decayed(name, p) else 0.0
        group = groups.setdefault((scale, decay), {"params": [], "lr_scale": scale,
                                                   "weight_decay": decay, "lr": 0.0})
        group["params"].append(p)
    return list(groups.values())


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine from 1 down to ``min_ratio``."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_scale"] * multiplier


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    decay at update t = min(decay, (1 + t) / (10 + t)), so early averages follow the weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self.parameter_names = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in model.state_dict().items():
            if name in self.parameter_names:
                self.shadow[name].lerp_(value.float(), 1 - decay)
            else:
                self.shadow[name].copy_(value)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
