"""``train.compile = true``: the trainer wraps the model in torch.compile and trains the same model."""

import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.training.checkpoint import load_tensors
from homediff.training.loop import Trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def test_compiled_training_computes_the_same_losses(assets, tmp_path):
    stages = [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 3, "tread_rate": 0.5}]
    runs = {}
    for compiled in (False, True):
        config = tiny_config(*assets, stages=stages, train={"compile": compiled},
                             optimizer={"name": "adamw"})
        trainer = Trainer(config, tmp_path / str(compiled))
        assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule) == compiled
        trainer.run()
        runs[compiled] = [loss for _, loss in trainer.progress.losses]
    # The first step sees the same weights and inputs; compiled kernels only reorder float32
    # sums over the model's depth: a few hundred float32 epsilons relative at most.
    assert runs[True][0] == pytest.approx(runs[False][0], rel=500 * torch.finfo(torch.float32).eps)
    assert len(runs[True]) == 3 and all(torch.isfinite(torch.tensor(runs[True])))
    # the exported backbone carries plain parameter names, not the compiled wrapper's
    exported = load_tensors(tmp_path / "True" / "model.safetensors")
    assert "in_patch.proj.weight" in exported and not any("_orig_mod" in k for k in exported)
