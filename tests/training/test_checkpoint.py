import os
import subprocess
import sys

import torch

from homediff.training.checkpoint import (latest_checkpoint, list_checkpoints, load_tensors,
                                          rng_state, save_tensors, set_rng_state, write_checkpoint)


def writer(value):
    return lambda p: save_tensors(p, {"x": torch.full((2,), float(value))})


def test_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        write_checkpoint(tmp_path, step, {"w.safetensors": writer(step)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert load_tensors(latest_checkpoint(tmp_path) / "w.safetensors")["x"][0] == 40


def test_a_kill_mid_write_leaves_the_previous_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 1, {"w.safetensors": writer(1)})
    script = f"""
import os, torch
from homediff.training.checkpoint import save_tensors, write_checkpoint
def half(p):
    save_tensors(p, {{"x": torch.zeros(1000)}})
    os._exit(9)  # killed while the checkpoint is being written
write_checkpoint({str(tmp_path)!r}, 2, {{"a.safetensors": half, "b.safetensors": half}})
"""
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == 9
    assert (tmp_path / "step-00000002.partial").exists()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    assert load_tensors(latest / "w.safetensors")["x"][0] == 1
    write_checkpoint(tmp_path, 2, {"w.safetensors": writer(2)})  # the next write replaces the debris
    assert not (tmp_path / "step-00000002.partial").exists()
    assert os.listdir(tmp_path / "step-00000002") == ["w.safetensors"]


def test_rng_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
