"""``homediff generate``: images from prompts, written as PNGs with their settings in the metadata.

Image k of a run (counting over the prompts, then the images of each) is drawn with seed + k, so
any one of them is made again alone with ``--seed`` that number. Each PNG holds its settings twice:
``parameters``, the text A1111 and ComfyUI readers show ("Steps: 24, Sampler: euler, CFG scale: 3,
Seed: 7, Size: 64x64, …"), and ``homediff``, the same as JSON; a grid holds the list of its images'.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from pathlib import Path


def register(commands) -> None:
    gen = commands.add_parser("generate", help="generate images from prompts")
    gen.add_argument("prompt", nargs="?", help="the prompt (or give --prompt, repeatable, or --prompts)")
    gen.add_argument("--prompt", dest="more_prompts", action="append", default=[], metavar="PROMPT",
                     help="another prompt; repeatable")
    gen.add_argument("--prompts", type=Path, help="a text file of prompts, one per line")
    gen.add_argument("--model", required=True,
                     help="a saved pipeline folder, a released HDM checkpoint file, or a hub id of "
                          "either (owner/repo, owner/repo/file.safetensors)")
    gen.add_argument("--out", required=True, type=Path,
                     help="a .png file (several images: NAME-0.png … and NAME-grid.png), or a folder "
                          "(images numbered after those already there)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing files at --out")
    gen.add_argument("--force", action="store_true",
                     help="generate beyond the limits on pixels, images and steps")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--steps", type=int, default=16, help="sampling steps (default 16)")
    gen.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default 3; 1 = none)")
    gen.add_argument("--seed", type=int, help="random seed (default: a new one, printed)")
    gen.add_argument("--width", type=int, help="image width in pixels (default: the model's size)")
    gen.add_argument("--height", type=int, help="image height in pixels")
    gen.add_argument("--num", type=int, default=1, help="images per prompt (seeds seed, seed + 1, …)")
    gen.add_argument("--batch-size", type=int, default=1,
                     help="images drawn at once (default 1; larger is faster on a GPU and gives the "
                          "same images up to rounding)")
    gen.add_argument("--zoom", type=float, default=1.0, help="camera zoom (> 1 zooms in)")
    gen.add_argument("--x-shift", type=float, default=0.0, help="camera shift right (+) or left (-)")
    gen.add_argument("--y-shift", type=float, default=0.0, help="camera shift down (+) or up (-)")
    gen.add_argument("--tread-gamma", type=float, nargs=2, default=(0.0, 0.0), metavar=("C", "U"),
                     help="routing rates of the conditional and unconditional branch (0 = none)")
    gen.add_argument("--sampler", default="euler", help="euler (default) or heun")
    gen.add_argument("--shift", type=float, default=1.0, help="time-grid shift (1 = uniform)")
    gen.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:SCALE]",
                     help="apply a LoRA adapter file at SCALE (default 1); repeatable")
    gen.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="the transformer's precision (default auto: bfloat16 where this device "
                          "runs it measurably faster, else float32)")
    release = gen.add_argument_group("released HDM checkpoints (when --model is a file)")
    release.add_argument("--text-encoder", help="folder or hub id (default Qwen/Qwen3-0.6B)")
    release.add_argument("--vae", help="VAE folder or hub id (default KBlueLeaf/EQ-SDXL-VAE)")
    release.add_argument("--arch", help="the checkpoint's HDM arch JSON (default XUT-base)")
    gen.set_defaults(run=run_generate)


def lora_spec(text: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:SCALE``."""
    path, _, scale = text.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def load_pipeline(args):
    """The pipeline ``--model`` names (a folder, or a released file with its text encoder and
    VAE), with the ``--lora`` adapters, on ``--device`` in ``--dtype``; ``homediff ui`` uses it too."""
    from homediff import hub
    from homediff.pipeline import RELEASE_TEXT_ENCODER, HomeDiffPipeline, is_pipeline_folder
    from homediff.precision import resolve_device

    model = hub.resolve(args.model, "--model")
    if is_pipeline_folder(model):
        pipe = HomeDiffPipeline.from_pretrained(model)
    else:
        pipe = HomeDiffPipeline.from_hdm_release(
            model, text_encoder=args.text_encoder or RELEASE_TEXT_ENCODER, vae=args.vae, arch=args.arch)
    for path, scale in args.lora:
        pipe.load_lora_weights(path, scale=scale)
    pipe.to(device=resolve_device(args.device))
    pipe.transformer.to(pipe.sampling_dtype(args.dtype))  # the autoencoder keeps float32
    return pipe


