"""``homediff ui``: a Gradio app that generates from a model, with camera control.

The page has the original HDM app's controls (prompt, negative prompt, steps, guidance, seed with
a "random" button, size with aspect presets, number of images, camera zoom and shifts) and
homediff's (sampler, routing guidance γ per branch, a LoRA scale per loaded adapter, a quick
low-step preview), a gallery of PNGs that carry their settings, and the ``homediff generate``
command that makes the same images. Requests queue one at a time on the model; values beyond the
limits (pixels, steps, images per request) give a message in the page.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from homediff.extras import require
from homediff.generation import GenerationRequest, sample, save_png

logger = logging.getLogger(__name__)

ASPECTS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3),
           "16:9": (16, 9), "9:16": (9, 16), "2:1": (2, 1), "1:2": (1, 2)}
PREVIEW_STEPS = 4
#: The options a page's model was loaded with, as ``homediff ui`` takes them (``Studio.loading``).
LOADING = ("model", "lora", "dtype", "device", "text_encoder", "vae", "arch")


@dataclass(frozen=True)
class Limits:
    pixels: int = 1024 * 1024
    steps: int = 100
    images: int = 8


def preset_size(aspect: str, side: int, multiple: int) -> tuple[int, int]:
    """(width, height) of about ``side``² pixels in ``aspect``, in multiples of ``multiple``."""
    w, h = ASPECTS[aspect]
    scale = side / (w * h) ** 0.5
    return (max(multiple, round(w * scale / multiple) * multiple),
            max(multiple, round(h * scale / multiple) * multiple))


class Studio:
    """The app's state: one pipeline, the options it was loaded with (``loading``, a dict keyed by
    ``LOADING``), the limits, and a folder for the images it serves."""

    def __init__(self, pipe, loading: dict, limits: Limits, out: Path):
        self.pipe, self.loading, self.limits, self.out = pipe, dict(loading), limits, out
        self.adapters = list(pipe.lora_scales)
        self.count = 0

    def request(self, prompt, negative, steps, cfg, seed, width, height, num, sampler, gamma_c, gamma_u,
                zoom, x_shift, y_shift, *scales, preview: bool = False):
        """Images for the form's values: (PNG paths, the matching command, a message)."""
        from homediff.errors import HomediffError

        values = dict(prompt=prompt, negative=negative, steps=int(steps), cfg=float(cfg),
                      seed=int(seed), width=int(width), height=int(height), num=int(num),
                      sampler=sampler, tread_gamma=(float(gamma_c), float(gamma_u)), zoom=float(zoom),
                      x_shift=float(x_shift), y_shift=float(y_shift))
        problem = self.check(values)
        if problem:
            return [], "", f"**Not generated:** {problem}"
        if preview:
            values["steps"] = min(values["steps"], PREVIEW_STEPS)
        request = self.request_of(values, scales)
        try:
            if self.adapters:
                self.pipe.set_adapters(self.adapters, list(map(float, scales)))
            images, records = sample(self.pipe, request)
        except HomediffError as err:
            return [], "", f"**Not generated:** {err}"
        paths = []
        for image, record in zip(images, records):
            self.count += 1
            path = self.out / f"{self.count:05d}.png"
            save_png(image, path, record)
            paths.append(str(path))
        message = f"seed {values['seed']}, {len(paths)} image(s)"
        return paths, request.to_command(loading=self.loading), message

    def request_of(self, values: dict, scales) -> GenerationRequest:
        """The request of the form's values (as ``request`` converts them) and adapter scales."""
        values = dict(values)
        return GenerationRequest(prompts=[values.pop("prompt")], **values, lora=self.lora_of(scales),
                                 dtype=self.loading["dtype"], model=str(self.loading["model"]))

    def check(self, values: dict) -> str | None:
        limits = self.limits
        if values["width"] * values["height"] > limits.pixels:
            return (f"{values['width']}×{values['height']} is over the limit of {limits.pixels:,} pixels "
                    "(homediff ui --max-pixels)")
        if not 1 <= values["steps"] <= limits.steps:
            return f"steps must be 1 to {limits.steps} (homediff ui --max-steps)"
        if not 1 <= values["num"] <= limits.images:
            return f"images must be 1 to {limits.images} (homediff ui --max-images)"
        return None

    def lora_of(self, scales) -> list:
        files = {name: path for name, (path, _) in zip(self.adapters, self.loading["lora"])}
        return [(files[name], float(scale)) for name, scale in zip(self.adapters, scales)]


