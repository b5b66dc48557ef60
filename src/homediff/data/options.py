"""The data options a config names: how images and captions become training samples.

Plain dataclasses that check their values, importing neither torch nor Pillow, so that reading a
config stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from homediff.errors import ConfigError

CROP_MODES = ("random", "center", "squash", "none")
MISSING_CAPTION = ("empty", "skip")
DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_MAX_ASPECT = 8.0
DEFAULT_MAX_FILE_BYTES = 512 * 2**20
MAX_CAPTION_BYTES = 2**20


@dataclass
class CaptionConfig:
    """How captions are processed; rates are probabilities in [0, 1]."""

    keep_separator: str = "|||"
    group_separator: str = "%%"
    tag_separator: str = ","
    joiner: str = ", "
    shuffle_tags: bool = True
    shuffle_groups: bool = True
    tag_dropout: float = 0.0
    group_dropout: float = 0.0
    caption_dropout: float = 0.1
    keep_tokens: int = 0  # kohya's: the first N tags stay first and are never dropped
    prefix: str = ""  # kohya's caption_prefix / caption_suffix, added to every caption
    suffix: str = ""

    def __post_init__(self):
        for name in ("tag_dropout", "group_dropout", "caption_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"captions.{name} must be a probability in [0, 1], got {rate}")
        if self.keep_tokens < 0:
            raise ConfigError(f"captions.keep_tokens must be >= 0, got {self.keep_tokens}")
        for name in ("keep_separator", "group_separator", "tag_separator"):
            if not getattr(self, name):
                raise ConfigError(f"captions.{name} must not be empty")


@dataclass
class DataConfig:
    """How images and captions become training samples.

    size: crop side in pixels. crop: "random" (shifted square crop), "center", "squash" (the whole
    image resized to the square, its aspect distorted) or "none" (the whole image, aspect kept).
    flip: probability of a horizontal flip. min_size: skip images whose short side is smaller
    (0: upscale every small image). max_pixels: refuse larger images; max_aspect: refuse images
    whose long side is more than this many times the short one; max_file_bytes: refuse larger
    image files (read no further). allow_outside_links: follow links that lead out of the data
    set's folder, to files and into folders (without it, folder links out are not scanned and
    linked files out are skipped). missing_caption: "empty" (use the empty caption) or "skip".
    caption_extension: the caption files' extension, kohya's (".txt"; ".caption" too), in any case.
    max_missing_captions: the largest share of images without a caption file that training accepts
    (more is usually a wrong caption_extension; 1.0 allows any).
    """

    size: int = 256
    crop: str = "random"
    flip: float = 0.0
    min_size: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    allow_outside_links: bool = False
    caption_extension: str = ".txt"
    max_missing_captions: float = 0.5
    missing_caption: str = "empty"
    captions: CaptionConfig = field(default_factory=CaptionConfig)

    def __post_init__(self):
        if isinstance(self.captions, dict):
            self.captions = CaptionConfig(**self.captions)
        if self.size < 1:
            raise ConfigError(f"data.size must be a positive number of pixels, got {self.size}")
        if self.crop not in CROP_MODES:
            raise ConfigError(
                f"data.crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if not 0.0 <= self.flip <= 1.0:
            raise ConfigError(f"data.flip must be a probability in [0, 1], got {self.flip}")
        for name in ("max_pixels", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise ConfigError(f"data.caption_extension must look like \".txt\", got {self.caption_extension!r}")
        if not 0 <= self.max_missing_captions <= 1:
            raise ConfigError(f"data.max_missing_captions must be a share in [0, 1], got "
                              f"{self.max_missing_captions}")
        if self.max_aspect < 1:
            raise ConfigError(f"data.max_aspect must be at least 1, got {self.max_aspect}")
        if self.missing_caption not in MISSING_CAPTION:
            raise ConfigError(f"data.missing_caption must be 'empty' or 'skip', "
                              f"got {self.missing_caption!r}")
