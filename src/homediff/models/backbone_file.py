"""The backbone in one file, as a run writes it beside its pipeline folder (``RUN/model.safetensors``):
the XUT's weights, and its config as JSON in the file's metadata under ``homediff_config``. That
key is what tells it from a released HDM file, whose architecture is given separately."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from homediff.models.release import read_state_dict
from homediff.models.xut import XUT, XUTConfig

CONFIG_KEY = "homediff_config"


def save_backbone_file(path: str | Path, model: XUT) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path),
              {CONFIG_KEY: json.dumps(model.config.to_dict())})


def is_backbone_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file that carries a homediff backbone's config."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as file:
        return CONFIG_KEY in (file.metadata() or {})


def load_backbone_file(path: str | Path, device: torch.device | str = "cpu") -> XUT:
    """The backbone a ``save_backbone_file`` file holds, in eval mode."""
    with safe_open(str(path), framework="pt") as file:
        config = XUTConfig.from_dict(json.loads(file.metadata()[CONFIG_KEY]))
    model = XUT(config)
    model.load_state_dict(read_state_dict(path))
    return model.to(device).eval()
