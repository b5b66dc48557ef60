import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (assert_trained_alike, square_folder, text_encoder_folder, tiny_config,
                           train_recording)

from homediff.training.checkpoint import Checkpoint, list_checkpoints

STAGE = {"resolution": 8, "steps": 4, "lr": 0.1, "tread_rate": 0.5}


# Muon splits its matrices between ranks; its Newton-Schulz runs in float32 here, as bfloat16 would
# round the two runs' gradients to different neighbours now and then
@pytest.mark.parametrize("optimizer", [{"name": "adamw"}, {"name": "muon", "muon_dtype": "float32"}])
def test_two_processes_train_as_one_with_their_batches_together(tmp_path, optimizer):
    """Two processes of batch 2 share out the data without overlap, keep identical weights, and
    train as one process of batch 4 over the same images does (``assert_trained_alike``): the
    sampler deals the shuffled order out in turn, so each step's two batches of 2 are the single
    process's batch of 4; the gradient is their mean, the loss the mean of their losses."""
    data = square_folder(tmp_path / "squares")
    text = text_encoder_folder(tmp_path / "text")
    worker = Path(__file__).parents[1] / "distributed_worker.py"
    # --standalone: torchrun finds a free port itself; one thread each, not two on every core
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", str(worker), str(tmp_path), str(data), str(text),
                             json.dumps({**STAGE, "batch_size": 2}), json.dumps(optimizer)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # 4 steps × batch 2 per rank = 8 samples each: the first 2 steps are one epoch of the 8 images
    first_epoch = [set(r["steps"]["0"] + r["steps"]["1"]) for r in ranks]
    assert not first_epoch[0] & first_epoch[1]
    assert len(first_epoch[0] | first_epoch[1]) == 8
    weights = [load_file(tmp_path / f"weights-rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert ranks[0]["norms"] == ranks[1]["norms"]  # of the all-reduced gradient
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-00000002", "step-00000004"]
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
    saved = Checkpoint.load(tmp_path / "run" / "checkpoints" / "step-00000004").rng
    assert len(saved) == 2  # each process resumes its own noise, times and routing
    assert not torch.equal(saved[0]["generator"], saved[1]["generator"])

    config = tiny_config(data, text, stages=[{**STAGE, "batch_size": 4}], optimizer=optimizer)
    one = train_recording(config, tmp_path / "one")
    together = {int(step): sorted(keys + ranks[1]["steps"][step]) for step, keys in ranks[0]["steps"].items()}
    assert together == {step: sorted(keys) for step, keys in one.images.items()}
    losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert_trained_alike(one, losses, ranks[0]["norms"], weights[0])
