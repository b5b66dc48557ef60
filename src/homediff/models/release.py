"""The original HDM backbone's tensors: loading them from released single files, Lightning
checkpoints and bare dicts into an XUT, and the arch JSON. The released file as a whole (the VAE and
text encoder beside the backbone, reading and writing it) is ``homediff.hdm_release``'s.

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

from homediff.errors import CheckpointError
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
