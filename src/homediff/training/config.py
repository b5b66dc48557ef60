"""Training configuration: dataclasses, TOML files, ``--set section.key=value`` overrides.

A run's config is one TOML file. Every key is checked: an unknown key, a value of the wrong type or
out of range is an error that names the key; each section checks its own values. A stage key left
unset (None) inherits the optimizer's (or the text encoder's) value, resolved once when the config is
built, so the config saved with every checkpoint holds the values the run used. Reading a config
imports neither torch nor Pillow.
"""

from __future__ import annotations

import dataclasses
import keyword
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from homediff.data.options import DataConfig
from homediff.encoders.options import DEFAULT_TEXT_ENCODER, TextEncoderConfig
from homediff.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class InvalidValue(ConfigError):
    """A section's value out of range; ``key`` names it within the section ("" for the section)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}" if key else message)
        self.key = key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise InvalidValue(key, message)


def _one_of(value, options: tuple, key: str) -> None:
    _require(value in options, key, f"must be one of {', '.join(map(repr, options))}, got {value!r}")


@dataclass
class ModelSection:
    """The backbone: a preset and any ``XUTConfig`` field to change. ``in_channels`` and
    ``ctx_dim`` default to what the autoencoder and text encoder give."""

    preset: str = "xut-tiny"
    overrides: dict = field(default_factory=dict)


@dataclass
class TextSection:
    name: str = DEFAULT_TEXT_ENCODER  # local path or hub id of a transformers model
    options: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass
class AutoencoderSection:
    name: str = "pixel"  # "pixel", a diffusers AutoencoderKL folder or hub id
    factor: int = 1  # pixel space: pixel-unshuffle factor


@dataclass
class DatasetSection:
    """The training images and the held-out ones. ``val_path`` None is the ``heldout`` folder
    beside ``path`` where there is one (``homediff data emoji|shapes OUT`` writes ``OUT/train`` and
    ``OUT/heldout``), else "" (no held-out loss); it is resolved when the config is built."""

    path: str = ""  # an image folder, or a folder / glob of .tar shards
    kind: str = "auto"  # "folder", "shards" or "auto"
    workers: int = 2
    options: DataConfig = field(default_factory=DataConfig)  # its size is each stage's resolution
    val_path: str | None = None  # a folder of held-out images, none of them in `path`
    val_images: int = 32  # how many of them, evenly spaced in path order

    def __post_init__(self):
        _one_of(self.kind, ("auto", "folder", "shards"), "kind")
        _require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        _require(self.val_images >= 1, "val_images", f"must be at least 1, got {self.val_images}")
        if self.val_path is None:  # the layout `homediff data emoji|shapes OUT` builds
            beside = Path(self.path).parent / "heldout"
            self.val_path = str(beside) if self.path and beside.is_dir() else ""


@dataclass
class OptimizerSection:
    name: str = "adamw"  # "muon": Muon for the hidden matrices, AdamW for the rest (optim.MuonAdamW)
    muon_dtype: str = "auto"  # Muon's Newton-Schulz precision: "auto" (measured), "bfloat16", "float32"
    lr_rule: str = "fan_in"  # "fan_in": lr / fan-in per tensor (HDM's muP, base_dim 1); "plain"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.02
    decay_norms_and_biases: bool = False  # HDM decays every tensor; off excludes 1-D and RoPE
    grad_clip: float = 3.0
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.01  # cosine decays to this fraction of the stage's LR

    def __post_init__(self):
        _one_of(self.name, ("adamw", "muon"), "name")
        _one_of(self.muon_dtype, ("auto", "bfloat16", "float32"), "muon_dtype")
        _one_of(self.lr_rule, ("fan_in", "plain"), "lr_rule")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 f"must be two numbers in [0, 1), got {self.betas}")
        for key in ("eps", "weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")


@dataclass
class EMASection:
    enabled: bool = True
    decay: float = 0.999  # reached after warm-up: decay_t = min(decay, (1 + t) / (10 + t))

    def __post_init__(self):
        _require(0 <= self.decay < 1, "decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class InitSection:
    """Start from saved weights (``[init] from = PATH``, a keyword, so ``from_`` here): a homediff
    pipeline folder (its text encoder and autoencoder come too), a homediff ``model.safetensors``,
    a released HDM file or a Lightning checkpoint (``arch``: its arch JSON, default XUT-base)."""

    from_: str = ""
    arch: str = ""


#: The layers a LoRA adapter can target, by the names ``models.lora.TARGET_PATTERNS`` matches.
LORA_TARGETS = ("attention", "cross_attention", "mlp", "adaln", "text")


@dataclass
class LoraSection:
    """Train LoRA adapters instead of the whole backbone (``rank`` 0: off). ``alpha`` None is
    ``rank`` (scale 1)."""

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "cross_attention", "mlp"])

    def __post_init__(self):
        _require(self.rank >= 0, "rank", f"must be >= 0, got {self.rank}")
        _require(self.alpha is None or self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        _require(bool(self.targets) and not unknown, "targets",
                 f"must be some of {', '.join(LORA_TARGETS)}, got {self.targets}")


@dataclass
class StageConfig:
    """One stage of progressive training; a stage runs ``steps`` optimiser steps or ``epochs``."""

    name: str = ""
    resolution: int = 256
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 0.5
    steps: int = 0
    epochs: float = 0.0
    tread_rate: float = 0.5
    text_length: int | None = None  # None: the text encoder's max_length
    weight_decay: float | None = None  # None: the optimizer section's
    grad_clip: float | None = None  # None: the optimizer section's
    betas: list[float] | None = None  # None: the optimizer section's

    def __post_init__(self):
        _require((self.steps > 0) != (self.epochs > 0), "", "must set exactly one of steps or epochs")
        for key in ("resolution", "batch_size", "grad_accum"):
            _require(getattr(self, key) >= 1, key, f"must be positive, got {getattr(self, key)}")
        _require(self.lr >= 0, "lr", f"must be >= 0, got {self.lr}")
        _require(0 <= self.tread_rate < 1, "tread_rate", f"must be in [0, 1), got {self.tread_rate}")
        _require(self.text_length is None or self.text_length >= 1, "text_length",
                 f"must be at least 1, got {self.text_length}")

    def inherit(self, optimizer: OptimizerSection, text_length: int) -> None:
        """Fill the keys left unset from the optimizer section and the text encoder."""
        for key, value in (("weight_decay", optimizer.weight_decay), ("grad_clip", optimizer.grad_clip),
                           ("betas", list(optimizer.betas)), ("text_length", text_length)):
            if getattr(self, key) is None:
                setattr(self, key, value)


@dataclass
class TrainSection:
    seed: int = 0
    mixed_precision: str = "auto"  # "auto": GPUs bf16 (else fp16), CPUs bf16 where measured faster
    compile: bool | str = "auto"  # torch.compile: true, false, or "auto" where measured to pay
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # 0: keep all
    log_every: int = 10
    sample_every: int = 500  # a sheet every this many steps and at each stage's end (0: ends only)
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # a sheet's columns
    sample_steps: int = 24
    sample_cfg: float = 3.0
    val_every: int = 100  # the held-out loss (dataset.val_path) every this many steps (0: off)
    time_mean: float = 0.0  # training flow times t = sigmoid(mean + std·N(0, 1)) (HDM: 0, 1)
    time_std: float = 1.0
    time_shift_base: int = 0  # > 0: times shifted towards noise by √(H·W)/base (SD3); 0: none (HDM)
    contrastive_weight: float = 0.0  # ΔFM's λ: minus λ·MSE to another sample's velocity (0: off)
    align_weight: float = 0.0  # λ of the representation alignment (training.alignment; 0: off)
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    fp16_grad_compression: bool = False
    cache_text: bool = False
    cache_latents: bool = False
    deterministic: bool = False
    peak_tflops: float = 0.0  # the accelerator's peak, to log model FLOP utilisation (MFU)
    wandb: bool = False

    def __post_init__(self):
        _one_of(self.mixed_precision, ("auto", "no", "bf16", "fp16"), "mixed_precision")
        _require(self.compile in (True, False, "auto"), "compile",
                 f'must be true, false or "auto", got {self.compile!r}')
        _require(self.time_std >= 0, "time_std", f"must be >= 0, got {self.time_std}")
        _require(self.time_shift_base >= 0, "time_shift_base", f"must be >= 0, got {self.time_shift_base}")
        _require(0 <= self.contrastive_weight < 1, "contrastive_weight",
                 f"must be in [0, 1), got {self.contrastive_weight}")
        _require(self.align_weight >= 0, "align_weight", f"must be >= 0, got {self.align_weight}")
        for key in ("checkpoint_every", "log_every", "sample_steps", "max_bad_steps"):
            _require(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}")
        for key in ("keep_checkpoints", "sample_every", "val_every"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _require(bool(self.sample_seeds), "sample_seeds", "must list at least one seed")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    text_encoder: TextSection = field(default_factory=TextSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    ema: EMASection = field(default_factory=EMASection)
    train: TrainSection = field(default_factory=TrainSection)
    init: InitSection = field(default_factory=InitSection)
    lora: LoraSection = field(default_factory=LoraSection)
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("the config has no [[stages]]: add at least one")
        for key, instead in (("tread_rate", "each stage's tread_rate"),
                             ("gradient_checkpointing", "train.gradient_checkpointing")):
            if key in self.model.overrides:
                raise ConfigError(f"model.overrides.{key} is not read in training: set {instead}")
        if self.lora.rank and self.optimizer.name != "adamw":
            raise ConfigError("LoRA trains with optimizer.name = \"adamw\" (Muon orthogonalises "
                              "whole matrices, not low-rank factors)")
        if self.train.cache_text and self.text_encoder.options.padding != "max_length":
            raise ConfigError("train.cache_text needs text_encoder.options.padding = \"max_length\"")
        for stage in self.stages:
            stage.inherit(self.optimizer, self.text_encoder.options.max_length)


def _describe(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _build(kind, value, where: str):
    """Check ``value`` against the annotation ``kind`` and convert tables to dataclasses."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return _from_dict(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _build(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} has the wrong type: {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is dict and isinstance(value, dict):
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {_describe(kind)}, got {value!r}")
    return value


