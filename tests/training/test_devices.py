"""The trainer's state follows the model's device: checked on the "meta" device, which stands in
for a GPU here (tensors on it have a device and shapes but no data, and mixing them with CPU
tensors fails just as mixing CPU and CUDA tensors does)."""

import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.training.components import (build_autoencoder, build_ema, build_model, build_optimizer,
                                          build_text_encoder)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    return square_folder(root / "squares"), text_encoder_folder(root / "text")


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimiser's state but AdamW's step counts, which torch keeps on the CPU
    by design unless the optimiser is fused or capturable."""
    return [value for state in optimizer.state.values() for key, value in state.items()
            if torch.is_tensor(value) and key != "step"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_model_ema_and_optimizer_state_share_the_training_device(assets, optimizer):
    config = tiny_config(*assets, optimizer={"name": optimizer, "muon_dtype": "float32"})
    cpu, elsewhere = torch.device("cpu"), torch.device("meta")  # encoders here, training "elsewhere"
    text_encoder, autoencoder = build_text_encoder(config, cpu), build_autoencoder(config, cpu)
    model = build_model(config, text_encoder, autoencoder, elsewhere)
    ema = build_ema(config, model)
    optim = build_optimizer(config, config.stages[0], model,
                            torch.float32 if optimizer == "muon" else None, elsewhere)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optim.step()
    ema.update(model)

    tensors = {"model": list(model.state_dict().values()), "ema": list(ema.shadow.values()),
               "optimizer": optimizer_tensors(optim)}
    assert tensors["optimizer"], "the step created optimiser state"
    for name, values in tensors.items():
        assert {t.device.type for t in values} == {"meta"}, name
