"""FSDP for the backbone: sharding it over the processes, and its whole state gathered from them.

``ACCELERATE_USE_FSDP=true`` (as an FSDP ``accelerate config`` sets it) under torch.distributed makes
the trainer shard the backbone itself with torch's ``fully_shard`` (FSDP2): each transformer block
is one unit of gathering and resharding, the remaining tensors another, on GPUs and CPUs alike
(accelerate ignores FSDP on CPUs, and prepares FSDP2 only together with an optimiser). Checkpoints
hold whole tensors, as without FSDP, so that a run resumes with or without FSDP in any number of
processes, each taking its shards of them. Every function here that gathers must be called by every
process; with ``sharded=False`` each is the plain ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def requested() -> bool:
    """FSDP was asked for, and several processes run under torch.distributed."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            and torch.distributed.is_available() and torch.distributed.is_initialized())


def shard(model: nn.Module, device: torch.device, block_type: type) -> nn.Module:
    """FSDP2 over every process: each ``block_type`` module, then the rest of ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    model.to(device)
    for block in [m for m in model.modules() if isinstance(m, block_type)]:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _whole():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's whole tensors (sharded: gathered onto the first process's CPU)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_whole())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], sharded: bool) -> None:
    """Whole tensors into the model (sharded: each process keeps its shards)."""
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_whole())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """The optimiser's state; sharded: whole and keyed by parameter name."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_whole())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         sharded: bool) -> None:
    """A state of either kind into the optimiser, so that a run resumes with or without FSDP
    (``load_state_dict`` matches parameters by their order, whatever their keys). The optimiser keeps
    the implementation it was built with (fused or not): a saved state would impose its own."""
    state = {**state, "param_groups": [
        {**saved, **{key: built[key] for key in ("fused", "foreach") if key in built}}
        for saved, built in zip(state["param_groups"], optimizer.param_groups)]}
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _keyed_by_name(model, optimizer, state), options=_whole())


def _keyed_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """``state`` keyed by parameter name; ``Optimizer.state_dict`` numbers the parameters in the
    order of the optimiser's groups."""
    if all(isinstance(key, str) for group in state["param_groups"] for key in group["params"]):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[key]: value for key, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[key] for key in group["params"]]}
                             for group in state["param_groups"]]}