def build_app(studio: Studio):
    """The Gradio Blocks page."""
    gr = require("gradio", "ui", "gradio")
    pipe, limits = studio.pipe, studio.limits
    side, multiple = pipe.sample_size, pipe.size_multiple
    with gr.Blocks(title="homediff") as app:
        gr.Markdown(f"## homediff · {studio.loading['model']}")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                with gr.Row():
                    steps = gr.Slider(1, limits.steps, value=min(24, limits.steps), step=1, label="Steps",
                                      elem_id="steps")
                    cfg = gr.Slider(0, 10, value=3.0, step=0.1, label="Guidance", elem_id="cfg")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    random_seed = gr.Button("Random seed", elem_id="random-seed")
                    num = gr.Slider(1, limits.images, value=1, step=1, label="Images", elem_id="num")
                with gr.Row():
                    aspect = gr.Dropdown(list(ASPECTS), value="1:1", label="Aspect", elem_id="aspect")
                    width = gr.Number(value=side, precision=0, step=multiple, label="Width", elem_id="width")
                    height = gr.Number(value=side, precision=0, step=multiple, label="Height",
                                       elem_id="height")
                with gr.Row():
                    sampler = gr.Dropdown(["euler", "heun"], value="euler", label="Sampler", elem_id="sampler")
                    gamma_c = gr.Slider(0, 0.9, value=0.0, step=0.05, label="Routing γ (conditional)",
                                        elem_id="gamma-c")
                    gamma_u = gr.Slider(0, 0.9, value=0.0, step=0.05, label="Routing γ (unconditional)",
                                        elem_id="gamma-u")
                gr.Markdown("Camera: zoom > 1 zooms in; shifts move the view right and down.")
                with gr.Row():
                    zoom = gr.Slider(0.5, 3.0, value=1.0, step=0.05, label="Zoom", elem_id="zoom")
                    x_shift = gr.Slider(-1.5, 1.5, value=0.0, step=0.05, label="X shift", elem_id="x-shift")
                    y_shift = gr.Slider(-1.5, 1.5, value=0.0, step=0.05, label="Y shift", elem_id="y-shift")
                scales = [gr.Slider(-1, 2, value=pipe.lora_scales[name], step=0.05, label=f"LoRA {name}",
                                    elem_id=f"lora-{index}")
                          for index, name in enumerate(studio.adapters)]
                with gr.Row():
                    preview = gr.Button(f"Preview ({PREVIEW_STEPS} steps)", elem_id="preview")
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=4):
                gallery = gr.Gallery(label="Images", columns=2, elem_id="gallery", type="filepath")
                status = gr.Markdown(elem_id="status")
                command = gr.Textbox(label="The same from the command line", elem_id="command",
                                     interactive=False)
        inputs = [prompt, negative, steps, cfg, seed, width, height, num, sampler, gamma_c, gamma_u,
                  zoom, x_shift, y_shift, *scales]

        def run(*values, progress=gr.Progress(track_tqdm=True)):
            return studio.request(*values)

        def run_preview(*values, progress=gr.Progress(track_tqdm=True)):
            return studio.request(*values, preview=True)

        generate.click(run, inputs, [gallery, command, status])
        preview.click(run_preview, inputs, [gallery, command, status])
        random_seed.click(lambda: secrets.randbelow(2**31), None, seed)
        aspect.change(lambda a: preset_size(a, side, multiple), aspect, [width, height])
    return app


def serve(load: Callable[[], Any], loading: dict, limits: Limits, host: str = "127.0.0.1",
          port: int = 7860, background: bool = False):
    """Load the pipeline (``load()``) and serve its page at http://HOST:PORT, until interrupted;
    with ``background``, return the running app. ``loading``: the model-loading options as given
    (``LOADING``), which the page's command lines repeat."""
    if not ipaddress.ip_address(_resolve(host)).is_loopback:
        logger.warning("serving on %s: anyone who can reach this address can use the model; the "
                       "default 127.0.0.1 serves only this machine", host)
    out = Path(tempfile.mkdtemp(prefix="homediff-ui-"))
    app = build_app(Studio(load(), loading, limits, out))
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, allowed_paths=[str(out)],
               prevent_thread_lock=background)
    return app


def _resolve(host: str) -> str:
    import socket

    return host if host[:1].isdigit() or ":" in host else socket.gethostbyname(host)
