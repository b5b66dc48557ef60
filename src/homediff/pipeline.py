"""HomeDiffPipeline: prompt → text encoder → sampler over the XUT with guidance → autoencoder → images.

Call conventions follow diffusers::

    pipe = HomeDiffPipeline.from_pretrained("my-model")
    images = pipe("a red fox in snow", negative_prompt="blurry", height=256, width=384,
                  num_inference_steps=24, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0)).images

Beyond diffusers: ``camera={"zoom", "x_shift", "y_shift"}`` edits the position map (zoom > 1 zooms
in; x_shift > 0 looks right, y_shift > 0 looks down), ``tread_gamma=(γ_c, γ_u)`` gives each guidance
branch its own routing rate (0 = none), and ``sampler``/``shift`` choose the ODE solver and time grid.
Everything random (noise, routing) is drawn from ``generator``, so a seed repeats an image exactly.
Prompts and negative prompts are encoded separately, so each branch sees only its own text; the two
branches run as one batch when their routing rates and context lengths agree (always so with the
text encoder's ``"max_length"`` padding).

A saved pipeline is a folder in diffusers' layout: ``model_index.json`` and one sub-folder per
component (``transformer``, ``text_encoder``, ``vae``), each with a JSON config and safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from homediff import __version__, hub
from homediff.diffusion.samplers import check_rates, check_scale, get_sampler, guided_denoiser, time_grid
from homediff.encoders.autoencoders import Autoencoder, load_autoencoder
from homediff.encoders.text import TextEncoder
from homediff.errors import CheckpointError, ConfigError
from homediff.geometry import camera as camera_edit
from homediff.geometry import canonical_grid
from homediff.hdm_release import RELEASE_TEXT_ENCODER, read_release
from homediff.models import XUT, XUTConfig, load_hdm_state_dict, lora
from homediff.models.backbone_file import load_backbone_file
from homediff.precision import choose_matmul_dtype

logger = logging.getLogger(__name__)

INDEX = "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
CAMERA_KEYS = ("zoom", "x_shift", "y_shift")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
@dataclass
class PipelineOutput:
    """``images``: PIL images, an (N, H, W, C) array or an (N, C, H, W) tensor in [0, 1], or latents.
    As diffusers' outputs, also ``out[0]`` and ``out["images"]``."""

    images: Any

    def __getitem__(self, key):
        if key in (0, "images"):
            return self.images
        raise KeyError(key)

    def to_tuple(self) -> tuple:
        return (self.images,)