#: Without --force: what a single run generates at most, images counted over all its prompts (a
#: typo such as --num 100000000 or --width 65536 would otherwise run for days or allocate tens of
#: GB before anything else fails).
LIMITS = {"pixels": 4096 * 4096, "images": 256, "steps": 1000}


def _check_limits(args) -> None:
    from homediff.errors import ConfigError

    for name, value in (("--steps", args.steps), ("--num", args.num), ("--width", args.width),
                        ("--height", args.height), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if args.force:
        return
    pixels = (args.width or 1024) * (args.height or 1024)
    prompts = len(args.prompts)
    images = f"images ({prompts} prompt{'s' * (prompts != 1)} × --num {args.num})"
    for what, value, limit in (("pixels per image", pixels, LIMITS["pixels"]),
                               (images, prompts * args.num, LIMITS["images"]),
                               ("sampling steps", args.steps, LIMITS["steps"])):
        if value > limit:
            raise ConfigError(f"{value:,} {what} is over the limit of {limit:,}: check the value, "
                              "or pass --force")


def _check_memory(pipe, args) -> None:
    """Refuse a request whose estimated memory exceeds what is free (unless --force)."""
    from homediff.errors import ConfigError
    from homediff.precision import available_memory

    height, width = args.height or pipe.sample_size, args.width or pipe.sample_size
    batch = min(args.batch_size, args.num)
    need, free = pipe.memory_estimate(height, width, batch, args.cfg), available_memory(pipe.device)
    if need > free and not args.force:
        raise ConfigError(f"{batch} image(s) of {width}x{height} at once need about "
                          f"{need / 2**30:.1f} GiB beyond the weights and {free / 2**30:.1f} GiB is "
                          f"free on {pipe.device}: ask for a smaller --batch-size or smaller "
                          "images, or pass --force")


def _paths(out: Path, count: int, overwrite: bool) -> tuple[list[Path], Path | None]:
    """Image paths and, for several images, the grid's path. In a folder, images are numbered
    after the highest number already there (and the grid with them); a named file that exists
    is an error without ``overwrite``."""
    from homediff.errors import HomediffError

    if out.suffix.lower() == ".png":
        images = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(count)]
        grid = out.with_name(f"{out.stem}-grid.png") if count > 1 else None
        taken = [p for p in [*images, grid] if p is not None and p.exists()]
        if taken and not overwrite:
            raise HomediffError(f"{taken[0]} exists: pass --overwrite to replace it, or give a folder "
                                "as --out to number new images after the old ones")
        return images, grid
    used = [int(p.stem) for p in out.glob("*.png") if p.stem.isdigit()] if out.is_dir() else []
    first = 0 if overwrite or not used else max(used) + 1
    images = [out / f"{i:03d}.png" for i in range(first, first + count)]
    grid = out / f"grid-{first:03d}.png" if count > 1 else None
    return images, grid


def prompts_of(args) -> list[str]:
    """The prompts of a request: the positional one, each ``--prompt``, the lines of ``--prompts``."""
    from homediff.errors import ConfigError

    prompts = ([args.prompt] if args.prompt is not None else []) + list(args.more_prompts)
    if args.prompts is not None:
        try:
            lines = args.prompts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{args.prompts}: cannot read the prompts ({err})") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give one, or --prompt (repeatable), or --prompts FILE")
    return prompts


