"""Where a fine-tune starts: the weights named by ``[init] from``.

- a homediff pipeline folder: its backbone, and its text encoder and autoencoder in place of the
  ones the config names (the config's text options apply);
- a homediff ``model.safetensors`` (the single file a run writes): the backbone;
- a released HDM file or a Lightning checkpoint (``init.arch``: its arch JSON, default XUT-base):
  the backbone, and the file's ``vae.*`` and ``te.*`` tensors in the config's autoencoder and text
  encoder when it holds them (``hdm_release.read_release``).

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

from homediff import hub
from homediff.encoders.autoencoders import Autoencoder, load_autoencoder
from homediff.encoders.text import TextEncoder
from homediff.models import XUT, load_hdm_state_dict
from homediff.models.backbone_file import is_backbone_file
from homediff.models.release import read_state_dict
from homediff.hdm_release import ReleaseParts, read_release
from homediff.pipeline import is_pipeline_folder
from homediff.training.config import TrainConfig


def init_source(config: TrainConfig) -> tuple[str, Path] | None:
    """None (no init), or the kind ("folder", "single": a homediff model.safetensors, "release")
    and the local path of ``init.from`` (a hub id is fetched through the hub's cache)."""
    if not config.init.from_:
        return None
    path = hub.resolve(config.init.from_, "init.from")
    if is_pipeline_folder(path):
        return "folder", path
    if is_backbone_file(path):
        return "single", path
    return "release", path


@functools.lru_cache(maxsize=1)
def _release(path: Path, text_encoder: str, vae: str, arch: str, options: str) -> ReleaseParts:
    return read_release(path, text_encoder=text_encoder, vae=vae, arch=arch or None,
                        text_encoder_options=json.loads(options))


def _release_parts(config: TrainConfig, path: Path) -> ReleaseParts:
    options = json.dumps(dataclasses.asdict(config.text_encoder.options), sort_keys=True)
    return _release(path, config.text_encoder.name, config.autoencoder.name, config.init.arch, options)


def init_text_encoder(config: TrainConfig) -> TextEncoder | None:
    source = init_source(config)
    if source is None or source[0] == "single":
        return None
    kind, path = source
    if kind == "folder":
        return TextEncoder.from_pretrained(path / "text_encoder",
                                           **dataclasses.asdict(config.text_encoder.options))
    return _release_parts(config, path).text_encoder


def init_autoencoder(config: TrainConfig) -> Autoencoder | None:
    source = init_source(config)
    if source is None or source[0] == "single":
        return None
    kind, path = source
    return load_autoencoder(path / "vae") if kind == "folder" else _release_parts(config, path).vae


def load_backbone(model: XUT, config: TrainConfig) -> XUT:
    """Copy the ``init.from`` backbone into ``model`` (built from the config), exactly. The
    released parts read for it are let go afterwards (its backbone would be a second copy)."""
    kind, path = init_source(config)
    if kind == "release":
        state = _release_parts(config, path).transformer.state_dict()
        _release.cache_clear()
    else:
        state = read_state_dict(path / "transformer" / "diffusion_pytorch_model.safetensors"
                                if kind == "folder" else path)
    with torch.no_grad():
        load_hdm_state_dict(model, state, f"init.from {config.init.from_}")
    return model
