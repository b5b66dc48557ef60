"""Optimiser parameter groups, the learning-rate schedule, and an EMA of the weights."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(t):
    """A tensor sharded by FSDP (a ``DTensor``) gathered whole: every process must call this.
    Anything else is returned as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


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


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A weight matrix between two hidden layers: Muon's domain.

    Not the patch embedding or the output head (the network's ends), not a vector, and not a
    one-column embedding of a scalar input.
    """
    return p.dim() == 2 and min(p.shape) > 1 and not name.startswith(("in_patch.", "out_patch."))


def mark_muon_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Split each AdamW group of :func:`parameter_groups` into its hidden matrices (``muon``) and
    the rest, keeping the group's LR multiplier and decay."""
    names = {id(p): name for name, p in model.named_parameters()}
    split = []
    for group in groups:
        for muon in (True, False):
            params = [p for p in group["params"] if is_hidden_matrix(names[id(p)], p) == muon]
            if params:
                split.append({**group, "params": params, "muon": muon})
    return split


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: ``matrix`` with its singular values pushed towards 1
    (to about 0.7-1.2; Jordan et al. 2024). A stack of matrices (K, M, N) is orthogonalised each
    on its own in batched products. It runs in ``dtype``: bfloat16 by default, as the reference
    implementation and ``torch.optim.Muon`` do; the trainer picks float32 where bfloat16 matrix
    products are measured slower (``homediff.precision``)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(dtype)
    single = x.ndim == 2
    x = x.unsqueeze(0) if single else x
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.mT if tall else x
    return (x[0] if single else x).to(matrix.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon (momentum, then orthogonalised updates) for groups marked ``muon``; AdamW for the rest.

    Muon's step is scaled by 0.2·sqrt(max(rows, cols)) so its RMS matches AdamW's (Liu et al.
    2025, "Muon is scalable"): both kinds of group take the same learning rates and weight decay.
    Under torch.distributed each process orthogonalises its share of the matrices (balanced by
    cost) and one all-reduce hands every process all of them. ``ns_dtype``: the precision of the
    Newton-Schulz iteration (:func:`orthogonalize`).
    """

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, momentum: float = 0.95, ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(groups, dict(lr=0.0, weight_decay=0.0, betas=betas, eps=eps,
                                      momentum=momentum, muon=False))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        matrices = [(p, g) for g in self.param_groups if g["muon"] for p in g["params"]
                    if p.grad is not None]
        for (p, group), direction in zip(matrices, self._orthogonal_momenta(matrices)):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(direction, alpha=-group["lr"] * 0.2 * max(p.shape) ** 0.5)
        for group in self.param_groups:
            if group["muon"]:
                continue
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(self._adamw_update(p, group), alpha=-group["lr"])

    def _orthogonal_momenta(self, matrices: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
        """Update each matrix's momentum, then orthogonalise its Nesterov direction (matrices of
        one shape together, in batched products: many small products cost more one by one)."""
        sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
        load = [0] * world
        directions: list[torch.Tensor | None] = []
        mine: dict[tuple, list[int]] = {}  # this process's matrices by shape
        for i, (p, group) in enumerate(matrices):
            state = self.state[p]
            if not state:
                state["momentum"] = torch.zeros_like(p)
            state["momentum"].lerp_(p.grad, 1 - group["momentum"])
            owner = load.index(min(load))
            load[owner] += min(p.shape) ** 2 * max(p.shape)  # Newton-Schulz cost
            directions.append(None if owner == rank else torch.zeros_like(p))
            if owner == rank:
                mine.setdefault(tuple(p.shape), []).append(i)
        for indices in mine.values():
            nesterov = torch.stack([matrices[i][0].grad.lerp(self.state[matrices[i][0]]["momentum"],
                                                            matrices[i][1]["momentum"]) for i in indices])
            for i, direction in zip(indices, orthogonalize(nesterov, dtype=self.ns_dtype)):
                directions[i] = direction
        if sharded and directions:
            flat = torch.cat([d.flatten() for d in directions])
            dist.all_reduce(flat)
            directions = [d.view_as(p) for d, (p, _) in zip(flat.split([p.numel() for p, _ in matrices]),
                                                               matrices)]
        return directions

    def _adamw_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        mean = state["exp_avg"] / (1 - beta1 ** state["step"])
        scale = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
        return mean / scale


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
    """Exponential moving average of a model's trained parameters (those that require gradients:
    all of them, or only the adapters of a LoRA run), kept in float32 on the model's device: build
    it after the model has moved there. Buffers and frozen weights are the model's own. Built over
    a model sharded by FSDP, each process averages its own shards; ``state_dict`` gathers them, so
    every process must call it.

    decay at update t = min(decay, (1 + t) / (10 + t)), so early averages follow the weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.updates = 0
        self.parameter_names = [name for name, p in model.named_parameters() if p.requires_grad]
        state = model.state_dict()
        self.shadow = {name: state[name].detach().clone().float() for name in self.parameter_names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        torch._foreach_lerp_([self.shadow[name] for name in self.parameter_names],
                             [state[name].float() for name in self.parameter_names], 1 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {k: full_tensor(v) for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for name, value in state["shadow"].items():
            target = self.shadow[name]
            if isinstance(target, DTensor):  # this process's shard of the whole tensor
                value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                          target.placements)
            target.copy_(value)
