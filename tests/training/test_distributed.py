import json
import signal
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (assert_trained_alike, square_folder, text_encoder_folder, tiny_config,
                           torchrun, train_recording)

from homediff.training.checkpoint import Checkpoint, list_checkpoints

STAGE = {"resolution": 8, "steps": 4, "lr": 0.1, "tread_rate": 0.5}
WORKER = Path(__file__).parents[1] / "distributed_worker.py"
ADAMW = {"name": "adamw"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def worker(out: Path, assets, optimizer: dict) -> list[str]:
    """distributed_worker.py's arguments: 4 steps of batch 2 per process into ``out``."""
    return [str(WORKER), str(out), *map(str, assets), json.dumps({**STAGE, "batch_size": 2}),
            json.dumps(optimizer)]


@pytest.fixture(scope="module")
def one_machine(assets, tmp_path_factory):
    """``run(optimizer)``: the folder of two processes on one machine (torchrun --standalone, which
    finds a free port itself), each run once for the module."""
    runs = {}

    def run(optimizer: dict) -> Path:
        key = json.dumps(optimizer)
        if key not in runs:
            out = tmp_path_factory.mktemp("one-machine")
            torchrun([["--standalone", "--nproc_per_node", "2", *worker(out, assets, optimizer)]],
                     out / "logs", timeout=300)
            runs[key] = out
        return runs[key]
    return run


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


# Muon splits its matrices between ranks; its Newton-Schulz runs in float32 here, as bfloat16 would
# round the two runs' gradients to different neighbours now and then
@pytest.mark.parametrize("optimizer", [ADAMW, {"name": "muon", "muon_dtype": "float32"}])
def test_two_processes_train_as_one_with_their_batches_together(assets, one_machine, tmp_path, optimizer):
    """Two processes of batch 2 share out the data without overlap, keep identical weights, and
    train as one process of batch 4 over the same images does (``assert_trained_alike``): the
    sampler deals the shuffled order out in turn, so each step's two batches of 2 are the single
    process's batch of 4; the gradient is their mean, the loss the mean of their losses."""
    out = one_machine(optimizer)
    seen = ranks(out)
    assert [r["world"] for r in seen] == [2, 2]
    # 4 steps × batch 2 per rank = 8 samples each: the first 2 steps are one epoch of the 8 images
    first_epoch = [set(r["steps"]["0"] + r["steps"]["1"]) for r in seen]
    assert not first_epoch[0] & first_epoch[1]
    assert len(first_epoch[0] | first_epoch[1]) == 8
    weights = [load_file(out / f"weights-rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert seen[0]["norms"] == seen[1]["norms"]  # of the all-reduced gradient
    assert [p.name for p in list_checkpoints(out / "run" / "checkpoints")] == [
        "step-00000002", "step-00000004"]
    assert (out / "run" / "model" / "model_index.json").is_file()
    saved = Checkpoint.load(out / "run" / "checkpoints" / "step-00000004").rng
    assert len(saved) == 2  # each process resumes its own noise, times and routing
    assert not torch.equal(saved[0]["generator"], saved[1]["generator"])

    config = tiny_config(*assets, stages=[{**STAGE, "batch_size": 4}], optimizer=optimizer)
    one = train_recording(config, tmp_path / "one")
    together = {int(step): sorted(keys + seen[1]["steps"][step]) for step, keys in seen[0]["steps"].items()}
    assert together == {step: sorted(keys) for step, keys in one.images.items()}
    losses = [(a + b) / 2 for a, b in zip(seen[0]["losses"], seen[1]["losses"])]
    assert_trained_alike(one, losses, seen[0]["norms"], weights[0])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_machines_of_one_process_train_as_one_machine_of_two(assets, one_machine, tmp_path):
    """Two torchrun launchers of one process each meet through the c10d rendezvous at 127.0.0.1,
    as two machines do at the first one's address (the first hosts the rendezvous), and train the
    same weights, bit for bit, from the same images as one machine of two processes: the same two
    ranks do the same arithmetic, whichever launcher holds them."""
    endpoint = f"127.0.0.1:{free_port()}"
    launches = [["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv-backend",
                 "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "homediff-test", "--local-addr",
                 "127.0.0.1", "--rdzv-conf", f"is_host={node == 0}",
                 *worker(tmp_path, assets, ADAMW)] for node in (0, 1)]
    torchrun(launches, tmp_path / "logs", timeout=300)
    reference = one_machine(ADAMW)
    assert [r["world"] for r in ranks(tmp_path)] == [2, 2]
    assert [r["steps"] for r in ranks(tmp_path)] == [r["steps"] for r in ranks(reference)]
    for rank in (0, 1):
        name = f"weights-rank{rank}.safetensors"
        weights, expected = load_file(tmp_path / name), load_file(reference / name)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_resume_restores_every_process_s_own_random_states(assets, tmp_path):
    """Under DDP, as test_fsdp under FSDP (the same worker, without FSDP's settings): two processes
    train 6 steps unbroken, and 4 then a resume to 6. Each rank's losses after the resume are its
    unbroken ones, bit for bit, which needs its own noise, flow-time and routing states back."""
    worker = Path(__file__).parents[1] / "fsdp_worker.py"
    torchrun([["--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path), *map(str, assets)]],
             tmp_path / "logs", timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2 and rank["sharded"] == 0 and rank["resumed_at"] == 4
        assert [s for s, _ in rank["whole"]] == list(range(1, 7))
        assert rank["resumed"][4:] == rank["whole"][4:]


def test_a_stop_signal_to_one_process_stops_every_process_after_the_same_step(assets, tmp_path):
    """SIGTERM to the second process only, during step 3: both finish that step, the checkpoint
    is written once, and both return; a process that went on alone would wait for the other in
    its next step's gradient exchange until the timeout."""
    worker = Path(__file__).parents[1] / "stop_worker.py"
    torchrun([["--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path), *map(str, assets)]],
             tmp_path / "logs", timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["returned"], r["step"], r["signal"]) for r in ranks] == [(None, 3, None),
                                                                        (None, 3, signal.SIGTERM)]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000003"]
