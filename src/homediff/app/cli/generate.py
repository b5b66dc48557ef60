"""``homediff generate``: images from prompts, written as PNGs with their settings in the metadata.

The arguments become one ``homediff.generation.GenerationRequest`` (``request_of``), drawn as the web
page and Python draw it: image k of a run (counting over the prompts, then the images of each) is
drawn with seed + k, so any one of them is made again alone with ``--seed`` that number. Here live
what only the command has: the limits (``--force``), the output paths and loading the model.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

from homediff.app.cli.model_options import add_model_arguments
from homediff.errors import ConfigError
from homediff.generation import GenerationRequest, draw, save_grid, save_png


def register(commands) -> None:
    gen = commands.add_parser("generate", help="generate images from prompts")
    gen.add_argument("prompt", nargs="?", help="the prompt (or give --prompt, repeatable, or --prompts)")
    gen.add_argument("--prompt", dest="more_prompts", action="append", default=[], metavar="PROMPT",
                     help="another prompt; repeatable")
    gen.add_argument("--prompts", type=Path, help="a text file of prompts, one per line")
    add_model_arguments(gen)
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
    gen.set_defaults(run=run_generate)


def load_pipeline(args):
    """The pipeline ``--model`` names (a folder; a run's single file with the encoders of the
    folder beside it; a training checkpoint folder, its EMA weights with the encoders its config
    names; or a released file with its text encoder and VAE), with the ``--lora``
    adapters, on ``--device`` in ``--dtype``; ``homediff ui`` uses it too."""
    from homediff import hub
    from homediff.models.backbone_file import is_backbone_file
    from homediff.training.checkpoint import is_checkpoint_folder
    from homediff.training.export import pipeline_from_checkpoint
    from homediff.hdm_release import RELEASE_TEXT_ENCODER
    from homediff.pipeline import HomeDiffPipeline, is_pipeline_folder
    from homediff.precision import resolve_device

    model = hub.resolve(args.model, "--model")
    if is_pipeline_folder(model):
        pipe = HomeDiffPipeline.from_pretrained(model)
    elif is_backbone_file(model):
        pipe = HomeDiffPipeline.from_backbone_file(model)
    elif is_checkpoint_folder(model):
        pipe = pipeline_from_checkpoint(model)
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


def _check_limits(request, force: bool) -> None:
    """Refuse counts and sizes below 1, and (unless --force) a request over ``LIMITS``."""
    request.check()
    if force:
        return
    pixels = (request.width or 1024) * (request.height or 1024)
    prompts = len(request.prompts)
    images = f"images ({prompts} prompt{'s' * (prompts != 1)} × --num {request.num})"
    for what, value, limit in (("pixels per image", pixels, LIMITS["pixels"]),
                               (images, prompts * request.num, LIMITS["images"]),
                               ("sampling steps", request.steps, LIMITS["steps"])):
        if value > limit:
            raise ConfigError(f"{value:,} {what} is over the limit of {limit:,}: check the value, "
                              "or pass --force")


def _check_memory(pipe, request, force: bool) -> None:
    """Refuse a request whose estimated memory exceeds what is free (unless --force)."""
    from homediff.precision import available_memory

    height, width = request.height or pipe.sample_size, request.width or pipe.sample_size
    batch = min(request.batch_size, request.num)
    need, free = pipe.memory_estimate(height, width, batch, request.cfg), available_memory(pipe.device)
    if need > free and not force:
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


def request_of(args, seed: int) -> GenerationRequest:
    """The request the parsed arguments make, drawn from ``seed`` (the prompts read by ``prompts_of``)."""
    return GenerationRequest(
        prompts=prompts_of(args), seed=seed, negative=args.negative, steps=args.steps, cfg=args.cfg,
        height=args.height, width=args.width, num=args.num, batch_size=args.batch_size,
        sampler=args.sampler, shift=args.shift, tread_gamma=tuple(args.tread_gamma), zoom=args.zoom,
        x_shift=args.x_shift, y_shift=args.y_shift, lora=list(args.lora), dtype=args.dtype,
        model=str(args.model))


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


def run_generate(args) -> int:
    from homediff.diffusion.samplers import get_sampler
    from homediff.precision import resolve_device

    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    request = request_of(args, seed)  # every argument is checked before the model loads
    _check_limits(request, args.force)
    get_sampler(request.sampler)
    resolve_device(args.device)
    paths, grid_path = _paths(args.out, len(request.prompts) * request.num, args.overwrite)
    pipe = load_pipeline(args)
    _check_memory(pipe, request, args.force)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    records = []
    for path, (image, record) in zip(paths, draw(pipe, request), strict=True):
        save_png(image, path, record)  # each image is written as soon as it is made
        records.append(record)
        print(path, flush=True)
    if grid_path is not None:
        save_grid(_Written(paths), grid_path, records)
        print(grid_path)
    print(f"seed {seed}")
    return 0
