"""Resuming in another number of processes (``training.elastic``): the epoch's order goes on with
no sample repeated or skipped, grad_accum is scaled to keep the global batch (or the resume is
refused in one line), weights, optimiser and EMA carry over, with FSDP too; 2 → 1 and 1 → 2
processes train as the unbroken run does."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import (FSDP_ENV, as_earlier_version, assert_trained_alike, square_folder,
                           text_encoder_folder, tiny_config, torchrun, train_recording)

from homediff.data import EpochSampler, pack_folder
from homediff.errors import CheckpointError
from homediff.training.checkpoint import Checkpoint, load_tensors
from homediff.training.config import parse_toml
from homediff.training.elastic import keep_global_batches
from homediff.training.loop import Trainer

STAGE = {"resolution": 8, "steps": 4, "lr": 0.1, "tread_rate": 0.5}  # 8 images: 2 steps an epoch
TRAIN = {"keep_checkpoints": 0, "sample_prompts": []}
WORKER = Path(__file__).parents[1] / "elastic_worker.py"


@pytest.mark.parametrize("n", [10, 11, 12])
def test_the_sampler_deals_on_from_the_samples_taken_in_any_number_of_ranks(n):
    """``before`` ranks take ``taken`` batches each, then ``after`` ranks deal on from there: no
    sample twice, and together the epoch's order but for a tail shorter than one batch of every
    rank (any epoch leaves such a tail out). In as many ranks, each goes on as if unbroken."""
    order = list(EpochSampler(n, seed=5, rank=0, world_size=1))
    for batch in (1, 2, 3):
        for before in (1, 2, 3):
            unbroken = [list(EpochSampler(n, seed=5, rank=r, world_size=before)) for r in range(before)]
            for taken in range(n // (batch * before) + 1):
                first = [i for mine in unbroken for i in mine[:taken * batch]]
                start = taken * batch * before
                assert sorted(first) == sorted(order[:start])
                for after in (1, 2, 3):
                    second = []
                    for rank in range(after):
                        sampler = EpochSampler(n, seed=5, rank=rank, world_size=after)
                        sampler.set_epoch(0, start=start)
                        mine = list(sampler)
                        assert mine == order[start + rank::after][:len(mine)]
                        if after == before:
                            assert mine == unbroken[rank][taken * batch:]
                        second += mine[:len(mine) // batch * batch]  # whole batches
                    seen = first + second
                    end = start + (n - start) // (batch * after) * batch * after
                    assert len(set(seen)) == len(seen)
                    assert sorted(seen) == sorted(order[:end]) and n - end < batch * after


def test_grad_accum_follows_the_number_of_processes_or_the_resume_is_refused(tmp_path):
    stages = [{"resolution": 8, "batch_size": 4, "grad_accum": 2, "steps": 4},
              {"resolution": 8, "batch_size": 2, "grad_accum": 4, "steps": 4},
              {"resolution": 8, "batch_size": 2, "grad_accum": 6, "steps": 4}]
    config = tiny_config(tmp_path, tmp_path, stages=stages)
    fitted, line = keep_global_batches(config, 1, 2, 4)  # in stage 2; begun in 2 processes, now 4
    assert [stage.grad_accum for stage in fitted.stages] == [2, 2, 3]  # the finished stage stays
    assert line == ("2 processes → 4: stages[1].grad_accum 4 → 2 keeps the global batch of 16; "
                    "stages[2].grad_accum 6 → 3 keeps the global batch of 24")
    assert keep_global_batches(config, 0, 2, 2) == (config, "")
    assert keep_global_batches(config, 3, 2, 4) == (config, "")  # past the last stage
    assert [s.grad_accum for s in keep_global_batches(config, 0, 2, 1)[0].stages] == [4, 8, 12]
    with pytest.raises(CheckpointError) as refused:
        keep_global_batches(config, 0, 2, 8)
    assert str(refused.value) == (
        "cannot resume in 8 processes: the global batch of stages[0], 16 (batch_size 4 × grad_accum "
        "2 × 2 processes), would need grad_accum 1/2; resume in 1, 2 or 4 processes, or start a "
        "new run")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


@pytest.fixture(scope="module")
def unbroken(assets, tmp_path_factory):
    """One process of batch 4 through the stage, a checkpoint after each step: two processes of
    batch 2, or one of two micro-batches of 2, train alike (test_distributed, test_loop)."""
    config = tiny_config(*assets, stages=[{**STAGE, "batch_size": 4}],
                         train={**TRAIN, "checkpoint_every": 1})
    return train_recording(config, tmp_path_factory.mktemp("unbroken") / "run")


def merged(ranks: list[dict]) -> dict[int, list[str]]:
    """Each step's images over every rank."""
    return {int(step): sorted(keys + ranks[1]["images"][step]) for step, keys in ranks[0]["images"].items()}


def assert_continues(unbroken, images: dict[int, list[str]], losses, norms, final: Path) -> None:
    """Each step took the unbroken run's images (so the first epoch's 8 images once each, split
    between the runs before and after the resume) and trained alike."""
    assert {step: sorted(keys) for step, keys in images.items()} == {
        step: sorted(keys) for step, keys in unbroken.images.items()}
    first_epoch = images[0] + images[1]
    assert len(first_epoch) == len(set(first_epoch)) == 8
    assert_trained_alike(unbroken, losses, norms, load_tensors(final))


