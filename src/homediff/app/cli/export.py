"""``homediff export``: a pipeline folder in another program's format.

``--format hdm`` writes the original HDM's single file (hdm-spec §7.1), which its code loads with
the arch JSON and its ComfyUI node (HDM-ext) loads for an XUT-base backbone: the backbone under
``unet.model.``, the VAE under ``vae.`` with ``vae_mean``/``vae_std``, a Qwen3 text encoder under
``te.text_models.0.``. Beside it go the arch JSON (the original's ``config/arch`` format) under the
same name with ``.json``, and the VAE as a diffusers folder (``NAME-vae``) whose config holds the
latent statistics as ``latents_mean``/``latents_std``, which the original's trainer reads. Adapters
in the folder are fused into the backbone. Where the model differs from what the original runs at
inference (backbone, text encoder, its options, the VAE), a warning says so.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

#: What the original runs at inference (hdm-spec §5.2, §5.3, §6.4, §6.6).
RELEASE_TEXT_MODEL = {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
                      "vocab_size": 151936}
RELEASE_VAE_CHANNELS = ((128, 256, 512, 512), 4)
EQ_VAE_MEAN = (-3.865960634760459, -1.3353925720045965, 0.8353661802812418, 0.909888159310023)
EQ_VAE_STD = (10.036514488374861, 6.848430044716239, 7.213817552213277, 5.591315799887989)


def register(commands) -> None:
    exp = commands.add_parser("export", help="write a model in another program's format (the "
                                             "original HDM's single file)")
    exp.add_argument("model", type=Path, help="a saved pipeline folder (save_pretrained, or a "
                                              "training run's model/ folder)")
    exp.add_argument("out", type=Path, help="the .safetensors file to write; the arch JSON goes "
                                            "beside it with the same name and .json")
    exp.add_argument("--format", required=True, choices=("hdm",),
                     help="hdm: the original HDM single file, for its code and ComfyUI's HDM-ext")
    exp.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                     help="the weights' precision (default float16, as the original's files)")
    exp.add_argument("--no-text-encoder", action="store_true",
                     help="leave the text encoder (te.*) out, as the released file does")
    exp.add_argument("--overwrite", action="store_true", help="replace existing output files")
    exp.set_defaults(run=run_export)


def _outputs(out: Path, overwrite: bool) -> tuple[Path, Path]:
    """The paths of the arch JSON and the VAE folder beside ``out``, once none is in the way."""
    from homediff.errors import ConfigError, HomediffError

    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: the output must be a .safetensors file")
    arch, vae = out.with_suffix(".json"), out.with_name(f"{out.stem}-vae")
    taken = [p for p in (out, arch, vae) if p.exists()]
    if taken and not overwrite:
        raise HomediffError(f"{taken[0]} exists: pass --overwrite to replace it")
    return arch, vae


def _text_encoder_state(pipe, folder: Path):
    """The text encoder's float32 weights if the original can hold them (a Qwen3 model), else None."""
    import torch

    from homediff.encoders.text import TextEncoder

    encoder = pipe.text_encoder
    if encoder.model.config.model_type != "qwen3":
        return None
    if encoder.model.dtype != torch.float32:  # "auto" may have chosen bfloat16 when loading
        encoder = TextEncoder.from_pretrained(folder / "text_encoder", dtype="float32")
    return encoder.model.state_dict()


