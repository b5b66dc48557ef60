"""Nothing lost: a run folder belongs to one run, checkpoints prove themselves and fall back, a
resume continues exactly or refuses, and a stop signal is honoured (fault injection included)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.data import pack_folder
from homediff.errors import CheckpointError, ConfigError, HomediffError
from homediff.training.checkpoint import Checkpoint, list_checkpoints, load_tensors, write_checkpoint
from homediff.training.components import Builders, build_stream
from homediff.training.config import to_toml
from homediff.training.loop import Trainer
from homediff.training.objective import training_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def steps(checkpoints: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(checkpoints)]


def test_a_new_run_does_not_write_over_another(assets, tmp_path):
    config = tiny_config(*assets, train={"checkpoint_every": 2, "sample_prompts": []},
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 4}])
    Trainer(config, tmp_path).run()
    assert steps(tmp_path / "checkpoints") == [2, 4]
    with pytest.raises(HomediffError, match=r"holds another run \(checkpoints up to step-00000004\): "
                                            r"continue it with --resume latest, or start again with "
                                            r"--overwrite"):
        Trainer(config, tmp_path)
    short = tiny_config(*assets, train={"checkpoint_every": 1, "sample_prompts": []},
                        stages=[{"resolution": 8, "batch_size": 4, "steps": 1}])
    Trainer(short, tmp_path, overwrite=True).run()
    assert steps(tmp_path / "checkpoints") == [1]  # the old run's step 4 would have won "latest"
    assert Trainer(short, tmp_path, resume="latest").progress.step == 1


def test_an_attempt_that_saved_no_checkpoint_leaves_the_folder_free(assets, tmp_path, caplog):
    """A first attempt that fails before training (a wrong dataset.path) leaves nothing; one that
    fails after some steps but before its first checkpoint leaves logs, which the next attempt
    clears, saying so: neither is a run to continue, so neither locks the folder."""
    stages = [{"resolution": 8, "batch_size": 4, "steps": 4}]
    wrong = tiny_config(tmp_path / "nowhere", assets[1], stages=stages)
    with pytest.raises(ConfigError, match="nowhere is not a folder"):
        Trainer(wrong, tmp_path / "run").run()
    assert not (tmp_path / "run").exists()

    def failing_at_step_3(batch, parts, settings, generator):
        if failing.progress.step == 3:
            raise RuntimeError("out of memory")
        return training_loss(batch, parts, settings, generator)
    config = tiny_config(*assets, stages=stages, train={"log_every": 1, "checkpoint_every": 4})
    failing = Trainer(config, tmp_path / "run", builders=Builders(loss=failing_at_step_3))
    with pytest.raises(RuntimeError, match="out of memory"):
        failing.run()
    assert len(os.listdir(tmp_path / "run" / "logs")) == 1 and not steps(tmp_path / "run" / "checkpoints")
    with caplog.at_level("WARNING"):
        Trainer(config, tmp_path / "run").run()
    assert "saved no checkpoint" in caplog.text
    assert steps(tmp_path / "run" / "checkpoints") == [4]
    assert len(os.listdir(tmp_path / "run" / "logs")) == 1  # the earlier attempt's curves are gone


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    for step in (100, 200):
        write_checkpoint(tmp_path, step, {"x.json": lambda p: p.write_text("{}")}, keep=1)
    written = write_checkpoint(tmp_path, 5, {"x.json": lambda p: p.write_text("{}")}, keep=1)
    assert written.is_dir() and steps(tmp_path) == [5, 200]


def test_a_checkpoint_at_the_same_step_is_replaced_whole(tmp_path):
    write_checkpoint(tmp_path, 3, {"a.json": lambda p: p.write_text("1")})
    write_checkpoint(tmp_path, 3, {"b.json": lambda p: p.write_text("2")})
    assert sorted(os.listdir(tmp_path / "step-00000003")) == ["b.json", "manifest.json"]
    assert sorted(os.listdir(tmp_path)) == ["step-00000003"]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif how == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        path.unlink()


@pytest.fixture(scope="module")
def two_checkpoints(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("two")
    config = tiny_config(*assets, train={"checkpoint_every": 2, "sample_prompts": []},
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 4}])
    Trainer(config, run).run()
    return config, run


@pytest.mark.parametrize("name", ["model.safetensors", "model_config.json", "ema.safetensors",
                                  "optimizer.safetensors", "data.json", "rng.safetensors",
                                  "progress.json", "config.toml", "manifest.json"])
@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_resume_falls_back_past_a_damaged_file(two_checkpoints, tmp_path, caplog, name, how):
    config, intact = two_checkpoints
    run = tmp_path / "run"
    os.system(f"cp -r {intact} {run}")
    damage(run / "checkpoints" / "step-00000004" / name, how)
    with caplog.at_level("WARNING"):
        path, checkpoint = Checkpoint.open(run / "checkpoints", "latest")
    assert path.name == "step-00000002" and checkpoint.progress.step == 2
    assert "step-00000004" in caplog.text and "skipping a damaged checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="step-00000004"):
        Checkpoint.load(run / "checkpoints" / "step-00000004")
    assert Trainer(config, run, resume="latest").progress.step == 2


def test_no_intact_checkpoint_is_a_clear_error(two_checkpoints, tmp_path):
    config, intact = two_checkpoints
    run = tmp_path / "run"
    os.system(f"cp -r {intact} {run}")
    for step in (2, 4):
        damage(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors", "truncate")
    with pytest.raises(CheckpointError, match="no intact checkpoint .*truncated or damaged"):
        Trainer(config, run, resume="latest")


def test_a_resume_that_would_not_continue_the_same_run_is_refused(two_checkpoints, assets, tmp_path):
    config, intact = two_checkpoints
    run = tmp_path / "run"
    os.system(f"cp -r {intact} {run}")
    wider = tiny_config(*assets, model={"overrides": {"dim": 64, "head_dim": 16, "mlp_dim": 64,
                                                      "depth": 1, "dec_blocks": 1}},
                        stages=[{"resolution": 8, "batch_size": 4, "steps": 4}])
    with pytest.raises(CheckpointError, match=r"the model differs \(dim 32 → 64\)"):
        Trainer(wider, run, resume="latest")
    bigger = tiny_config(*assets, stages=[{"resolution": 8, "batch_size": 8, "steps": 4}])
    with pytest.raises(CheckpointError, match=r"stages\[0\].batch_size was 4, now 8"):
        Trainer(bigger, run, resume=str(run / "checkpoints" / "step-00000002"))  # inside stage 1


def test_max_steps_is_at_most(two_checkpoints, tmp_path):
    config, intact = two_checkpoints
    run = tmp_path / "run"
    os.system(f"cp -r {intact} {run}")
    trainer = Trainer(config, run, resume=str(run / "checkpoints" / "step-00000004"), max_steps=2)
    assert trainer.run() is None and trainer.progress.step == 4
    assert steps(run / "checkpoints") == [2, 4]


def test_a_full_disk_leaves_no_partial_folder_and_a_message(tmp_path):
    """RLIMIT_FSIZE makes writes past 64 KiB fail as a full disk does (in a child process)."""
    script = f"""
