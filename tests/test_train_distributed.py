import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import square_folder, text_encoder_folder

from homediff.checkpoint import list_checkpoints


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # Muon splits its matrices between ranks
def test_two_processes_share_the_data_and_keep_identical_weights(tmp_path, optimizer):
    data = square_folder(tmp_path / "squares")
    text = text_encoder_folder(tmp_path / "text")
    worker = Path(__file__).parent / "distributed_worker.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29531", str(worker), str(tmp_path), str(data), str(text), optimizer],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # 4 steps × batch 2 per rank = 8 samples each: one epoch of the 8 images, split without overlap
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 8
    first_epoch = [set(r["keys"][:4]) for r in ranks]
    assert not first_epoch[0] & first_epoch[1]
    assert len(first_epoch[0] | first_epoch[1]) == 8
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-00000002", "step-00000004"]
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
