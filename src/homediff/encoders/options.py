"""The text-encoder options a config names, importing neither torch nor transformers."""

from __future__ import annotations

from dataclasses import dataclass

from homediff.errors import ConfigError

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
PADDING = ("max_length", "longest")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the keys of homediff.precision.DTYPES


@dataclass
class TextEncoderConfig:
    """How prompts become context states. ``layer`` indexes ``hidden_states`` (0 = embeddings);
    -1 is the model's final output. ``cache_size`` > 0 keeps that many prompts' states."""

    layer: int = -1
    padding: str = "longest"
    max_length: int = 256
    dtype: str = "auto"  # "auto": bfloat16 where measured faster on the model's device, else float32
    cache_size: int = 0

    def __post_init__(self):
        if self.padding not in PADDING:
            raise ConfigError(f"text encoder padding must be one of {PADDING}, got {self.padding!r}")
        if self.max_length < 1:
            raise ConfigError(f"text encoder max_length must be at least 1, got {self.max_length}")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"text encoder dtype must be 'auto' or one of {DTYPE_NAMES}, "
                              f"got {self.dtype!r}")
        if self.cache_size < 0:
            raise ConfigError(f"text encoder cache_size must be >= 0, got {self.cache_size}")
