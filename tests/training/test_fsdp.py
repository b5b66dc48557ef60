"""FSDP in two CPU processes over gloo: training, checkpoints, resuming, and Muon refused."""

import json
from pathlib import Path

import torch
from train_helpers import FSDP_ENV, square_folder, text_encoder_folder, torchrun

from homediff.models import XUT, XUTConfig
from homediff.training.checkpoint import list_checkpoints, load_tensors


def test_fsdp_in_two_cpu_processes_trains_and_resumes_like_the_unbroken_run(tmp_path):
    data = square_folder(tmp_path / "squares")
    text = text_encoder_folder(tmp_path / "text")
    worker = Path(__file__).parents[1] / "fsdp_worker.py"
    # --standalone picks a free port; 10-20 s on two shared cores
    torchrun([["--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path), str(data), str(text)]],
             tmp_path / "logs", timeout=120, env=FSDP_ENV)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["sharded"] == rank["parameters"] > 0  # every parameter is an FSDP shard (DTensor)
        assert rank["resumed_at"] == 4
        assert [s for s, _ in rank["whole"]] == list(range(1, 7))
        assert rank["resumed"][4:] == rank["whole"][4:]  # each rank's own steps after the resume
        assert "Muon" in rank["muon"] and "adamw" in rank["muon"]
    assert ranks[0]["resumed"] == ranks[0]["whole"]  # the checkpoint keeps the first rank's history

    for run in ("whole", "split"):
        assert [p.name for p in list_checkpoints(tmp_path / run / "checkpoints")] == [
            "step-00000002", "step-00000004", "step-00000006"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    for name in ("checkpoints/step-00000006/model.safetensors",
                 "checkpoints/step-00000006/ema.safetensors", "model.safetensors"):
        a, b = load_tensors(whole / name), load_tensors(split / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit for bit
    # whole tensors, as without FSDP: the exported backbone loads into a plain XUT
    start = load_tensors(whole / "checkpoints/step-00000002/model.safetensors")
    final = load_tensors(whole / "checkpoints/step-00000006/model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in final)
    config = json.loads((whole / "checkpoints/step-00000006/model_config.json").read_text())
    XUT(XUTConfig.from_dict(config)).load_state_dict(load_tensors(whole / "model.safetensors"))
    assert (whole / "model" / "model_index.json").is_file()
