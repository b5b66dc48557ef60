"""The evaluations' settings, importing neither torch nor Pillow (the CLI reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass

from homediff.errors import ConfigError


@dataclass
class EvalSettings:
    """Options of both evaluations (``homediff.evaluation.common``); ``size`` None: the pipeline's.
    ``inception_weights`` and ``clip`` add FID and the CLIP score to the fidelity evaluation."""

    per_caption: int = 2
    seen: int = 50
    heldout: int = 50
    distractors: int = 4
    refs_per_caption: int = 1
    steps: int = 16
    cfg: float = 3.0
    seed: int = 0
    size: int | None = None
    batch: int = 32
    feature_size: int = 224  # EfficientNet-Lite0's input side (effnet.INPUT_SIZE)
    cache: bool = True
    progress: bool = False
    inception_weights: str | None = None  # FID's Inception-v3 file (evaluation.inception)
    clip: str | None = None  # a local CLIP file or folder for the CLIP score (evaluation.clip_score)

    def check(self) -> None:
        for name in ("per_caption", "refs_per_caption", "steps", "batch", "feature_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got "
                                  f"{getattr(self, name)}")
        if self.seen < 0 or self.heldout < 0 or self.distractors < 0:
            raise ConfigError("seen, heldout and distractors must be >= 0")


@dataclass
class CameraSettings:
    """Options of ``homediff eval camera`` (``homediff.evaluation.camera``): each prompt is drawn
    with seeds ``seed … seed + seeds − 1`` in the canonical view and in every edit; ``prompts`` is
    how many training captions are drawn when none are given."""

    prompts: int = 4
    seeds: int = 3
    steps: int = 16
    cfg: float = 3.0
    seed: int = 0
    size: int | None = None
    batch: int = 16
    progress: bool = False

    def check(self) -> None:
        for name in ("prompts", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seeds < 2:
            raise ConfigError(f"seeds must be at least 2 (different seeds give the baseline), got "
                              f"{self.seeds}")
