"""``train.compile = true``: the trainer wraps the model in torch.compile and trains the same model."""

import pytest
import torch
from torch._inductor.utils import fresh_cache
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.training.checkpoint import load_tensors
from homediff.training.loop import Trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def _train(assets, folder, compiled: bool) -> list[float]:
    stages = [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 3, "tread_rate": 0.5}]
    config = tiny_config(*assets, stages=stages, train={"compile": compiled},
                         optimizer={"name": "adamw"})
    trainer = Trainer(config, folder / str(compiled))
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule) == compiled
    trainer.run()
    return [loss for _, loss in trainer.progress.losses]


def test_compiled_training_computes_the_same_losses(assets, tmp_path):
    # Kernels come from a cache of this test's own, never ones another run compiled, perhaps for
    # another instruction set (the AVX2 pass follows the native one on the same machine).
    with fresh_cache(dir=str(tmp_path)):
        runs = {compiled: _train(assets, tmp_path, compiled) for compiled in (False, True)}
    # The first step sees the same weights and inputs; compiled kernels only reorder float32
    # sums over the model's depth: a few hundred float32 epsilons relative at most.
    assert runs[True][0] == pytest.approx(runs[False][0], rel=500 * torch.finfo(torch.float32).eps)
    assert len(runs[True]) == 3 and all(torch.isfinite(torch.tensor(runs[True])))
    # the exported backbone carries plain parameter names, not the compiled wrapper's
    exported = load_tensors(tmp_path / "True" / "model.safetensors")
    assert "in_patch.proj.weight" in exported and not any("_orig_mod" in k for k in exported)