class HomeDiffPipeline:
    """Text encoder + XUT backbone + sampler + autoencoder. ``sample_size``: default image side."""

    def __init__(self, transformer: XUT, text_encoder: TextEncoder, vae: Autoencoder,
                 sample_size: int = 256, adapters: dict | None = None):
        """``adapters``: the LoRA settings of adapters the transformer already holds, by name
        (they are used at scale 1)."""
        config = transformer.config
        if text_encoder.dim != config.ctx_dim:
            raise ConfigError(f"the text encoder gives {text_encoder.dim}-d states but the "
                              f"transformer expects ctx_dim {config.ctx_dim}")
        if vae.channels != config.in_channels:
            raise ConfigError(f"the autoencoder has {vae.channels} latent channels but the "
                              f"transformer expects {config.in_channels}")
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder
        self.vae = vae.eval()
        self.sample_size = sample_size
        self._progress: dict = {}
        self._offload_device: torch.device | None = None  # set by enable_model_cpu_offload
        self.lora_scales: dict[str, float] = {}  # the adapters loaded, in order, and their scales
        self._lora_settings: dict = dict(adapters or {})
        self._default_names = 0  # adapter_N names handed out so far: never handed out again
        if adapters:
            self.set_adapters(list(adapters))

    @property
    def device(self) -> torch.device:
        """Where sampling runs: the transformer's device, or the offload device."""
        if self._offload_device is not None:
            return self._offload_device
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> "HomeDiffPipeline":
        """Move every component to ``device``; ``dtype`` applies to the transformer and the VAE
        (the text encoder keeps the dtype it was configured with). ``pipe.to(torch.float16)``
        works too, as in diffusers."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:
            self._offload_device = None
        if device is not None or dtype is not None:
            self.transformer.to(device=device, dtype=dtype)
            self.vae.to(device=device, dtype=dtype)
        if device is not None:
            self.text_encoder.to(device=device)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """Keep every component in CPU memory and move each to ``device`` only while it runs (the
        text encoder, then the transformer, then the autoencoder), as diffusers' method of this
        name does: the device then holds one component at a time. ``pipe.to(device)`` ends it."""
        device = torch.device(device)
        if gpu_id is not None:
            device = torch.device(device.type, gpu_id)
        self.to("cpu")
        self._offload_device = device

    @contextlib.contextmanager
    def _running(self, component):
        """``component`` on the offload device for the block, back in CPU memory after it."""
        if self._offload_device is None:
            yield
            return
        component.to(self._offload_device)
        try:
            yield
        finally:
            component.to("cpu")

    def sampling_dtype(self, setting: str = "auto") -> torch.dtype:
        """The transformer's dtype for sampling: a name in ``precision.DTYPES``, or ``"auto"``:
        bfloat16 where its matrix products at the default size (both guidance branches) are
        measured clearly faster than float32 on this device (on CUDA: where supported)."""
        c = self.transformer.config
        side = self.sample_size // self.size_multiple
        rows = 2 * (side * side + self.text_encoder.config.max_length)
        return choose_matmul_dtype(setting, self.device, (rows, c.dim, c.mlp_dim), "sampling").dtype

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the sampling bar; ``disable=True`` turns it off."""
        self._progress = kwargs

    # --- geometry -----------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: autoencoder factor × patch size."""
        return self.vae.factor * self.transformer.config.patch_size

    def check_size(self, height: int, width: int) -> None:
        step = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < step or value % step:
                low = max(step, (value // step) * step) if isinstance(value, int) else step
                nearest = sorted({low, low + step} - {value})
                raise ConfigError(
                    f"{name} {value!r} is not a positive multiple of {step} (autoencoder factor "
                    f"{self.vae.factor} × patch size {self.transformer.config.patch_size}); "
                    f"nearest valid sizes: {' or '.join(map(str, nearest))}")

    def position_map(self, height: int, width: int, camera: dict | None = None) -> torch.Tensor:
        """The (1, h·w, 2) (y, x) map at latent resolution for an image, edited by the camera."""
        camera = dict(camera or {})
        unknown = set(camera) - set(CAMERA_KEYS)
        if unknown:
            raise ConfigError(f"unknown camera key(s) {sorted(unknown)}; use {', '.join(CAMERA_KEYS)}")
        zoom = float(camera.get("zoom", 1.0))
        if zoom <= 0:
            raise ConfigError(f"camera zoom must be positive (> 1 zooms in), got {zoom}")
        grid = canonical_grid(height // self.vae.factor, width // self.vae.factor, self.device)
        pos = camera_edit(grid, zoom, float(camera.get("x_shift", 0.0)),
                          float(camera.get("y_shift", 0.0)))
        return pos.unsqueeze(0)

    # --- sampling -----------------------------------------------------------------------------

    def denoiser(self, cond: torch.Tensor, uncond: torch.Tensor | None, *, height: int, width: int,
                 guidance_scale: float, camera: dict | None = None, tread_gamma=(0.0, 0.0),
                 generator=None, batch: bool = True):
        """``denoise(x, t)`` for latents of an image of this size: the guided transformer velocity.
        ``generator``: one, or a list with one per image (each image's routing from its own)."""
        pos = self.position_map(height, width, camera)
        aspect = math.log(width / height)
        dtype = self.dtype

        def velocity(x, t, ctx, rate):
            n = x.shape[0]
            draws = generator
            if isinstance(generator, list):  # both branches in one batch: each image's twice
                draws = generator * (n // len(generator))
            return self.transformer(x.to(dtype), t, ctx.to(dtype), pos_map=pos.expand(n, -1, -1),
                                    aspect=aspect, tread_rate=rate, generator=draws)

        return guided_denoiser(velocity, cond, uncond, guidance_scale, tread_gamma, batch=batch)

    def noise(self, count: int, height: int, width: int, generator=None) -> torch.Tensor:
        """Starting latents (count, C, h, w), float32, drawn on the generator's device from
        ``generator``, or image i's from ``generator[i]`` given a list."""
        f = self.vae.factor
        shape = (self.vae.channels, height // f, width // f)
        if isinstance(generator, list):
            return torch.stack([torch.randn(shape, generator=g, device=g.device).to(self.device)
                                for g in generator])
        draw_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn((count, *shape), generator=generator, device=draw_device).to(self.device)

    def memory_estimate(self, height: int, width: int, images: int, guidance_scale: float = 3.0) -> int:
        """Bytes a call needs beyond the weights, roughly, from the shapes alone: the larger of the
        transformer's widest layer over the whole batch (both branches with guidance: attention
        scores when the attention kernel materialises them, MLP activations, a few residual
        copies) and the decoder's widest feature maps (128 channels at full resolution, three alive
        at once, for a VAE; the image itself for pixels)."""
        cfg = self.transformer.config
        side = self.vae.factor * cfg.patch_size
        tokens = (height // side) * (width // side) + self.text_encoder.config.max_length
        batch = images * (2 if guidance_scale != 1 else 1)
        heads = cfg.dim // cfg.head_dim
        layer = batch * (heads * tokens * tokens + tokens * (cfg.mlp_dim + 4 * cfg.dim)) * 4
        channels = 3 if self.vae.factor == 1 and self.vae.channels <= 12 else 3 * 128
        decode = images * height * width * channels * 4
        return max(layer, decode)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 16,
                 guidance_scale: float = 3.0, generator=None,
                 num_images_per_prompt: int = 1, camera: dict | None = None,
                 tread_gamma=(0.0, 0.0), sampler: str = "euler", shift: float = 1.0,
                 output_type: str = "pil", *, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 return_dict: bool = True):
        """Images for the prompts (``num_images_per_prompt`` each, in prompt order).

        negative_prompt: one for all prompts or one per prompt (default ""). height/width: pixels,
        multiples of ``size_multiple`` (default ``sample_size``). guidance_scale: s in
        v = v_u + s·(v_c − v_u); 1 runs the conditional branch only. camera: {"zoom", "x_shift",
        "y_shift"}. tread_gamma: (γ_c, γ_u) routing rates, 0 = none. sampler: "euler" or "heun";
        shift: time-grid shift (1 = HDM's uniform grid). output_type: "pil", "np", "pt" or "latent".
        generator: one ``torch.Generator`` for the whole batch, or a list with one per image: image
        i then draws its noise and routing from ``generator[i]`` alone, so it equals the image
        drawn by itself with that generator (up to the rounding of batched arithmetic).

        In diffusers' conventions: ``latents`` (the starting noise, one per image),
        ``prompt_embeds`` / ``negative_prompt_embeds`` (text states (B, T, D) in place of the
        prompts, one per image), ``callback_on_step_end(pipe, step, t, {"latents": x})`` after each
        step (a returned dict's ``"latents"`` replaces them), ``return_dict=False`` for a tuple.
        """
        if prompt_embeds is not None:
            prompt = [""] * prompt_embeds.shape[0]
        if prompt is None:
            raise ConfigError("give a prompt (or prompt_embeds)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = self.sample_size if height is None else height
        width = self.sample_size if width is None else width
        _check_call(self, height, width, output_type, num_images_per_prompt, tread_gamma, guidance_scale)
        solve = get_sampler(sampler)
        ts = time_grid(num_inference_steps, shift, self.device)
        generator = _per_image(generator, len(prompts) * num_images_per_prompt)
        cond, uncond = self._text_states(prompts, _negatives(negative_prompt, len(prompts)),
                                         guidance_scale != 1, prompt_embeds, negative_prompt_embeds)
        cond = cond.to(self.device).repeat_interleave(num_images_per_prompt, dim=0)
        if uncond is not None:
            uncond = uncond.to(self.device).repeat_interleave(num_images_per_prompt, dim=0)
        denoise = self.denoiser(cond, uncond, height=height, width=width,
                                guidance_scale=guidance_scale, camera=camera,
                                tread_gamma=tread_gamma, generator=generator)
        start = self._start(cond.shape[0], height, width, generator, latents)
        with self._running(self.transformer), self._progress_bar(num_inference_steps) as bar:
            def on_step(k, t, x):
                bar.update(1)
                if callback_on_step_end is None:
                    return None
                given = {"latents": x} if "latents" in callback_on_step_end_tensor_inputs else {}
                returned = callback_on_step_end(self, k, t, given) or {}
                return returned.get("latents")
            final = solve(denoise, start, ts, callback=on_step)
        if output_type != "latent":
            with self._running(self.vae):
                final = _convert(((self.vae.decode(final) + 1) / 2).clamp(0, 1).cpu(), output_type)
        return PipelineOutput(final) if return_dict else (final,)

    def _start(self, count: int, height: int, width: int, generator, latents) -> torch.Tensor:
        """The starting noise: drawn (``noise``), or the ``latents`` given, checked to fit."""
        start = self.noise(count, height, width, generator)
        if latents is None:
            return start
        if latents.shape != start.shape:
            raise ConfigError(f"latents must have the shape {tuple(start.shape)} for this request, "
                              f"got {tuple(latents.shape)}")
        return latents.to(self.device, torch.float32)

    def _text_states(self, prompts: list[str], negatives: list[str], guided: bool, prompt_embeds,
                     negative_prompt_embeds) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditional text states, and the unconditional ones when ``guided``: encoded, or
        the embeddings given in their place."""
        with self._running(self.text_encoder):
            cond = self.text_encoder.encode(prompts) if prompt_embeds is None else prompt_embeds
            if not guided:
                return cond, None
            if negative_prompt_embeds is not None:
                return cond, negative_prompt_embeds
            return cond, self.text_encoder.encode(negatives)

    def _progress_bar(self, total: int):
        from tqdm.auto import tqdm  # comes with transformers and diffusers

        return tqdm(total=total, **{"desc": "sampling", **self._progress})

    # -- LoRA adapters, in diffusers' names --------------------------------------------------

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None,
                          scale: float = 1.0) -> str:
        """Add the adapter in ``path`` (a homediff LoRA file) at ``scale``, beside any loaded
        before; returns its name (default ``adapter_N``, a name this pipeline has not used before)."""
        settings, state = lora.read_adapter(path)
        if lora.is_fused(self.transformer):
            raise ConfigError("adapters are fused: unfuse_lora() before loading another")
        name = adapter_name or self._new_adapter_name()
        lora.add_adapter(self.transformer, settings, name)
        lora.load_adapter_state(self.transformer, state, name, str(path))
        self.transformer.requires_grad_(False)
        self._lora_settings[name] = settings
        self.set_adapters(list(self.lora_scales) + [name], list(self.lora_scales.values()) + [scale])
        return name

    def _new_adapter_name(self) -> str:
        """The next ``adapter_N`` not handed out before and not taken by a name given."""
        while True:
            name = f"adapter_{self._default_names}"
            self._default_names += 1
            if name not in self._lora_settings:
                return name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """Use exactly these adapters, at these scales (default 1 each)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = [1.0] * len(names) if adapter_weights is None else (
            [adapter_weights] * len(names) if isinstance(adapter_weights, (int, float)) else list(adapter_weights))
        unknown = sorted(set(names) - set(self._lora_settings))
        if unknown or len(weights) != len(names):
            raise ConfigError(f"set_adapters: unknown adapters {unknown} or {len(weights)} weights "
                              f"for {len(names)} names (loaded: {list(self._lora_settings)})")
        self.lora_scales = dict(zip(names, map(float, weights)))
        lora.set_scales(self.transformer, self.lora_scales)

    def get_active_adapters(self) -> list[str]:
        return list(self.lora_scales)

    def fuse_lora(self) -> None:
        """Add the active adapters into the transformer's weights (faster sampling)."""
        lora.fuse(self.transformer, list(self.lora_scales))

    def unfuse_lora(self) -> None:
        lora.unfuse(self.transformer)

    def unload_lora_weights(self) -> None:
        """Remove every adapter (fused ones stay in the weights, as in diffusers)."""
        lora.remove_adapters(self.transformer)
        self.lora_scales, self._lora_settings = {}, {}

    # -- folders -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the pipeline folder: model_index.json and one sub-folder per component; loaded
        adapters go to ``lora/NAME.safetensors`` and are applied again by ``from_pretrained``."""
        if lora.is_fused(self.transformer):
            raise ConfigError("adapters are fused: unfuse_lora() first, or unload_lora_weights() "
                              "to keep the fused weights as the model")
        directory = Path(directory)
        (directory / "transformer").mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in lora.base_state(self.transformer).items()}
        save_file(state, str(directory / "transformer" / WEIGHTS))
        if self._lora_settings:
            (directory / "lora").mkdir(exist_ok=True)
            for name, settings in self._lora_settings.items():
                lora.save_adapter(directory / "lora" / f"{name}.safetensors", self.transformer, settings, name)
        (directory / "transformer" / "config.json").write_text(
            json.dumps(self.transformer.config.to_dict(), indent=1))
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.vae.save_pretrained(directory / "vae")
        index = {"_class_name": type(self).__name__, "_homediff_version": __version__,
                 "sample_size": self.sample_size, "transformer": ["homediff", "XUT"],
                 "text_encoder": ["homediff", "TextEncoder"],
                 "vae": ["homediff", type(self.vae).__name__]}
        if self._lora_settings:
            index["lora"] = [{"name": name, "file": f"lora/{name}.safetensors",
                              "scale": self.lora_scales.get(name, 0.0)} for name in self._lora_settings]
        (directory / INDEX).write_text(json.dumps(index, indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device=None, dtype: torch.dtype | None = None,
                        torch_dtype: torch.dtype | None = None) -> "HomeDiffPipeline":
        """Load a folder written by ``save_pretrained``, or a hub id ``owner/repo`` of one (through
        the hub's cache; offline, the cache only). ``torch_dtype`` is diffusers' name for ``dtype``."""
        directory = hub.resolve(directory, "pipeline")
        if not (directory / INDEX).is_file():
            raise CheckpointError(f"{directory}: not a homediff pipeline folder (no {INDEX}); "
                                  "for a released HDM file use HomeDiffPipeline.from_hdm_release")
        try:
            index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{directory / INDEX}: cannot read ({err})") from err
        if not isinstance(index, dict) or index.get("_class_name", cls.__name__) != cls.__name__:
            raise CheckpointError(f"{directory}: its {INDEX} does not name HomeDiffPipeline; for the "
                                  "original HDM's folders use HomeDiffPipeline.from_hdm_release")
        for part in ("transformer", "text_encoder", "vae"):
            if not (directory / part).is_dir():
                raise CheckpointError(f"{directory}: the component folder {part}/ is missing")
        pipe = cls(load_transformer(directory / "transformer"),
                   TextEncoder.from_pretrained(directory / "text_encoder"),
                   load_autoencoder(directory / "vae"), sample_size=index.get("sample_size", 256))
        for entry in index.get("lora", []):
            pipe.load_lora_weights(directory / entry["file"], entry["name"], entry["scale"])
        return pipe.to(device=device, dtype=dtype or torch_dtype)

    @classmethod
    def from_backbone_file(cls, path: str | Path, pipeline: str | Path | None = None) -> "HomeDiffPipeline":
        """A run's single file (``RUN/model.safetensors``: the backbone and its config, see
        ``models.backbone_file``) with the text encoder and autoencoder of ``pipeline``, by default
        the pipeline folder the run wrote beside it (``RUN/model``)."""
        path = Path(path)
        folder = Path(pipeline) if pipeline else path.parent / "model"
        if not is_pipeline_folder(folder):
            raise CheckpointError(f"{path}: a homediff run's single file holds the backbone alone; its "
                                  f"text encoder and autoencoder come from a pipeline folder, and "
                                  f"{folder} is none: load that run's model/ folder, or name one")
        beside = cls.from_pretrained(folder)
        return cls(load_backbone_file(path), beside.text_encoder, beside.vae,
                   sample_size=beside.sample_size)

    @classmethod
    def from_hdm_release(cls, checkpoint: str | Path, text_encoder: str = RELEASE_TEXT_ENCODER,
                         vae: str | None = None, *, arch=None, text_encoder_options: dict | None = None,
                         sample_size: int = 1024) -> "HomeDiffPipeline":
        """A pipeline around a released HDM model: a single file (or a Lightning checkpoint), a
        folder or hub repository holding one, or the original's diffusers-layout folder; see
        ``hdm_release.read_release`` for the arguments."""
        return cls(*read_release(checkpoint, text_encoder, vae, arch=arch,
                                 text_encoder_options=text_encoder_options), sample_size=sample_size)



def is_pipeline_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``save_pretrained`` wrote, or a damaged one (``from_pretrained``
    then says what is wrong). The original HDM's diffusers-layout folders have a model_index.json
    too, naming another class."""
    index = Path(path) / INDEX
    if not index.is_file():
        return False
    try:
        named = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "HomeDiffPipeline")
    except (OSError, ValueError, AttributeError):
        return True
    return named == "HomeDiffPipeline"


def load_transformer(folder: str | Path) -> XUT:
    """The XUT of a pipeline's ``transformer/`` folder (``config.json`` and the weights)."""
    folder = Path(folder)
    try:
        config = XUTConfig.from_dict(json.loads((folder / "config.json").read_text()))
        state = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{folder}: cannot read ({err})") from err
    return load_hdm_state_dict(XUT(config), state, str(folder))


def _check_call(pipe, height: int, width: int, output_type: str, num_images_per_prompt,
                tread_gamma, guidance_scale: float) -> None:
    """Refuse a call's sizes, output type, image count, routing rates or guidance scale."""
    pipe.check_size(height, width)
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ConfigError("num_images_per_prompt must be a positive integer, "
                          f"got {num_images_per_prompt!r}")
    check_rates(tread_gamma)
    check_scale(guidance_scale)


def _per_image(generator, count: int):
    """A list of generators, checked to hold one per image; a single generator for a single image
    becomes a list of one, so that the image equals its twin drawn in a batch with a list."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ConfigError(f"got {len(generator)} generators for {count} images; give one "
                              "generator, or one per image")
        return list(generator)
    return [generator] if generator is not None and count == 1 else generator


def _negatives(negative_prompt, count: int) -> list[str]:
    if negative_prompt is None:
        return [""] * count
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = list(negative_prompt)
    if len(negatives) != count:
        raise ConfigError(f"got {len(negatives)} negative prompts for {count} prompts; give one "
                          "negative prompt or one per prompt")
    return negatives


def _convert(images: torch.Tensor, output_type: str):
    """(N, C, H, W) in [0, 1] → the requested output type."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    pixels = (array * 255).round().astype("uint8")
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
