"""What a run leaves when it ends, and the copies of its model that watching draws from: the EMA's
weights (the trained ones without an EMA) in a pipeline folder ``model/``, the backbone alone in
one file ``model.safetensors`` (``models.backbone_file``), and for a LoRA run its adapter in
``lora.safetensors`` (the single file then holds the backbone with the adapter fused). A checkpoint
of a run that has not ended draws too (``pipeline_from_checkpoint``)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from homediff.atomic import replace_folder, write_atomically
from homediff.models import XUT, lora
from homediff.models.backbone_file import save_backbone_file
from homediff.training import sharding
from homediff.training.checkpoint import Checkpoint
from homediff.training.components import Builders, lora_settings
from homediff.training.config import TrainConfig, config_from_dict, parse_toml
from homediff.training.run_state import load_trained_state


def final_weights(model: nn.Module, fsdp: bool, ema) -> dict[str, torch.Tensor]:
    """The model's weights with the EMA's averages in place of the trained ones, whole: under
    FSDP every process must call this."""
    weights = sharding.model_state(model, fsdp)
    return {**weights, **ema.state_dict()["shadow"]} if ema else weights


def adapters(config: TrainConfig) -> dict:
    """The adapters a run's backbone carries, by name (a LoRA run's; none otherwise)."""
    return {"default": lora_settings(config)} if config.lora.rank else {}


def model_copy(model: XUT, weights: dict[str, torch.Tensor], config: TrainConfig,
               device: torch.device) -> XUT:
    """A copy of the backbone in eval mode holding ``weights``, made without drawing from the
    global random generator (training's draws stay those of a run that never copies)."""
    with torch.random.fork_rng(devices=[]):
        copied = XUT(model.config)
        for name, settings in adapters(config).items():
            lora.add_adapter(copied, settings, name)
    copied.to(device).load_state_dict(weights)
    return copied.eval()


def pipeline_from_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """A pipeline of a checkpoint folder's EMA weights (the trained ones without an EMA), with the
    text encoder and autoencoder its config names, at the resolution of the stage it was saved in:
    a run's progress, looked at before it ends."""
    from homediff.pipeline import HomeDiffPipeline

    path, device = Path(path), torch.device(device)
    checkpoint = Checkpoint.load(path)
    config = config_from_dict(parse_toml(checkpoint.config))
    build = Builders()
    text_encoder, autoencoder = build.text_encoder(config, device), build.autoencoder(config, device)
    model = build.model(config, text_encoder, autoencoder, device)
    load_trained_state(model, checkpoint, path, False, config)
    weights = {**model.state_dict(), **(checkpoint.ema["shadow"] if checkpoint.ema else {})}
    stage = config.stages[min(checkpoint.progress.stage, len(config.stages) - 1)]
    return HomeDiffPipeline(model_copy(model, weights, config, device), text_encoder, autoencoder,
                            sample_size=stage.resolution, adapters=adapters(config))


def export_run(pipe, run_dir: Path, config: TrainConfig) -> Path:
    """Write ``pipe`` (the final weights) as the run's pipeline folder and single file, each
    replaced whole; returns the folder."""
    out, staged = run_dir / "model", run_dir / "model.partial"
    shutil.rmtree(staged, ignore_errors=True)
    pipe.save_pretrained(staged)
    replace_folder(staged, out)
    backbone = pipe.transformer
    if config.lora.rank:  # the adapter alone, and the backbone with it fused
        write_atomically(run_dir / "lora.safetensors", lambda path: lora.save_adapter(
            path, pipe.transformer, lora_settings(config)))
        backbone = copy.deepcopy(pipe.transformer)
        lora.fuse(backbone)
        lora.remove_adapters(backbone)
    write_atomically(run_dir / "model.safetensors", lambda path: save_backbone_file(path, backbone))
    return out