import resource, signal, torch
from homediff.errors import CheckpointError
from homediff.training.checkpoint import save_tensors, write_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))
write_checkpoint({str(tmp_path)!r}, 1, {{"small.safetensors": lambda p: save_tensors(p, {{"x": torch.zeros(8)}})}})
try:
    write_checkpoint({str(tmp_path)!r}, 2, {{"big.safetensors": lambda p: save_tensors(p, {{"x": torch.zeros(10**5)}})}})
except CheckpointError as err:
    print("MESSAGE", err)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "MESSAGE" in result.stdout and "cannot write the checkpoint" in result.stdout
    assert "free disk space, then continue with --resume latest" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]


KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from homediff import atomic
from homediff.training import checkpoint
from homediff.training.config import load_config
from homediff.training.loop import Trainer
calls = {{"n": 0}}
def dying(module, target, counted):
    real = getattr(module, "fsync")
    def fsync(path):
        real(path)
        calls["n"] += counted(path)
        if calls["n"] == target:
            os._exit(9)
    setattr(module, "fsync", fsync)
if {where!r} == "after-rename":  # the flush of the checkpoints folder's entries after a rename
    dying(atomic, {at}, lambda path: os.path.basename(path) == "checkpoints")
else:
    dying(checkpoint, {at}, lambda path: True)
