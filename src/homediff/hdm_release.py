"""The released HDM single file, read and written: its layout (hdm-spec §7.1) in one place.

One ``.safetensors`` file holds the backbone under ``unet.model.`` (``models.release`` maps its
tensor names), usually the VAE's weights under ``vae.`` with the latent statistics ``vae_mean`` and
``vae_std``, and sometimes the text encoder's under ``te.text_models.0.``; the architecture is given
apart (an arch JSON, default XUT-base). The original's diffusers-layout folder (``transformer/``
with its arch as ``config.json``, ``vae/``) reads too. ``read_release`` gives the parts a pipeline
is made of; ``to_hdm_release`` writes a homediff model in the file's layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch

from homediff import hub
from homediff.encoders.autoencoders import KLAutoencoder
from homediff.encoders.text import TextEncoder
from homediff.errors import CheckpointError, ConfigError
from homediff.models import XUT, load_hdm_state_dict, lora
from homediff.models.backbone_file import is_backbone_file
from homediff.models.release import DERIVED_BUFFERS, arch_config, read_state_dict

logger = logging.getLogger(__name__)

RELEASE_TEXT_ENCODER = "Qwen/Qwen3-0.6B"
RELEASE_VAE = "KBlueLeaf/EQ-SDXL-VAE"


class ReleaseParts(NamedTuple):
    transformer: XUT
    text_encoder: TextEncoder
    vae: KLAutoencoder


def read_release(checkpoint: str | Path, text_encoder: str = RELEASE_TEXT_ENCODER,
                 vae: str | None = None, *, arch=None,
                 text_encoder_options: dict | None = None) -> ReleaseParts:
    """The parts of a released HDM model: a single file (or a Lightning checkpoint), a folder or
    hub repository holding one such file, or the original's diffusers-layout folder; hub ids as
    ``owner/repo`` or ``owner/repo/file.safetensors``.

    A single file's ``vae.*`` weights and latent statistics are used when it has them; ``vae``
    then only supplies the VAE's config (default the release's EQ-SDXL VAE). ``text_encoder`` is a
    folder or hub id (its weights are replaced by the file's ``te.*`` tensors if it has them).
    ``arch``: the backbone's HDM arch JSON (dict or path) or an ``XUTConfig``; default the JSON
    beside the file (``NAME.json``, as ``homediff export`` writes it), else the released XUT-base.
    """
    source = hub.resolve(checkpoint, "HDM checkpoint")
    if source.is_dir() and (source / "transformer").is_dir():
        return _read_release_folder(source, text_encoder, vae, arch, text_encoder_options)
    if source.is_dir():
        files = sorted(source.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{checkpoint}: neither a homediff pipeline folder (no "
                                  "model_index.json) nor a folder holding a released HDM file "
                                  "(.safetensors)")
        if len(files) > 1:
            raise CheckpointError(f"{checkpoint}: {len(files)} .safetensors files in the folder: "
                                  "name the one to load (a path, or owner/repo/FILE)")
        source = files[0]
    if is_backbone_file(source):
        raise CheckpointError(f"{source}: a homediff run's single file, not a released HDM file: "
                              "load it with HomeDiffPipeline.from_backbone_file")
    beside = source.with_suffix(".json")
    if arch is None and beside.is_file():
        arch = beside
        logger.info("%s: arch from %s", source, beside)
    state = read_state_dict(source)
    transformer = load_hdm_state_dict(XUT(arch_config(arch)), state, str(source)).eval()
    autoencoder = _release_vae(state, vae or RELEASE_VAE, source)
    encoder = _release_text_encoder(text_encoder, text_encoder_options)
    te_state = _with_prefix(state, "te.text_models.0.")
    if te_state:
        encoder.load_weights(te_state, str(source))
    return ReleaseParts(transformer, encoder, autoencoder)


def _release_vae(state: dict, vae: str, source: Path) -> KLAutoencoder:
    """The file's VAE weights and latent statistics where it has them, else ``vae``'s."""
    vae_state = _with_prefix(state, "vae.")
    stats = {}
    if "vae_mean" in state and "vae_std" in state:
        stats = {"mean": state["vae_mean"].float(), "std": state["vae_std"].float()}
    logger.info("%s: VAE weights from %s, latent statistics from %s", source,
                "the checkpoint" if vae_state else vae, "the checkpoint" if stats else vae)
    if vae_state:
        return KLAutoencoder.from_weights(vae, vae_state, **stats).eval()
    return KLAutoencoder.from_pretrained(vae, **stats).eval()


def _read_release_folder(folder: Path, text_encoder, vae, arch, text_encoder_options) -> ReleaseParts:
    """The original's diffusers layout: transformer/ (``config.json`` = the XUDiT arguments,
    weights under ``model.``) and vae/; the text encoder is named separately."""
    weights = sorted((folder / "transformer").glob("*.safetensors"))
    if len(weights) != 1:
        raise CheckpointError(f"{folder}/transformer: expected one .safetensors file, found "
                              f"{len(weights)}")
    if arch is None:
        try:
            config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder}/transformer/config.json: cannot read ({err})") from err
        arch = {k: v for k, v in config.items() if not k.startswith("_")}  # diffusers' own keys
    transformer = load_hdm_state_dict(XUT(arch_config(arch)), read_state_dict(weights[0]),
                                      str(weights[0])).eval()
    vae = vae or (folder / "vae" if (folder / "vae").is_dir() else RELEASE_VAE)
    return ReleaseParts(transformer, _release_text_encoder(text_encoder, text_encoder_options),
                        KLAutoencoder.from_pretrained(vae).eval())


def _release_text_encoder(name: str, options: dict | None) -> TextEncoder:
    """The text encoder as the original's inference runs it: no padding beyond the longest prompt."""
    return TextEncoder.from_pretrained(name, **{"padding": "longest", "max_length": 512, **(options or {})})


