"""diffusers itself loads a homediff folder once this module is imported::

    import homediff.diffusers_pipeline  # registers the pipeline class with diffusers
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("my-model")   # a folder or a hub id
    image = pipe("a red fox in snow", generator=torch.Generator().manual_seed(0)).images[0]

Importing registers ``HomeDiffDiffusersPipeline`` under the class name a saved folder's
``model_index.json`` gives (``HomeDiffPipeline``), and the components' loaders under the library name
it gives (``homediff``), so diffusers' own loader reads the folder. The result is a diffusers
``DiffusionPipeline`` (``components``, ``config``, ``progress_bar``) whose call, ``to``,
``enable_model_cpu_offload`` and LoRA methods are ``HomeDiffPipeline``'s.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

from homediff import hub
from homediff.extras import require
from homediff.encoders.autoencoders import load_autoencoder
from homediff.encoders.text import TextEncoder
from homediff.pipeline import HomeDiffPipeline, load_transformer

DiffusionPipeline = require("diffusers", "diffusers").DiffusionPipeline


class HomeDiffDiffusersPipeline(DiffusionPipeline):
    """A ``HomeDiffPipeline`` as a diffusers ``DiffusionPipeline``; ``pipe.homediff`` is the former."""

    def __init__(self, transformer, text_encoder, vae, sample_size: int = 256, lora: list | None = None):
        """``lora``: the folder's adapter entries, applied from the folder on the first call."""
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, vae=vae)
        self.register_to_config(sample_size=sample_size)
        self.homediff = HomeDiffPipeline(transformer, text_encoder, vae, sample_size=sample_size)
        self._pending_lora = list(lora or [])

    def _ready(self) -> HomeDiffPipeline:
        """The homediff pipeline, with the folder's adapters loaded (diffusers records the folder
        only after construction, as ``config._name_or_path``)."""
        if self._pending_lora:
            folder = hub.resolve(self.config._name_or_path, "pipeline")
            for entry in self._pending_lora:
                self.homediff.load_lora_weights(Path(folder) / entry["file"], entry["name"], entry["scale"])
            self._pending_lora = []
        return self.homediff

    def __call__(self, *args, **kwargs):
        return self._ready()(*args, **kwargs)

    def to(self, *args, **kwargs) -> "HomeDiffDiffusersPipeline":
        self._ready().to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.homediff.device

    @property
    def dtype(self) -> torch.dtype:
        return self.homediff.dtype

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        self._ready().enable_model_cpu_offload(gpu_id, device)

    def load_lora_weights(self, *args, **kwargs) -> str:
        return self._ready().load_lora_weights(*args, **kwargs)

    def set_adapters(self, *args, **kwargs) -> None:
        self._ready().set_adapters(*args, **kwargs)

    def fuse_lora(self) -> None:
        self._ready().fuse_lora()

    def unfuse_lora(self) -> None:
        self.homediff.unfuse_lora()

    def unload_lora_weights(self) -> None:
        self._ready().unload_lora_weights()

    def save_pretrained(self, directory, **_) -> None:
        """A homediff folder (as ``HomeDiffPipeline.save_pretrained`` writes it)."""
        self._ready().save_pretrained(directory)


def _loader(name: str, load):
    """A class diffusers' loader can call: ``from_pretrained(folder, torch_dtype=None)``. It derives
    from ``nn.Module`` only so that diffusers hands it ``torch_dtype``; it is never instantiated."""

    def from_pretrained(cls, folder, torch_dtype: torch.dtype | None = None, **_):
        part = load(folder)
        return part if torch_dtype is None or isinstance(part, TextEncoder) else part.to(dtype=torch_dtype)

    return type(name, (torch.nn.Module,), {"from_pretrained": classmethod(from_pretrained)})


#: The loaders of the components, by the names ``save_pretrained`` writes in model_index.json.
COMPONENTS = types.SimpleNamespace(
    XUT=_loader("XUT", load_transformer),
    TextEncoder=_loader("TextEncoder", TextEncoder.from_pretrained),
    KLAutoencoder=_loader("KLAutoencoder", load_autoencoder),
    PixelAutoencoder=_loader("PixelAutoencoder", load_autoencoder),
)


def register() -> None:
    """Make ``DiffusionPipeline.from_pretrained`` read homediff folders (done on import)."""
    import diffusers
    import diffusers.pipelines

    diffusers.HomeDiffPipeline = HomeDiffDiffusersPipeline
    diffusers.pipelines.homediff = COMPONENTS


register()
