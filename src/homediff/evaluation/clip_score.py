"""CLIP score from a local CLIP model the user supplies; nothing is downloaded.

Score of an image and its caption: 100 · max(cos(image embedding, text embedding), 0), averaged over
the pairs (torchmetrics' CLIPScore). Images are prepared as CLIP prepares them: the short side
resized to the model's image size (bicubic, antialiased), the centre square cut out, and CLIP's
mean and standard deviation taken off; captions are cut to the model's context length.

``load_clip`` takes either

- a folder in Hugging Face transformers layout (``config.json`` of ``model_type`` "clip", the
  weights, and the tokenizer files), as the laion and openai CLIP repositories on the Hugging Face
  hub ship it; or
- an open_clip (OpenAI layout) state dict of a ViT CLIP, ``open_clip_pytorch_model.bin`` or
  ``open_clip_model.safetensors`` (or a folder holding one), converted to transformers' CLIPModel.
  The sizes are read from the weights' shapes; attention heads, activation and normalisation come
  from ``open_clip_config.json`` beside the file when it is there, else heads 64 wide, GELU and
  CLIP's normalisation (right for open_clip's ViT-B/32, B/16 and L/14 trained by laion; OpenAI's
  own weights need the config's ``quick_gelu``). The tokenizer (``vocab.json`` and ``merges.txt``)
  must lie beside the file, as it does in those hub repositories.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from homediff.errors import CheckpointError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
EXPECTED = ("a CLIP folder in Hugging Face layout (config.json, weights, tokenizer files) or an "
            "open_clip state dict (open_clip_pytorch_model.bin or open_clip_model.safetensors) "
            "with vocab.json and merges.txt beside it")

# open_clip names → transformers' CLIPModel names (a transformer layer's names follow below)
NAMES = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
         "positional_embedding": "text_model.embeddings.position_embedding.weight",
         "ln_final.weight": "text_model.final_layer_norm.weight",
         "ln_final.bias": "text_model.final_layer_norm.bias",
         "logit_scale": "logit_scale",
         "visual.class_embedding": "vision_model.embeddings.class_embedding",
         "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
         "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
         "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
         "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
         "visual.ln_post.weight": "vision_model.post_layernorm.weight",
         "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
PROJECTIONS = {"text_projection": "text_projection.weight",
               "visual.proj": "visual_projection.weight"}  # transposed
LAYER_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
NOT_WEIGHTS = {"attn_mask", "input_resolution", "context_length", "vocab_size"}  # OpenAI's extras
LAYER = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)")


class ClipScorer:
    """A transformers CLIPModel with its tokenizer; call it on images and captions."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD):
        self.model, self.tokenizer = model, tokenizer
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.size = model.config.vision_config.image_size
        self.context = model.config.text_config.max_position_embeddings

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [−1, 1] → CLIP's input (N, 3, S, S) (module docstring)."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        height, width = x.shape[-2:]
        scale = self.size / min(height, width)
        shape = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        x = F.interpolate(x, size=shape, mode="bicubic", antialias=True, align_corners=False)
        top, left = (shape[0] - self.size) // 2, (shape[1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str], batch_size: int = 32):
        """(N,) float64 scores 100 · max(cos, 0) of each image with its caption."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(images), batch_size):
            tokens = self.tokenizer(captions[start:start + batch_size], padding=True,
                                    truncation=True, max_length=self.context, return_tensors="pt")
            pixels = self.prepare(images[start:start + batch_size].to(device))
            result = self.model(input_ids=tokens["input_ids"].to(device),
                                attention_mask=tokens["attention_mask"].to(device),
                                pixel_values=pixels)
            cosine = F.cosine_similarity(result.image_embeds.double(), result.text_embeds.double())
            out.append(100 * cosine.clamp(min=0).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _tokenizer(folder: Path, source: Path):
    import transformers

    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
            or (folder / "tokenizer.json").is_file()):
        raise CheckpointError(f"{source}: no CLIP tokenizer in {folder}; put its vocab.json and "
                              "merges.txt (from the same CLIP repository) there")
    kind = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)
    return kind.from_pretrained(str(folder), local_files_only=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = (load_file(str(path)) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot read the CLIP weights ({err}); expected "
                              f"{EXPECTED}") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "visual.conv1.weight" not in {
            k.removeprefix("module.") for k in state}:
        raise CheckpointError(f"{path}: not the weights of an open_clip ViT CLIP (no "
                              f"visual.conv1.weight); expected {EXPECTED}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert_open_clip(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """An open_clip (OpenAI layout) state dict renamed to transformers' CLIPModel; ``source`` names
    the file in errors."""
    out, unknown = {}, []
    for key, value in state.items():
        layer = LAYER.fullmatch(key)
        if key in NAMES:
            out[NAMES[key]] = value
        elif key in PROJECTIONS:
            out[PROJECTIONS[key]] = value.T.contiguous()
        elif layer:
            vision, index, name, kind = layer.groups()
            prefix = f"{'vision' if vision else 'text'}_model.encoder.layers.{index}."
            if name == "attn.in_proj":
                for part, chunk in zip("qkv", value.chunk(3)):
                    out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk
            elif name in LAYER_NAMES:
                out[f"{prefix}{LAYER_NAMES[name]}.{kind}"] = value
            else:
                unknown.append(key)
        elif key not in NOT_WEIGHTS:
            unknown.append(key)
    first_layers = ("transformer.resblocks.0.mlp.c_fc.weight",
                    "visual.transformer.resblocks.0.mlp.c_fc.weight")
    missing = [key for key in (*NAMES, *PROJECTIONS, *first_layers) if key not in state]
    for problem, keys in (("weights an open_clip ViT CLIP does not have", unknown),
                          ("weights of an open_clip ViT CLIP missing", missing)):
        if keys:
            raise CheckpointError(f"{source}: {len(keys)} {problem}, e.g. "
                                  f"{', '.join(sorted(keys)[:3])}; expected {EXPECTED}")
    return out


def _config(state: dict[str, torch.Tensor], options: dict, tokenizer, source: Path):
    """transformers' CLIPConfig of converted weights: sizes from their shapes, heads and activation
    from ``options`` (open_clip_config.json's ``model_cfg``; module docstring)."""
    from transformers import CLIPConfig

    def tower(name: str, width: int, heads: int) -> dict:
        if heads < 1 or width % heads:
            raise CheckpointError(f"{source}: cannot tell the attention heads of its {width}-wide "
                                  f"{name} tower; put its open_clip_config.json beside it")
        layers = f"{name}_model.encoder.layers."
        depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(layers))
        return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                    intermediate_size=state[f"{layers}0.mlp.fc1.weight"].shape[0],
                    hidden_act="quick_gelu" if options.get("quick_gelu") else "gelu")

    def heads(width: int, head_width: int) -> int:
        return 0 if width % head_width else width // head_width

    vocab, text_width = state["text_model.embeddings.token_embedding.weight"].shape
    patches = state["vision_model.embeddings.patch_embedding.weight"]
    grid = round((state["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
    text_heads = options.get("text_cfg", {}).get("heads") or heads(text_width, 64)
    text = tower("text", text_width, text_heads) | dict(
        vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0])
    width = patches.shape[0]
    head_width = options.get("vision_cfg", {}).get("head_width", 64)
    vision = tower("vision", width, heads(width, head_width))
    vision |= dict(image_size=grid * patches.shape[-1], patch_size=patches.shape[-1])
    return CLIPConfig(text_config=text, vision_config=vision,
                      projection_dim=state["text_projection.weight"].shape[0])


def _load_folder(folder: Path):
    """(model, tokenizer, mean, std) of a folder in transformers layout."""
    from transformers import CLIPModel

    kind = _read_json(folder / "config.json").get("model_type")
    if kind != "clip":
        raise CheckpointError(f"{folder / 'config.json'}: model_type {kind!r}, not a CLIP model "
                              "('clip'); --clip takes " + EXPECTED)
    tokenizer = _tokenizer(folder, folder)
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: cannot load the CLIP model ({err})") from err
    options = _read_json(folder / "preprocessor_config.json")
    mean, std = options.get("image_mean", CLIP_MEAN), options.get("image_std", CLIP_STD)
    return model, tokenizer, mean, std


def _load_open_clip(path: Path):
    """(model, tokenizer, mean, std) of an open_clip state dict file."""
    from transformers import CLIPModel

    state = convert_open_clip(_load_state(path), path)
    tokenizer = _tokenizer(path.parent, path)
    options = _read_json(path.parent / "open_clip_config.json")
    if not options:
        logger.warning("%s: no open_clip_config.json beside it; assuming attention heads 64 wide, "
                       "GELU and CLIP's normalisation", path)
    model = CLIPModel(_config(state, options.get("model_cfg", {}), tokenizer, path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit a CLIP of their own shapes "
                              f"({' '.join(str(err).split())[:300]})") from err
    options = options.get("preprocess_cfg", {})
    return model, tokenizer, options.get("mean", CLIP_MEAN), options.get("std", CLIP_STD)


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """A ClipScorer of a local CLIP (module docstring), float32 in eval mode on ``device``; a
    missing or unsuitable file is a CheckpointError naming it and what was expected."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        model, tokenizer, mean, std = _load_folder(path)
    else:
        if path.is_dir():
            found = [path / name for name in OPEN_CLIP_FILES if (path / name).is_file()]
            if not found:
                raise CheckpointError(f"{path}: holds neither config.json nor "
                                      f"{' nor '.join(OPEN_CLIP_FILES)}; --clip takes {EXPECTED}")
            path = found[0]
        elif not path.is_file():
            raise CheckpointError(f"{path}: no such file or folder; --clip takes {EXPECTED}")
        model, tokenizer, mean, std = _load_open_clip(path)
    logger.info("loaded CLIP from %s", path)
    return ClipScorer(model.float().eval().requires_grad_(False).to(device), tokenizer, mean, std)