def _with_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def to_hdm_release(backbone: XUT, vae: dict[str, torch.Tensor], vae_mean: torch.Tensor,
                   vae_std: torch.Tensor, text_encoder: dict[str, torch.Tensor] | None = None,
                   dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of an original HDM single file (hdm-spec §7.1) and its arch JSON.

    The backbone goes under ``unet.model.``, a diffusers AutoencoderKL state dict under ``vae.``
    with the latent statistics ``vae_mean``/``vae_std`` as (1, C, 1, 1), and a Qwen3 text
    encoder's state dict, if given, under ``te.text_models.0.``. Weights are cast to ``dtype``
    (the original's converter writes float16); the statistics and the ``time_emb.freqs`` table
    stay float32. Adapters must be fused into the backbone first: the original has no LoRA.
    """
    arch = backbone.config.to_hdm_config()
    if not backbone.config.aspect_embedding:
        raise ConfigError("the backbone has no aspect embedding (model.aspect_embedding = false): the "
                          "original code passes the aspect ratio to every forward pass, which fails "
                          "without it (addon_info_embs_dim null); only a model trained with the "
                          "aspect embedding can be exported")
    state = lora.base_state(backbone)
    if len(state) != len(backbone.state_dict()) and not lora.is_fused(backbone):
        raise ConfigError("the backbone holds LoRA adapters that are not fused: fuse them first "
                          "(the original HDM code cannot apply them)")

    def cast(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().cpu()
        return (value.to(dtype) if value.is_floating_point() else value).contiguous()

    tensors = {f"unet.model.{k}": cast(v) for k, v in state.items()}
    for name in DERIVED_BUFFERS:
        tensors[f"unet.model.{name}"] = state[name].detach().cpu().float().contiguous()
    tensors |= {f"vae.{k}": cast(v) for k, v in vae.items()}
    for name, value in (("vae_mean", vae_mean), ("vae_std", vae_std)):
        tensors[name] = value.detach().cpu().float().reshape(1, -1, 1, 1).contiguous()
    if text_encoder is not None:
        tensors |= {f"te.text_models.0.{k}": cast(v) for k, v in text_encoder.items()}
    return tensors, arch