def draw(pipe, args, seed: int):
    """The images of a request (``args`` as parsed, ``args.prompts`` the prompts), each with its
    record of settings, yielded as they are made. Image k is drawn from its own generator seeded
    seed + k, in batches of ``--batch-size``, so it is the image ``--seed`` seed + k makes alone.
    ``homediff generate`` and ``homediff ui`` both draw through here, so the same settings and
    seed give the same image."""
    import torch

    settings = {"negative_prompt": args.negative, "num_inference_steps": args.steps,
                "guidance_scale": args.cfg, "height": args.height or pipe.sample_size,
                "width": args.width or pipe.sample_size,
                "camera": {"zoom": args.zoom, "x_shift": args.x_shift, "y_shift": args.y_shift},
                "tread_gamma": list(args.tread_gamma), "sampler": args.sampler, "shift": args.shift}
    batch_size = getattr(args, "batch_size", 1)
    index = 0
    for prompt in args.prompts:
        for start in range(0, args.num, batch_size):
            seeds = [seed + index + i for i in range(min(batch_size, args.num - start))]
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            drawn = pipe(prompt, num_images_per_prompt=len(seeds), generator=generators, **settings).images
            for image, image_seed in zip(drawn, seeds, strict=True):
                yield image, {"prompt": prompt, **settings, "seed": image_seed, "index": index,
                              "lora": [[str(path), scale] for path, scale in args.lora],
                              "model": str(args.model), "size": list(image.size)}
                index += 1


def sample(pipe, args, seed: int):
    """The images of a request (see ``draw``) all at once, and their records."""
    pairs = list(draw(pipe, args, seed))
    return [image for image, _ in pairs], [record for _, record in pairs]


def parameters_text(record: dict) -> str:
    """The settings as A1111 writes them under ``parameters`` (what A1111 and ComfyUI show)."""
    camera, gamma = record["camera"], record["tread_gamma"]
    fields = {"Steps": record["num_inference_steps"], "Sampler": record["sampler"],
              "CFG scale": f"{record['guidance_scale']:g}", "Seed": record["seed"],
              "Size": "x".join(map(str, record["size"])), "Model": Path(record["model"]).name,
              "Camera": f"zoom {camera['zoom']:g}, x {camera['x_shift']:g}, y {camera['y_shift']:g}",
              "Routing gamma": f"{gamma[0]:g}/{gamma[1]:g}", "Schedule shift": f"{record['shift']:g}"}
    fields |= {"Lora": ", ".join(f"{Path(p).stem}:{s:g}" for p, s in record["lora"])} if record["lora"] else {}
    lines = [record["prompt"]]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_quoted(str(value))}" for key, value in fields.items()))
    return "\n".join(lines)


def _quoted(value: str) -> str:
    """A value as A1111 writes it: as a JSON string where it holds a comma, colon or line break
    (its reader splits the settings at commas and unquotes a value in double quotes), and here also
    where a double quote or surrounding space would otherwise be misread."""
    if any(c in value for c in ',:\n"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def save_png(image, path: Path, record: dict) -> None:
    """``image`` as a PNG whose metadata holds its settings: ``parameters`` (A1111's text) and
    ``homediff`` (JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(record))
    info.add_text("homediff", json.dumps(record))
    image.save(path, pnginfo=info)


class _Written(Sequence):
    """PNG files as a sequence of images, each opened when asked for: a grid made from it holds
    one image at a time besides itself."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        image = Image.open(self.paths[index])
        image.load()  # reads the pixels and closes the file
        return image


def save_grid(images, path: Path, records: list[dict]) -> None:
    """The images (all the same size) as one grid PNG; its metadata lists every image's settings."""
    from PIL.PngImagePlugin import PngInfo

    from homediff.figures import image_grid

    info = PngInfo()
    info.add_text("parameters", "\n\n".join(parameters_text(r) for r in records))
    info.add_text("homediff", json.dumps({"grid": records}))
    image_grid(images).save(path, pnginfo=info)


def run_generate(args) -> int:
    from homediff.diffusion.samplers import get_sampler
    from homediff.precision import resolve_device

    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    args.prompts = prompts_of(args)  # every argument is checked before the model loads
    _check_limits(args)
    get_sampler(args.sampler)
    resolve_device(args.device)
    paths, grid_path = _paths(args.out, len(args.prompts) * args.num, args.overwrite)
    pipe = load_pipeline(args)
    _check_memory(pipe, args)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    records = []
    for path, (image, record) in zip(paths, draw(pipe, args, seed), strict=True):
        save_png(image, path, record)  # each image is written as soon as it is made
        records.append(record)
        print(path, flush=True)
    if grid_path is not None:
        save_grid(_Written(paths), grid_path, records)
        print(grid_path)
    print(f"seed {seed}")
    return 0
