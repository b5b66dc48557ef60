"""The options that load a model, declared once for ``homediff generate`` and ``homediff ui``."""

from __future__ import annotations

from pathlib import Path

MODEL_HELP = ("a saved pipeline folder, a run's model.safetensors (with the model/ folder beside "
              "it), a training checkpoint folder (RUN/checkpoints/step-N), a released HDM checkpoint "
              "file, or a hub id of a folder or release (owner/repo, owner/repo/file.safetensors)")
LORA_HELP = "apply a LoRA adapter file at SCALE (default 1); repeatable"


def add_model_arguments(parser, model_help: str = MODEL_HELP, lora_help: str = LORA_HELP) -> None:
    """--model, --lora, --device, --dtype and the released-checkpoint group (--text-encoder, --vae,
    --arch), which ``generate.load_pipeline`` reads."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:SCALE]",
                        help=lora_help)
    parser.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="the transformer's precision (default auto: bfloat16 where this device "
                             "runs it measurably faster, else float32)")
    release = parser.add_argument_group("released HDM checkpoints (when --model is a file)")
    release.add_argument("--text-encoder", help="folder or hub id (default Qwen/Qwen3-0.6B)")
    release.add_argument("--vae", help="VAE folder or hub id (default KBlueLeaf/EQ-SDXL-VAE)")
    release.add_argument("--arch", help="the checkpoint's HDM arch JSON (default XUT-base)")


def lora_spec(text: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:SCALE``."""
    path, _, scale = text.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0
