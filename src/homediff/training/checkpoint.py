"""Checkpoint files: safetensors I/O, atomic checkpoint folders, keeping the last K, RNG states.

A training checkpoint is a folder ``checkpoints/step-XXXXXXXX`` written as ``….partial`` and renamed
when every file in it has been flushed to disk, so a run killed mid-write leaves the previous
checkpoints intact and never a half-written one that looks complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from homediff.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d{8})$")


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: str | Path, step: int, writers: dict[str, Callable[[Path], None]],
                     keep: int = 0) -> Path:
    """Write one checkpoint folder atomically; ``writers`` maps file names to functions that write
    that file at the path given. Keeps the newest ``keep`` checkpoints (0: all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    partial = root / f"{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for name, write in writers.items():
        write(partial / name)
        _fsync(partial / name)
    if final.exists():
        shutil.rmtree(final)
    os.rename(partial, final)
    _fsync(root)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


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