def assert_intact(run, checkpoint: Path) -> None:
    """The resumed trainer began with the checkpoint's weights and EMA."""
    saved = Checkpoint.load(checkpoint)
    assert all(torch.equal(run.initial[k], v) for k, v in saved.model.items())
    assert run.initial_ema["updates"] == saved.ema["updates"] == 1
    assert all(torch.equal(run.initial_ema["shadow"][k], v) for k, v in saved.ema["shadow"].items())


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_a_run_resumes_in_another_number_of_processes_as_if_unbroken(assets, unbroken, tmp_path,
                                                                      caplog, fsdp):
    """``down``: two processes of batch 2 take a step, one process goes on with grad_accum 2.
    ``up``: one process of 2 micro-batches of 2 takes a step, two go on with grad_accum 1 (under
    FSDP, sharding the checkpoint's whole tensors). Per-image draws make both comparable with the
    unbroken run, whose random states they cannot share."""
    data, text = assets
    up_config = tiny_config(*assets, stages=[{**STAGE, "batch_size": 2, "grad_accum": 2}], train=TRAIN)
    up_first = train_recording(up_config, tmp_path / "up", max_steps=1)
    tasks = {"down": True, "up": True}
    if not fsdp:
        pack_folder(data, tmp_path / "shards", shard_size=3)
        tasks.update(refused=str(unbroken.trainer.run_dir / "checkpoints" / "step-00000002"),
                     shards=str(tmp_path / "shards"))
    output = torchrun([["--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path), str(data),
                        str(text), json.dumps(STAGE), json.dumps(tasks)]], tmp_path / "logs", timeout=240,
                      env=FSDP_ENV if fsdp else None)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    down_config = tiny_config(*assets, stages=[{**STAGE, "batch_size": 2}],
                              train={**TRAIN, "checkpoint_every": 2})
    with caplog.at_level("INFO"):
        down = train_recording(down_config, tmp_path / "down", resume="latest")
    assert "2 processes → 1: stages[0].grad_accum 1 → 2 keeps the global batch of 4" in caplog.text
    assert "the checkpoint holds the random states of 2 processes, not 1" in caplog.text
    assert_intact(down, tmp_path / "down" / "checkpoints" / "step-00000001")
    two = [rank["down"] for rank in ranks]
    assert_continues(unbroken, {**merged(two), **down.images},
                     [(a + b) / 2 for a, b in zip(two[0]["losses"], two[1]["losses"])] + down.losses,
                     two[0]["norms"] + down.norms,
                     tmp_path / "down" / "checkpoints" / "step-00000004" / "model.safetensors")

    assert "1 process → 2: stages[0].grad_accum 2 → 1 keeps the global batch of 4" in output
    assert [rank["up"]["sharded"] for rank in ranks] == [fsdp, fsdp]
    assert ranks[0]["up"]["intact"] and all(rank["up"]["ema_intact"] for rank in ranks)
    two = [rank["up"] for rank in ranks]
    assert_continues(unbroken, {**up_first.images, **merged(two)},
                     up_first.losses + [(a + b) / 2 for a, b in zip(two[0]["losses"], two[1]["losses"])],
                     up_first.norms + two[0]["norms"],
                     tmp_path / "up" / "checkpoints" / "step-00000004" / "model.safetensors")
    if fsdp:
        return
    # the run goes on as begun: its checkpoints keep the config as given and the first number of
    # processes, so that resuming again in one process with the same config scales it again (and
    # restores the random states exactly, here from step 2 to the same end, bit for bit)
    saved = Checkpoint.load(tmp_path / "down" / "checkpoints" / "step-00000002")
    assert (saved.processes, saved.progress.processes) == (1, 2)
    assert parse_toml(saved.config)["stages"][0]["grad_accum"] == 1
    shutil.copytree(tmp_path / "down", tmp_path / "again")
    caplog.clear()
    with caplog.at_level("INFO"):
        again = train_recording(down_config, tmp_path / "again", resume=str(
            tmp_path / "again" / "checkpoints" / "step-00000002"))
    assert "2 processes → 1: stages[0].grad_accum 1 → 2" in caplog.text
    assert "random states" not in caplog.text
    assert again.losses == down.losses[1:]
    final = [load_tensors(tmp_path / run / "checkpoints" / "step-00000004" / "model.safetensors")
             for run in ("down", "again")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])

    assert ranks[0]["refused"].endswith(
        "step-00000002: cannot resume in 2 processes: the global batch of stages[0], 4 (batch_size 4 "
        "× grad_accum 1 × 1 process), would need grad_accum 1/2; resume in 1 process, or start a new run")
    shards = tiny_config(*assets, stages=[{**STAGE, "batch_size": 2}], train=TRAIN,
                         dataset={"path": str(tmp_path / "shards"), "workers": 0})
    with pytest.raises(CheckpointError, match=r"cannot resume in 1 process: this stage reads tar shards, "
                                              r"whose stream positions .* continue exactly only in 2 "
                                              r"processes"):
        Trainer(shards, tmp_path / "shards", resume="latest")


def test_a_checkpoint_that_counted_micro_batches_per_process_resumes_where_it_stood(unbroken, tmp_path):
    """Earlier versions saved the epoch's position as ``batch``, micro-batches per process, and
    not the number of processes the run began with."""
    saved = Checkpoint.load(unbroken.trainer.run_dir / "checkpoints" / "step-00000001")
    progress = {k: v for k, v in dataclasses.asdict(saved.progress).items()
                if k not in ("samples", "processes")}
    as_earlier_version(unbroken.trainer.run_dir / "checkpoints" / "step-00000001", tmp_path / "checkpoints",
                       {**progress, "batch": 1}, dataclasses.asdict(saved.precision))
    resumed = train_recording(unbroken.trainer.config, tmp_path, resume="latest")
    assert resumed.images == {step: keys for step, keys in unbroken.images.items() if step >= 1}
    final = [load_tensors(run / "checkpoints" / "step-00000004" / "model.safetensors")
             for run in (tmp_path, unbroken.trainer.run_dir)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])  # bit for bit
