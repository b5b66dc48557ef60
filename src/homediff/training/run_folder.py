"""A run folder belongs to one run: what a run leaves there, and claiming the folder for a new one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from homediff.errors import HomediffError
from homediff.training.checkpoint import list_checkpoints

logger = logging.getLogger(__name__)

RUN_OUTPUTS = ("checkpoints", "logs", "samples", "model", "model.safetensors", "lora.safetensors",
               "loss.png")
FINISHED = ("model", "model.safetensors", "lora.safetensors")  # what a run that ended leaves


def claim_run_folder(run_dir: Path, overwrite: bool, main_process: bool, wait_for_everyone) -> None:
    """A new run may not mix with another's checkpoints or model: refuse, or with ``overwrite``
    clear the earlier run's outputs (the disk caches stay: their keys say what they hold). What an
    attempt that saved no checkpoint left (logs, samples) is no run to continue: it is cleared, with
    a warning. Every process calls this; the main one deletes, then all meet at
    ``wait_for_everyone``, whatever each saw before the deletion."""
    earlier = list_checkpoints(run_dir / "checkpoints")
    finished = any((run_dir / name).exists() for name in FINISHED)
    if (earlier or finished) and not overwrite:
        held = f"checkpoints up to {earlier[-1].name}" if earlier else "a finished model"
        raise HomediffError(f"{run_dir} holds another run ({held}): continue it with "
                            "--resume latest, or start again with --overwrite (deletes it)")
    if main_process:
        left = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        if left and not (earlier or finished):
            logger.warning("%s: an earlier attempt saved no checkpoint; clearing what it left (%s)",
                           run_dir, ", ".join(path.name for path in left))
        for path in left:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    wait_for_everyone()
