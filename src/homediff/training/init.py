"""Where a fine-tune starts: the weights named by ``[init] from``.

- a homediff pipeline folder: its backbone, and its text encoder and autoencoder in place of the
  ones the config names (the config's text options apply);
- a homediff ``model.safetensors`` (the single file a run writes): the backbone;
- a released HDM file or a Lightning checkpoint (``init.arch``: its arch JSON, default XUT-base):
  the backbone, and the file's ``vae.*`` and ``te.*`` tensors in the config's autoencoder and text
  encoder when it holds them (as ``HomeDiffPipeline.from_hdm_release`` loads it).

The backbone the config describes must fit the weights exactly: a mismatch names the keys and
shapes. A resume loads these weights again, then the checkpoint's on top (a LoRA checkpoint holds
only the adapters).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from homediff.encoders.autoencoders import Autoencoder, load_autoencoder
from homediff.encoders.text import TextEncoder
from homediff.errors import CheckpointError
from homediff.models import XUT, load_hdm_state_dict
from homediff.models.release import read_state_dict
from homediff.pipeline import HomeDiffPipeline
from homediff.training.config import TrainConfig


def init_kind(config: TrainConfig) -> str | None:
    """None (no init), "folder", "single" (a homediff model.safetensors) or "release"."""
    if not config.init.from_:
        return None
    path = Path(config.init.from_)
    if (path / "model_index.json").is_file():
        return "folder"
    if not path.is_file():
        raise CheckpointError(f"init.from {path}: no such file, and not a homediff pipeline folder")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            if "homediff_config" in (file.metadata() or {}):
                return "single"
    return "release"


@functools.lru_cache(maxsize=1)
def _release(path: str, text_encoder: str, vae: str, arch: str, options: str) -> HomeDiffPipeline:
    return HomeDiffPipeline.from_hdm_release(path, text_encoder=text_encoder, vae=vae, arch=arch or None,
                                             text_encoder_options=json.loads(options))


def _release_pipeline(config: TrainConfig) -> HomeDiffPipeline:
    options = json.dumps(dataclasses.asdict(config.text_encoder.options), sort_keys=True)
    return _release(config.init.from_, config.text_encoder.name, config.autoencoder.name,
                    config.init.arch, options)


def init_text_encoder(config: TrainConfig) -> TextEncoder | None:
    kind = init_kind(config)
    options = dataclasses.asdict(config.text_encoder.options)
    if kind == "folder":
        return TextEncoder.from_pretrained(Path(config.init.from_) / "text_encoder", **options)
    return _release_pipeline(config).text_encoder if kind == "release" else None


def init_autoencoder(config: TrainConfig) -> Autoencoder | None:
    kind = init_kind(config)
    if kind == "folder":
        return load_autoencoder(Path(config.init.from_) / "vae")
    return _release_pipeline(config).vae if kind == "release" else None


def load_backbone(model: XUT, config: TrainConfig) -> XUT:
    """Copy the ``init.from`` backbone into ``model`` (built from the config), exactly."""
    kind, path = init_kind(config), Path(config.init.from_)
    if kind == "release":
        state = _release_pipeline(config).transformer.state_dict()
    else:
        state = read_state_dict(path / "transformer" / "diffusion_pytorch_model.safetensors"
                                if kind == "folder" else path)
    with torch.no_grad():
        load_hdm_state_dict(model, state, f"init.from {path}")
    return model
