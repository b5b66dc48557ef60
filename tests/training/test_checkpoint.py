import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import as_earlier_version

from homediff.errors import CheckpointError
from homediff.training.checkpoint import (Checkpoint, Precisions, Progress, list_checkpoints,
                                          load_tensors, load_tree, rng_state, save_tensors, save_tree,
                                          set_rng_state, write_checkpoint)


def writer(value):
    return lambda p: save_tensors(p, {"x": torch.full((2,), float(value))})


def test_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        write_checkpoint(tmp_path, step, {"w.safetensors": writer(step)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert load_tensors(list_checkpoints(tmp_path)[-1] / "w.safetensors")["x"][0] == 40


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
    latest = list_checkpoints(tmp_path)[-1]
    assert latest.name == "step-00000001"
    assert load_tensors(latest / "w.safetensors")["x"][0] == 1
    write_checkpoint(tmp_path, 2, {"w.safetensors": writer(2)})  # the next write replaces the debris
    assert not (tmp_path / "step-00000002.partial").exists()
    assert sorted(os.listdir(tmp_path / "step-00000002")) == ["manifest.json", "w.safetensors"]


def test_rng_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_optimizer_and_random_states_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr_scale": 0.5},
                                   {"params": [model.bias], "lr_scale": 1.0}], betas=(0.9, 0.95))
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    tree = {"optimizer": optimizer.state_dict(), "scaler": None, "rng": rng_state(),
            "mixed": [1, 2.5, "x", True, (3, 4), {7: "int key"}, np.float32(0.25)]}
    save_tree(tmp_path / "tree.safetensors", tree)
    back = load_tree(tmp_path / "tree.safetensors")

    again = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}])
    again.load_state_dict(back["optimizer"])  # int parameter ids and tensors restored
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(again.state[p][key], value), key
    assert again.param_groups[0]["lr_scale"] == 0.5 and tuple(again.param_groups[0]["betas"]) == (0.9, 0.95)
    assert back["mixed"] == [1, 2.5, "x", True, (3, 4), {7: "int key"}, 0.25]
    draws = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(back["rng"])  # python's tuple state, numpy's uint32 array, torch's bytes
    again_draws = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[:2] == again_draws[:2] and torch.equal(draws[2], again_draws[2])


def checkpoint_at(step: int) -> Checkpoint:
    return Checkpoint(progress=Progress(step=step, losses=[[1, 0.5]]),
                      precision=Precisions("cpu", None, "float32", "bfloat16"), model={"w": torch.full((2,), 1.0)},
                      model_config={"dim": 2}, config="[train]\nseed = 0\n",
                      optimizer={"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": []},
                                 "scaler": None},
                      ema={"decay": 0.999, "updates": 3, "shadow": {"w": torch.full((2,), 0.5)}},
                      data={"world": 1, "positions": {"0": 5}},
                      rng=[{"global": rng_state(), "generator": torch.Generator().get_state()}])


def test_a_checkpoint_is_one_file_per_part_and_loads_back(tmp_path):
    path = checkpoint_at(4).save(tmp_path)
    assert sorted(os.listdir(path)) == ["config.toml", "data.json", "ema.safetensors", "manifest.json",
                                        "model.safetensors", "model_config.json", "optimizer.safetensors",
                                        "progress.json", "rng.safetensors"]
    found, back = Checkpoint.open(tmp_path, "latest")
    assert found == path
    assert back.progress == Progress(step=4, losses=[[1, 0.5]])  # the run's one process recorded
    assert back.precision == Precisions("cpu", None, "float32", "bfloat16")
    assert back.ema["decay"] == 0.999 and back.ema["updates"] == 3
    assert torch.equal(back.ema["shadow"]["w"], torch.full((2,), 0.5))
    assert torch.equal(back.optimizer["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    assert back.data == {"world": 1, "positions": {"0": 5}} and back.config == "[train]\nseed = 0\n"
    assert torch.equal(back.rng[0]["generator"], torch.Generator().get_state())
    assert Checkpoint.read_step(path) == 4


def test_a_checkpoint_of_an_earlier_version_reads_as_this_one(tmp_path):
    """Earlier versions saved the epoch's position in micro-batches per process (``batch``), not the
    processes the run began with, and fewer precision choices: the position becomes samples by
    the batch size of the checkpoint's own config, the processes are those whose random states it
    holds, and the choices are made again (None)."""
    two = checkpoint_at(6)
    two.rng.append({"global": rng_state(), "generator": torch.Generator().get_state()})
    path = as_earlier_version(two.save(tmp_path / "now"), tmp_path / "then",
                              {"step": 6, "stage": 0, "epoch": 1, "batch": 5, "losses": []},
                              {"autocast": None}, config_toml="[[stages]]\nbatch_size = 3\n")
    back = Checkpoint.load(path)
    assert (back.progress.samples, back.progress.processes, back.progress.epoch) == (5 * 3 * 2, 2, 1)
    assert back.precision is None


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


def test_a_pickled_checkpoint_is_refused_without_being_read(tmp_path, monkeypatch):
    """A folder in the old format (``state.pt``), here a crafted one whose unpickling runs a shell
    command: refused with a message, and the command never runs."""
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "checkpoints" / "step-00000002"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(CheckpointError, match="pickled format of earlier homediff versions"):
        Checkpoint.open(tmp_path / "checkpoints", "latest")
    assert not (tmp_path / "ran-code").exists()
    with pytest.raises(CheckpointError, match="no readable manifest.json: not a complete checkpoint"):
        Checkpoint.open(tmp_path, str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        Checkpoint.open(tmp_path / "nowhere", "latest")
