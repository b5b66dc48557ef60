"""One generation request, drawn the same way by ``homediff generate``, the web page and Python.

A ``GenerationRequest`` holds what decides the images: prompts, seed, size, steps, guidance,
sampler, routing, camera, adapters, dtype. Image k of a request (counting over the prompts, then the
images of each) is drawn from its own generator seeded seed + k, so any one of them is made again
alone with that seed. This is homediff's one seeding rule: the training run's sample sheets, the
demo's and the evaluations draw through it too. Each image comes with its record of settings, which a PNG holds twice:
``parameters``, the text A1111 and ComfyUI readers show ("Steps: 24, Sampler: euler, CFG scale: 3,
Seed: 7, Size: 64x64, …"), and ``homediff``, the same as JSON; a grid holds the list of its images'.

    from homediff.generation import GenerationRequest, sample, save_png
    request = GenerationRequest(["red apple"], seed=1, steps=24, zoom=1.2, model="runs/emoji/model")
    images, records = sample(pipe, request)
    save_png(images[0], "apple.png", records[0])

Any pipe object with ``HomeDiffPipeline``'s call and ``sample_size`` works; loading one (and
applying the adapters and dtype a request names) is the caller's part.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from homediff.errors import ConfigError

#: The model-loading flags a command repeats from ``to_command``'s ``loading``, in this order.
LOADING_FLAGS = ("text_encoder", "vae", "arch", "device")


@dataclass
class GenerationRequest:
    """What decides a request's images. ``height``/``width`` None take the model's size; ``num`` is
    images per prompt, drawn ``batch_size`` at once; ``tread_gamma`` the routing rates (c, u) of the
    conditional and unconditional branch; ``zoom``, ``x_shift``, ``y_shift`` the camera; ``lora``
    (path, scale) pairs and ``dtype`` the transformer's precision, as the pipe was loaded with them;
    ``model`` the model's name as given, for the records."""

    prompts: list[str]
    seed: int
    negative: str = ""
    steps: int = 16
    cfg: float = 3.0
    height: int | None = None
    width: int | None = None
    num: int = 1
    batch_size: int = 1
    sampler: str = "euler"
    shift: float = 1.0
    tread_gamma: tuple[float, float] = (0.0, 0.0)
    zoom: float = 1.0
    x_shift: float = 0.0
    y_shift: float = 0.0
    lora: list[tuple[Path, float]] = field(default_factory=list)
    dtype: str = "auto"
    model: str = ""

    def __post_init__(self):
        # one form for each value, so that requests built by the CLI, the page and Python compare equal
        self.prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts)
        self.tread_gamma = tuple(float(g) for g in self.tread_gamma)
        self.lora = [(Path(path), float(scale)) for path, scale in self.lora]
        self.model = str(self.model)
        for name in ("cfg", "shift", "zoom", "x_shift", "y_shift"):
            setattr(self, name, float(getattr(self, name)))

    def check(self) -> None:
        """Raise ``ConfigError`` for no prompt, or a count or size below 1 (named by its
        ``homediff generate`` flag)."""
        if not self.prompts:
            raise ConfigError("no prompt: a request needs at least one")
        for name, value in (("--steps", self.steps), ("--num", self.num), ("--width", self.width),
                            ("--height", self.height), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")

    def to_command(self, out="out.png", loading: dict | None = None) -> str:
        """The ``homediff generate`` command that makes the same images, written to ``out``.
        ``loading``: the model-loading options as given (``text_encoder``, ``vae``, ``arch``,
        ``device``; other keys are ignored); those that are set are repeated."""
        first, *more = self.prompts
        words = ["homediff", "generate", *_text_argument(None, first)]
        for prompt in more:
            words += _text_argument("--prompt", prompt)
        words += ["--model", self.model, "--out", str(out), "--seed", str(self.seed),
                  "--steps", str(self.steps), "--cfg", _number(self.cfg)]
        for flag, value in (("--width", self.width), ("--height", self.height)):
            if value is not None:
                words += [flag, str(value)]
        words += ["--num", str(self.num)]
        if self.batch_size != 1:
            words += ["--batch-size", str(self.batch_size)]
        words += ["--sampler", self.sampler]
        if self.shift != 1.0:
            words += ["--shift", _number(self.shift)]
        words += ["--dtype", self.dtype]
        if self.negative:
            words += _text_argument("--negative", self.negative)
        if any(self.tread_gamma):
            words += ["--tread-gamma", *map(_number, self.tread_gamma)]
        for flag, value, default in (("--zoom", self.zoom, 1.0), ("--x-shift", self.x_shift, 0.0),
                                     ("--y-shift", self.y_shift, 0.0)):
            if value != default:
                words += [flag, _number(value)]
        for option in LOADING_FLAGS:
            if (loading or {}).get(option):
                words += [f"--{option.replace('_', '-')}", str(loading[option])]
        for path, scale in self.lora:
            words += ["--lora", f"{path}:{_number(scale)}"]
        return shlex.join(words)


def _number(value: float) -> str:
    """A float as the command writes it: short (``%g``) where that reads back as the same value."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _text_argument(flag: str | None, text: str) -> list[str]:
    """A prompt as command words: positional (``flag`` None) or after ``flag``; text that starts
    with "-" is joined to its flag, where argparse reads it as a value and not as an option."""
    if not text.startswith("-"):
        return [text] if flag is None else [flag, text]
    return [f"{flag or '--prompt'}={text}"]


def draw(pipe, request: GenerationRequest, output_type: str = "pil"):
    """The images of a request, each with its record of settings, yielded as they are made. Image
    k is drawn from its own generator seeded seed + k, so it is the image seed + k makes alone; a
    pipe call takes ``batch_size`` images (whole prompts' worth when that holds all ``num`` of a
    prompt). The request is taken as it is (``request.check()`` refuses counts and sizes below 1).
    ``output_type``: the pipe's ("pil", or "pt" for float tensors in [0, 1])."""
    import torch

    height, width = request.height or pipe.sample_size, request.width or pipe.sample_size
    settings = {"negative_prompt": request.negative, "num_inference_steps": request.steps,
                "guidance_scale": request.cfg, "height": height, "width": width,
                "camera": {"zoom": request.zoom, "x_shift": request.x_shift, "y_shift": request.y_shift},
                "tread_gamma": list(request.tread_gamma), "sampler": request.sampler,
                "shift": request.shift}
    for prompts, per_prompt, first in _calls(request):
        seeds = [request.seed + first + i for i in range(len(prompts) * per_prompt)]
        drawn = pipe(prompts, num_images_per_prompt=per_prompt, output_type=output_type,
                     generator=[torch.Generator().manual_seed(s) for s in seeds], **settings).images
        for i, image in enumerate(drawn):
            yield image, {"prompt": prompts[i // per_prompt], **settings, "seed": seeds[i],
                          "index": first + i, "lora": [[str(path), scale] for path, scale in request.lora],
                          "model": request.model, "size": [width, height]}


def _calls(request: GenerationRequest):
    """The pipe calls of a request, in image order: (prompts, images per prompt, index of the
    call's first image)."""
    num, batch = request.num, request.batch_size
    if batch >= num:  # whole prompts per call
        step = batch // num
        for start in range(0, len(request.prompts), step):
            yield request.prompts[start:start + step], num, start * num
        return
    for p, prompt in enumerate(request.prompts):
        for start in range(0, num, batch):
            yield [prompt], min(batch, num - start), p * num + start


def seed_requests(prompt: str, seeds: list[int], **settings) -> list[GenerationRequest]:
    """Requests that draw ``prompt`` once from each of ``seeds``, in order: one per run of
    consecutive seeds, its images in one batch; each image is the one its seed draws alone."""
    runs: list[list[int]] = []
    for seed in seeds:
        if runs and seed == runs[-1][-1] + 1:
            runs[-1].append(seed)
        else:
            runs.append([seed])
    return [GenerationRequest([prompt], seed=run[0], num=len(run), batch_size=len(run), **settings)
            for run in runs]


def sample(pipe, request: GenerationRequest, output_type: str = "pil"):
    """The images of a request (see ``draw``) all at once, and their records."""
    pairs = list(draw(pipe, request, output_type))
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


def png_metadata(record: dict):
    """A ``PngInfo`` holding an image's settings: ``parameters`` (A1111's text) and ``homediff`` (JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(record))
    info.add_text("homediff", json.dumps(record))
    return info


def save_png(image, path, record: dict) -> None:
    """``image`` as a PNG whose metadata holds its settings (see ``png_metadata``)."""
    image.save(path, pnginfo=png_metadata(record))


def save_grid(images, path, records: list[dict]) -> None:
    """The images (all the same size; any sequence, read one at a time) as one grid PNG; its
    metadata lists every image's settings."""
    from PIL.PngImagePlugin import PngInfo

    from homediff.figures import image_grid

    info = PngInfo()
    info.add_text("parameters", "\n\n".join(parameters_text(r) for r in records))
    info.add_text("homediff", json.dumps({"grid": records}))
    image_grid(images).save(path, pnginfo=info)
