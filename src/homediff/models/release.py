"""The original HDM checkpoints: loading them (released single files, Lightning checkpoints, bare
dicts) and writing a homediff model in the released single file's layout (``to_hdm_release``).

Backbone keys come bare or under the prefixes ``unet.model.`` (single-file release and Lightning
checkpoints) or ``model.`` (a diffusers transformer folder). The VAE (``vae.*``, ``vae_mean``,
``vae_std``) and the text encoder (``te.*``) are skipped here: other components load them. A file
with LyCORIS tensors (``lycoris_model.*``) is refused with a message that names its kind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from homediff.errors import CheckpointError, ConfigError
from homediff.models import lora
from homediff.models.xut import XUT, XUTConfig

logger = logging.getLogger(__name__)

BACKBONE_PREFIXES = ("unet.model.", "model.", "")
OTHER_COMPONENTS = ("vae.", "te.", "vae_mean", "vae_std")
# A function of the width only, recomputed in float32 (released files hold a float16 copy).
DERIVED_BUFFERS = ("time_emb.freqs",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (its ``state_dict`` if it has one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the readers raise many types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


LYCORIS_KINDS = {"lora_down": "LoCon", "hada_w1_a": "LoHa", "lokr_w1": "LoKr"}


def refuse_lycoris(state: dict[str, torch.Tensor], source: str) -> None:
    """A file with LyCORIS tensors (``lycoris_model.*``) is refused, naming what it holds: using
    the backbone without them would silently give the base model's images."""
    keys = [k for k in state if k.startswith("lycoris_model.")]
    if not keys:
        return
    kinds = sorted({kind for k in keys for part, kind in LYCORIS_KINDS.items() if part in k}) or ["unknown"]
    raise CheckpointError(f"{source} holds a LyCORIS fine-tune ({', '.join(kinds)}: {len(keys)} tensors "
                          "under lycoris_model.*), which homediff does not apply; merge it into the "
                          "backbone with the LyCORIS tools first (without it, the images would be the "
                          "base model's)")


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str], source: str) -> dict:
    """The backbone's tensors under their bare names, after dropping other components' keys."""
    refuse_lycoris(state, source)
    skipped = [k for k in state if k.startswith(OTHER_COMPONENTS)]
    if skipped:
        logger.info("%s: ignoring %d tensors of other components (vae.*, te.*, vae_mean, vae_std)",
                    source, len(skipped))
    own = {k: v for k, v in state.items() if not k.startswith(OTHER_COMPONENTS)}

    def matches(prefix: str) -> int:
        return sum(k.startswith(prefix) and k[len(prefix):] in expected for k in own)

    prefix = max(BACKBONE_PREFIXES, key=matches)
    if matches(prefix) == 0:
        probe = next((k for k in own if k.endswith("in_patch.proj.weight")), None)
        found = f"keys carry the unknown prefix {probe[:-len('in_patch.proj.weight')]!r}; " if probe else ""
        raise CheckpointError(
            f"{source}: no XUT backbone weights found: {found}expected bare names or the prefixes "
            f"'unet.model.' or 'model.' (e.g. 'unet.model.in_patch.proj.weight'); "
            f"first keys: {', '.join(sorted(own)[:5])}")
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in own.items()}


def _list(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_hdm_state_dict(model: XUT, state: dict[str, torch.Tensor], source: str = "state dict") -> XUT:
    """Copy an original-format state dict into ``model``, or fail naming every mismatch."""
    target = model.state_dict()
    weights = _strip_prefix(state, set(target), source)
    missing = set(target) - set(weights)
    unexpected = set(weights) - set(target)
    wrong = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(target[k].shape)}"
             for k in sorted(set(weights) & set(target)) if weights[k].shape != target[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {'; '.join(wrong[:12])}")
    if problems:
        raise CheckpointError(f"{source} does not fit this XUT config:\n  " + "\n  ".join(problems))
    for name in DERIVED_BUFFERS:
        weights[name] = target[name]
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in weights.items()})
    return model


def arch_config(arch) -> XUTConfig:
    """An ``XUTConfig`` from an original arch JSON (dict, file, or metadata wrapping it), a config,
    or None (the released XUT-base)."""
    if arch is None:
        return XUTConfig(rope_init="hdm")
    if isinstance(arch, XUTConfig):
        return arch
    if isinstance(arch, (str, Path)):
        try:
            arch = json.loads(Path(arch).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{arch}: cannot read the arch JSON ({err})") from err
    if isinstance(arch.get("config"), dict):  # a metadata file that wraps the arch config
        arch = arch["config"]
    return XUTConfig.from_hdm_config(arch)


def load_hdm_checkpoint(path: str | Path, arch, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> XUT:
    """An XUT holding a released HDM checkpoint's backbone weights, in eval mode.

    path: .safetensors, or a torch/Lightning checkpoint; float16, bfloat16 or float32.
    arch: the original arch JSON (dict or file path) or an ``XUTConfig``.
    """
    model = XUT(arch_config(arch))
    load_hdm_state_dict(model, read_state_dict(path), source=str(path))
    return model.to(device=device, dtype=dtype).eval()


def loads_in_hdm_ext(config: XUTConfig) -> bool:
    """Whether ComfyUI's HDM-ext can load this backbone: it ignores the arch JSON and always builds
    XUT-base (hdm-spec §2.1, §6.6), so every tensor's name and shape must be XUT-base's."""
    with torch.device("meta"):
        own, base = (XUT(c).state_dict() for c in (config, XUTConfig.preset("xut-base")))
    return {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in base.items()}


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
