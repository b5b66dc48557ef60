"""Training checkpoints: the ``Checkpoint`` type, which owns the on-disk format, and its files.

A checkpoint is a folder ``checkpoints/step-XXXXXXXX`` with one file per part::

    model.safetensors       the backbone's weights (whole, also when FSDP trains it in shards)
    model_config.json       the backbone's config
    ema.safetensors         the EMA weights; its decay and update count in the file's metadata
    optimizer.safetensors   the optimiser's state and the fp16 loss scaler's
    data.json               the data stream's position (shards; folders resume from the progress)
    rng.safetensors         every process's random states
    progress.json           steps, stage, epoch, samples of the epoch taken, the processes the run
                            began with, loss history, the precision choices
    config.toml             the training config as given (for the processes the run began with)

Nothing is pickled: tensors are safetensors, everything else JSON, so reading a checkpoint from
elsewhere never runs code. A folder is written as ``….partial`` and renamed once every file in it is
flushed to disk, so a run killed mid-write leaves the previous checkpoints intact and never a
half-written one that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from homediff.atomic import fsync, replace_folder
from homediff.errors import CheckpointError
from homediff.training.config import StageConfig, parse_toml

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: cannot read ({err})") from err


def write_checkpoint(root: str | Path, step: int, writers: dict[str, Callable[[Path], None]],
                     keep: int = 0) -> Path:
    """Write one checkpoint folder atomically: every file, then ``manifest.json`` (each file's size
    and SHA-256), then the rename. ``writers`` maps file names to functions that write that file at
    the path given. Keeps the newest ``keep`` checkpoints (0: all) and always the one just written.
    A failed write (a full disk) removes its partial folder and leaves the others as they were."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    partial = root / f"{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        for name, write in writers.items():
            write(partial / name)
            fsync(partial / name)
        manifest = {name: _fingerprint(partial / name) for name in writers}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        fsync(partial / MANIFEST)
        replace_folder(partial, final)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"{final}: cannot write the checkpoint ({err}); the earlier ones are "
                              "intact: free disk space, then continue with --resume latest") from err
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_checkpoint(path: str | Path) -> None:
    """Check every file of a checkpoint folder against its manifest; the error names the first
    file that is missing, truncated or changed."""
    path = Path(path)
    listed = _read_json(path / MANIFEST) if (path / MANIFEST).is_file() else None
    if not isinstance(listed, dict):
        raise CheckpointError(f"{path}: no readable {MANIFEST}: not a complete checkpoint")
    for name, expected in listed.items():
        file = path / name
        if "/" in name or name.startswith(".") or not file.is_file():
            raise CheckpointError(f"{file}: listed in the manifest but missing")
        found = _fingerprint(file)
        if found["bytes"] != expected.get("bytes"):
            raise CheckpointError(f"{file}: {found['bytes']} bytes where the manifest says "
                                  f"{expected.get('bytes')} (truncated or damaged)")
        if found["sha256"] != expected.get("sha256"):
            raise CheckpointError(f"{file}: its contents differ from the manifest's checksum (damaged)")


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder (``step-N`` with its manifest and progress)."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file() and (path / "progress.json").is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def rng_state() -> dict:
    """Every global random state a training step may touch."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_tree(path: str | Path, tree) -> None:
    """A nested structure of dicts, lists, tuples, numbers, strings, None, tensors and numpy arrays
    (an optimiser's or a random generator's state) as one safetensors file: the tensors as its
    tensors, the structure as JSON in its metadata."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value):
        if isinstance(value, torch.Tensor):
            tensors[name := str(len(tensors))] = value
            return {"tensor": name}
        if isinstance(value, np.ndarray):  # as int64/float64: safetensors lacks some numpy dtypes
            wide = value.astype(np.float64 if value.dtype.kind == "f" else np.int64)
            tensors[name := str(len(tensors))] = torch.from_numpy(wide)
            return {"ndarray": name, "dtype": value.dtype.str}
        if isinstance(value, np.generic):
            return {"value": value.item()}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {"dict": {k: encode(v) for k, v in value.items()}}
            return {"items": [[encode(k), encode(v)] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {type(value).__name__: [encode(v) for v in value]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise CheckpointError(f"{path}: cannot store a {type(value).__name__} in a checkpoint")

    structure = json.dumps(encode(tree))
    save_tensors(path, tensors, {"structure": structure})


def load_tree(path: str | Path):
    """What ``save_tree`` wrote."""
    try:
        with safe_open(str(path), framework="pt") as file:
            structure = json.loads((file.metadata() or {})["structure"])
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from err
    tensors = load_tensors(path)

    def decode(node: dict):
        if "ndarray" in node:
            return tensors[node["ndarray"]].numpy().astype(np.dtype(node["dtype"]))
        (kind, value), = node.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {k: decode(v) for k, v in value.items()}
        if kind == "items":
            return {decode(k): decode(v) for k, v in value}
        if kind in ("list", "tuple"):
            items = [decode(v) for v in value]
            return tuple(items) if kind == "tuple" else items
        return value

    return decode(structure)


@dataclass
class Progress:
    """Where a run is; saved with every checkpoint."""

    step: int = 0  # optimiser steps over the whole run
    stage: int = 0
    stage_step: int = 0  # optimiser steps in the current stage
    epoch: int = 0  # epoch within the current stage
    samples: int = 0  # samples of the current epoch taken so far, by all processes together
    processes: int = 1  # processes the run began with, for which its config's grad_accum is given
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)

    @classmethod
    def from_saved(cls, fields: dict, processes: int, config: str) -> Progress:
        """A checkpoint's progress as saved. Earlier versions did not record the processes the
        run began with (it never changed then: ``processes``, the checkpoint's), and counted the
        epoch's position in micro-batches per process (``batch``): those become samples, by the
        batch size in the checkpoint's ``config``."""
        fields = {"processes": processes, **fields}
        if "batch" in fields:
            stages = parse_toml(config).get("stages") or [{}]
            stage = stages[min(fields["stage"], len(stages) - 1)]
            fields["samples"] = fields.pop("batch") * stage.get("batch_size", StageConfig.batch_size) * processes
        return cls(**fields)

    def advance(self, samples: int, folder_size: int | None) -> None:
        """Move the epoch's position on by ``samples``; in a folder (of ``folder_size`` images)
        smaller than a batch of every process, a batch runs on into the next epochs, and so does
        the position."""
        self.samples += samples
        if folder_size:
            self.epoch, self.samples = divmod(self.epoch * folder_size + self.samples, folder_size)

    def next_stage(self) -> None:
        self.stage += 1
        self.stage_step = self.epoch = self.samples = 0


@dataclass(frozen=True)
class Precisions:
    """The dtypes a run computes in, by name, and the machine they were chosen on
    (``training.precisions.choose_precisions``); a resume on that machine reuses them, so that it
    continues with the same numerics."""

    machine: str
    autocast: str | None  # autocast's dtype; None: off (float32)
    muon: str | None  # Muon's Newton-Schulz iteration; None without Muon
    text: str  # the text encoder's
    attention: tuple[str, ...] = ()  # the dtypes in which attention takes the matmul path

    def describe(self) -> str:
        return (f"autocast {self.autocast or 'off'}, Muon {self.muon or '-'}, text encoder "
                f"{self.text}, matmul attention in {', '.join(self.attention) or 'none'}")

    @classmethod
    def from_saved(cls, fields: dict | None) -> Precisions | None:
        """The choices as saved; None where a checkpoint of an earlier version holds fewer (the
        choices are then made again)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not fields or not names <= set(fields):
            return None
        return cls(**{k: tuple(fields[k]) if k == "attention" else fields[k] for k in names})


@dataclass
class Checkpoint:
    """Everything a run needs to continue exactly where it stopped (see the module's docstring
    for the files). ``rng`` holds each process's random states, in rank order."""

    progress: Progress
    precision: Precisions | None
    model: dict[str, torch.Tensor]
    model_config: dict
    config: str  # the training config as TOML
    optimizer: dict
    ema: dict | None = None  # EMA.state_dict()
    data: dict | None = None
    rng: list[dict] | None = None

    @property
    def processes(self) -> int:
        """How many processes the run had (one random state each)."""
        return len(self.rng) if self.rng else 1

    def save(self, root: str | Path, keep: int = 0) -> Path:
        """Write ``root/step-XXXXXXXX`` atomically, keeping the newest ``keep`` (0: all)."""
        def write_json(value):
            return lambda p: p.write_text(json.dumps(value, indent=1), encoding="utf-8")

        writers = {
            "model.safetensors": lambda p: save_tensors(p, self.model),
            "model_config.json": write_json(self.model_config),
            "optimizer.safetensors": lambda p: save_tree(p, self.optimizer),
            "data.json": write_json(self.data),
            "rng.safetensors": lambda p: save_tree(p, self.rng or []),
            "progress.json": write_json({
                "progress": dataclasses.asdict(self.progress),
                "precision": dataclasses.asdict(self.precision) if self.precision else None}),
            "config.toml": lambda p: p.write_text(self.config, encoding="utf-8"),
        }
        if self.ema is not None:
            meta = {"decay": str(self.ema["decay"]), "updates": str(self.ema["updates"])}
            writers["ema.safetensors"] = lambda p: save_tensors(p, self.ema["shadow"], meta)
        return write_checkpoint(root, self.progress.step, writers, keep)

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """Read a checkpoint folder after checking it against its manifest."""
        path = Path(path)
        _refuse_old_format(path)
        verify_checkpoint(path)
        saved = _read_progress_file(path)
        ema = None
        if (path / "ema.safetensors").is_file():
            with safe_open(str(path / "ema.safetensors"), framework="pt") as file:
                meta = file.metadata() or {}
            ema = {"decay": float(meta["decay"]), "updates": int(meta["updates"]),
                   "shadow": load_tensors(path / "ema.safetensors")}
        rng, config = load_tree(path / "rng.safetensors"), _read_text(path / "config.toml")
        return cls(progress=Progress.from_saved(saved["progress"], len(rng) if rng else 1, config),
                   precision=Precisions.from_saved(saved.get("precision")),
                   model=load_tensors(path / "model.safetensors"),
                   model_config=_read_json(path / "model_config.json"), config=config,
                   optimizer=load_tree(path / "optimizer.safetensors"), ema=ema,
                   data=_read_json(path / "data.json"), rng=rng)

    @staticmethod
    def read_step(path: str | Path) -> int:
        """The optimiser step a checkpoint folder was saved at, without reading its tensors."""
        return int(_read_progress_file(Path(path))["progress"]["step"])

    @classmethod
    def open(cls, root: str | Path, which: str) -> tuple[Path, "Checkpoint"]:
        """The checkpoint ``which`` names, verified and loaded: a folder, or ``"latest"``, the
        newest intact one under ``root`` (each damaged newer one is skipped with a warning that
        names what is wrong)."""
        if which != "latest":
            return Path(which), cls.load(which)
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(f"--resume latest: no checkpoint in {root}")
        problems = []
        for path in reversed(found):
            try:
                return path, cls.load(path)
            except CheckpointError as err:
                problems.append(str(err))
                logger.warning("skipping a damaged checkpoint: %s", err)
        raise CheckpointError(f"--resume latest: no intact checkpoint in {root} ({'; '.join(problems)})")


def _refuse_old_format(path: Path) -> None:
    if (path / "state.pt").is_file() and not (path / "progress.json").is_file():
        raise CheckpointError(f"{path}: a checkpoint in the pickled format of earlier homediff "
                              "versions, which is not read (loading a pickle can run code): start a "
                              "new run, or resume it with the version that wrote it")


def _read_progress_file(path: Path) -> dict:
    _refuse_old_format(path)
    if not (path / "progress.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no progress.json)")
    return _read_json(path / "progress.json")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from err


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from err