Trainer(load_config({config!r}), {run!r}).run()
"""


@pytest.mark.parametrize("where, at", [
    ("first-file", 10),      # the second checkpoint: its first file is on disk, nothing else
    ("between-files", 13),   # half of its files written
    ("before-rename", 18),   # every file and the manifest written, not yet renamed
    ("after-rename", 2),     # renamed, the folder entry not yet flushed
])
def test_killed_while_checkpointing_then_resumed_equals_the_whole_run(assets, tmp_path, where, at):
    """A checkpoint has 9 files (fsync'd one by one, then the manifest): call 10 is the first file
    of the second checkpoint, 18 its manifest. The run is killed there; a resume from the latest
    intact checkpoint then ends with the uninterrupted run's weights, bit for bit."""
    config = tiny_config(*assets, train={"checkpoint_every": 2, "sample_prompts": []},
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 6}])
    whole = Trainer(config, tmp_path / "whole")
    whole.run()
    config_file = tmp_path / "config.toml"
    config_file.write_text(to_toml(config))
    run = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(ROOT), where=where, at=at, config=str(config_file), run=str(run))
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert steps(run / "checkpoints")[-1] == (4 if where == "after-rename" else 2)
    resumed = Trainer(config, run, resume="latest")
    resumed.run()
    final, again = load_tensors(tmp_path / "whole" / "model.safetensors"), load_tensors(run / "model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert [loss for _, loss in resumed.progress.losses] == [loss for _, loss in whole.progress.losses]


def test_a_resume_at_a_stage_boundary_starts_the_next_stage_afresh(assets, tmp_path):
    """The next stage builds its own data stream and optimiser: a checkpoint at a stage's end
    must not hand them the finished stage's stream positions and Adam moments."""
    shards = tmp_path / "shards"
    pack_folder(assets[0], shards, shard_size=3)
    stages = [{"resolution": 8, "batch_size": 2, "steps": 3}, {"resolution": 8, "batch_size": 2, "steps": 3}]
    config = tiny_config(*assets, dataset={"path": str(shards), "workers": 0}, stages=stages)
    whole = Trainer(config, tmp_path / "whole")
    whole.run()
    Trainer(config, tmp_path / "split", max_steps=3).run()
    assert Checkpoint.load(list_checkpoints(tmp_path / "split" / "checkpoints")[-1]).data is None
    resumed = Trainer(config, tmp_path / "split", resume="latest")
    resumed.run()
    assert [loss for _, loss in resumed.progress.losses] == [loss for _, loss in whole.progress.losses]


def stream_that_signals(kind: int, when: int, then_wait: float = 0.0):
    """A data stream that sends this process ``kind`` before yielding batch ``when`` of the
    first epoch it serves, then stalls ``then_wait`` seconds (a slow loader)."""
    def build(config, index, device):
        stream = build_stream(config, index, device)
        real = stream.epoch

        def epoch(number, start):
            for i, batch in enumerate(real(number, start)):
                if i == when and number == 0:
                    os.kill(os.getpid(), kind)
                    time.sleep(then_wait)
                yield batch
        stream.epoch = epoch
        return stream
    return build


def test_a_stop_signal_while_waiting_for_data_stops_at_once_with_a_checkpoint(assets, tmp_path):
    config = tiny_config(*assets, train={"checkpoint_every": 100, "sample_prompts": []},
                         stages=[{"resolution": 8, "batch_size": 2, "steps": 50}])
    trainer = Trainer(config, tmp_path, builders=Builders(
        stream=stream_that_signals(signal.SIGTERM, when=2, then_wait=600)))
    assert trainer.run() is None  # the 600 s stall was cut short by the signal
    assert trainer.progress.step == 2 and steps(tmp_path / "checkpoints") == [2]


def test_a_second_stop_signal_stops_at_once(assets, tmp_path):
    def loss_with_two_signals(batch, parts, settings, generator):
        os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step
        os.kill(os.getpid(), signal.SIGINT)  # the second: now
        return torch.zeros((), requires_grad=True)
    config = tiny_config(*assets, stages=[{"resolution": 8, "batch_size": 2, "steps": 50}])
    trainer = Trainer(config, tmp_path, builders=Builders(loss=loss_with_two_signals))
    with pytest.raises(KeyboardInterrupt, match="second stop signal: stopped at once"):
        trainer.run()
    assert trainer.progress.step == 0 and not list_checkpoints(tmp_path / "checkpoints")
