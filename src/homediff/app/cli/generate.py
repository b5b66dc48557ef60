"""``homediff generate``: images from a prompt, written as PNGs with their settings in the metadata."""

from __future__ import annotations

import json
import secrets
from pathlib import Path


def register(commands) -> None:
    gen = commands.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, type=Path,
                     help="a saved pipeline folder, or a released HDM checkpoint file")
    gen.add_argument("--out", required=True, type=Path,
                     help="a .png file (several images: NAME-0.png … and NAME-grid.png), or a folder")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--steps", type=int, default=16, help="sampling steps (default 16)")
    gen.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default 3; 1 = none)")
    gen.add_argument("--seed", type=int, help="random seed (default: a new one, printed)")
    gen.add_argument("--width", type=int, help="image width in pixels (default: the model's size)")
    gen.add_argument("--height", type=int, help="image height in pixels")
    gen.add_argument("--num", type=int, default=1, help="number of images")
    gen.add_argument("--zoom", type=float, default=1.0, help="camera zoom (> 1 zooms in)")
    gen.add_argument("--x-shift", type=float, default=0.0, help="camera shift right (+) or left (-)")
    gen.add_argument("--y-shift", type=float, default=0.0, help="camera shift down (+) or up (-)")
    gen.add_argument("--tread-gamma", type=float, nargs=2, default=(0.0, 0.0), metavar=("C", "U"),
                     help="routing rates of the conditional and unconditional branch (0 = none)")
    gen.add_argument("--sampler", default="euler", help="euler (default) or heun")
    gen.add_argument("--shift", type=float, default=1.0, help="time-grid shift (1 = uniform)")
    gen.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="the transformer's precision (default auto: bfloat16 where this device "
                          "runs it measurably faster, else float32)")
    release = gen.add_argument_group("released HDM checkpoints (when --model is a file)")
    release.add_argument("--text-encoder", help="folder or hub id (default Qwen/Qwen3-0.6B)")
    release.add_argument("--vae", help="VAE folder or hub id (default KBlueLeaf/EQ-SDXL-VAE)")
    release.add_argument("--arch", help="the checkpoint's HDM arch JSON (default XUT-base)")
    gen.set_defaults(run=run_generate)


def _pipeline(args):
    import torch

    from homediff.pipeline import RELEASE_TEXT_ENCODER, RELEASE_VAE, HomeDiffPipeline

    if args.model.is_file():
        pipe = HomeDiffPipeline.from_hdm_release(
            args.model, text_encoder=args.text_encoder or RELEASE_TEXT_ENCODER,
            vae=args.vae or RELEASE_VAE, arch=args.arch)
    else:
        pipe = HomeDiffPipeline.from_pretrained(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device=device)
    pipe.transformer.to(pipe.sampling_dtype(args.dtype))  # the autoencoder keeps float32
    return pipe


def _paths(out: Path, count: int) -> tuple[list[Path], Path | None]:
    """Image paths and, for several images, the grid's path."""
    if out.suffix.lower() == ".png":
        if count == 1:
            return [out], None
        images = [out.with_name(f"{out.stem}-{i}.png") for i in range(count)]
        return images, out.with_name(f"{out.stem}-grid.png")
    return [out / f"{i:03d}.png" for i in range(count)], (out / "grid.png" if count > 1 else None)


def run_generate(args) -> int:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from homediff.figures import image_grid

    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    pipe = _pipeline(args)
    settings = {"negative_prompt": args.negative, "num_inference_steps": args.steps,
                "guidance_scale": args.cfg, "height": args.height, "width": args.width,
                "camera": {"zoom": args.zoom, "x_shift": args.x_shift, "y_shift": args.y_shift},
                "tread_gamma": list(args.tread_gamma), "sampler": args.sampler, "shift": args.shift}
    images = pipe(args.prompt, num_images_per_prompt=args.num,
                  generator=torch.Generator().manual_seed(seed), **settings).images
    record = {"prompt": args.prompt, **settings, "seed": seed, "num_images": args.num,
              "model": str(args.model), "size": list(images[0].size)}
    paths, grid_path = _paths(args.out, len(images))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for index, (image, path) in enumerate(zip(images, paths, strict=True)):
        info = PngInfo()
        info.add_text("prompt", args.prompt)
        info.add_text("homediff", json.dumps({**record, "index": index}))
        image.save(path, pnginfo=info)
        print(path)
    if grid_path is not None:
        image_grid(images).save(grid_path)
        print(grid_path)
    print(f"seed {seed}")
    return 0