def _write_vae(autoencoder, folder: Path, dtype) -> None:
    """The VAE as a diffusers folder, its config holding the latent statistics (the pipeline's
    VAE is converted in place: the export is its last use)."""
    from homediff.atomic import replace_folder

    vae = autoencoder.vae.to(dtype)
    vae.register_to_config(latents_mean=autoencoder.mean.flatten().tolist(),
                           latents_std=autoencoder.std.flatten().tolist())
    staged = folder.with_name(f"{folder.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    vae.save_pretrained(str(staged))
    replace_folder(staged, folder)


def _differences(pipe, arch_name: str) -> list[str]:
    """Where the original, at inference, does otherwise than this pipeline."""
    from homediff.models.release import loads_in_hdm_ext

    warnings = []
    if not loads_in_hdm_ext(pipe.transformer.config):
        warnings.append("the backbone is not XUT-base: HDM-ext (ComfyUI) always builds XUT-base and "
                        f"will not load it; the original code loads it with {arch_name} as its arch")
    encoder, options = pipe.text_encoder, pipe.text_encoder.config
    config = encoder.model.config
    shape = {key: getattr(config, key, None) for key in RELEASE_TEXT_MODEL}
    if config.model_type != "qwen3":
        warnings.append(f"the text encoder is a {type(encoder.model).__name__}, not Qwen3: te.* is "
                        "left out, and the original, which encodes prompts with Qwen3-0.6B, "
                        "cannot drive this backbone")
    elif shape != RELEASE_TEXT_MODEL:
        sizes = ", ".join(f"{key} {value}" for key, value in shape.items())
        warnings.append(f"the text encoder is not Qwen3-0.6B ({sizes}): HDM-ext builds "
                        "Qwen/Qwen3-0.6B with its tokenizer and cannot load these te.* weights")
    if options.padding != "longest":
        warnings.append(f"homediff pads every prompt to {options.max_length} tokens; the original "
                        "pads to the longest prompt, so its images differ")
    if options.max_length < 512:
        warnings.append(f"homediff cuts prompts after {options.max_length} tokens; the original "
                        "does not, so longer prompts give other images there")
    if options.layer != -1:
        warnings.append(f"the text states are hidden layer {options.layer}; the original uses the "
                        "last (last_hidden_state), so its images differ")
    tokenizer = encoder.tokenizer
    if tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
        warnings.append("the tokenizer adds special tokens; the original's Qwen tokenizer adds "
                        "none, so its images differ")
    vae = pipe.vae.vae.config
    if (tuple(vae.block_out_channels), vae.latent_channels) != RELEASE_VAE_CHANNELS:
        warnings.append(f"the VAE (block_out_channels {list(vae.block_out_channels)}, "
                        f"{vae.latent_channels} latent channels) is not the SDXL VAE that the "
                        "original's code builds (KBlueLeaf/EQ-SDXL-VAE); it cannot load these vae.* "
                        "weights into it")
    stats = pipe.vae.mean.flatten().tolist(), pipe.vae.std.flatten().tolist()
    if any(len(s) != 4 or max(abs(a - b) for a, b in zip(s, eq)) > 1e-6
           for s, eq in zip(stats, (EQ_VAE_MEAN, EQ_VAE_STD))):
        warnings.append("the latent statistics differ from EQ-SDXL-VAE's, which HDM-ext (ComfyUI) "
                        "uses in place of the file's vae_mean/vae_std, so its images differ")
    return warnings


def run_export(args) -> int:
    from safetensors.torch import save_file

    from homediff.atomic import write_atomically
    from homediff.encoders.autoencoders import KLAutoencoder
    from homediff.errors import ConfigError
    from homediff.hdm_release import to_hdm_release
    from homediff.pipeline import HomeDiffPipeline
    from homediff.precision import DTYPES

    arch_path, vae_path = _outputs(args.out, args.overwrite)
    pipe = HomeDiffPipeline.from_pretrained(args.model)
    if not isinstance(pipe.vae, KLAutoencoder):
        raise ConfigError(f"{args.model}: its autoencoder is {type(pipe.vae).__name__}; the original "
                          "HDM runs on VAE latents, so only a model trained on a diffusers "
                          "AutoencoderKL's latents can be exported to it")
    if pipe.lora_scales:
        pipe.fuse_lora()
        print("fused into the backbone (the original has no LoRA): " + ", ".join(
            f"{name} at scale {scale:g}" for name, scale in pipe.lora_scales.items()))
    te_state = None if args.no_text_encoder else _text_encoder_state(pipe, args.model)
    try:
        tensors, arch = to_hdm_release(pipe.transformer, pipe.vae.vae.state_dict(), pipe.vae.mean,
                                       pipe.vae.std, te_state, DTYPES[args.dtype])
    except ConfigError as err:
        raise ConfigError(f"{args.model}: {err}") from err
    for warning in _differences(pipe, arch_path.name):
        print(f"warning: {warning}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out, lambda path: save_file(tensors, str(path)))
    write_atomically(arch_path, lambda path: path.write_text(json.dumps(arch, indent=1) + "\n"))
    _write_vae(pipe.vae, vae_path, DTYPES[args.dtype])
    print(args.out)
    print(arch_path)
    print(vae_path)
    return 0