def _from_dict(cls, values: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    values = {f"{k}_" if keyword.iskeyword(k) else k: v for k, v in values.items()}  # from → from_
    unknown = sorted(set(values) - set(names))
    if unknown:
        shown = [n[:-1] if keyword.iskeyword(n[:-1]) else n for n in names]
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known keys here: {', '.join(shown)})")
    try:
        return cls(**{k: _build(hints[k], v, prefix + k) for k, v in values.items()})
    except InvalidValue as err:
        raise ConfigError(f"{prefix}{err}" if err.key else f"{where or 'config'} {err}") from err
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from err


def _parse_value(text: str):
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (TOML value, or a bare string; ``stages.0.lr`` indexes lists)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, text = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {path}: {key} is not an index of that list")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            where = ".".join(keys[:depth + 1])
            raise ConfigError(f"override {path}: {where} is a value ({node!r}), not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {path}: {last} is not an index of that list")
        node[int(last)] = _parse_value(text.strip())
    else:
        node[last] = _parse_value(text.strip())


def config_from_dict(raw: dict) -> TrainConfig:
    if "size" in raw.get("dataset", {}).get("options", {}):
        raise ConfigError("dataset.options.size is not read in training: each stage's resolution is "
                          "its crop size")
    return _from_dict(TrainConfig, raw)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML config, apply dotted overrides, and check every key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from err
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def parse_toml(text: str) -> dict:
    return tomllib.loads(text)


def to_dict(config) -> dict:
    """The config as plain tables; a training config leaves out ``dataset.options.size``, which each
    stage's resolution sets."""
    tables = dataclasses.asdict(config)
    if isinstance(config, TrainConfig):
        del tables["dataset"]["options"]["size"]
        tables["init"]["from"] = tables["init"].pop("from_")
        if tables["lora"]["alpha"] is None:
            del tables["lora"]["alpha"]
    return tables


def to_toml(config) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(config))
