"""What a run leaves, drawn from: the pipeline folder it exports, and a checkpoint of it before it
ends (``homediff generate --model RUN/checkpoints/step-N``)."""

import numpy as np
import pytest
from PIL import Image
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.app.cli import main
from homediff.pipeline import HomeDiffPipeline
from homediff.training.checkpoint import is_checkpoint_folder, list_checkpoints
from homediff.training.components import Builders
from homediff.training.loop import Trainer
from homediff.training.objective import training_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    config = tiny_config(square_folder(root / "squares"), text_encoder_folder(root / "text"),
                         stages=[{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 4, "tread_rate": 0.5}],
                         train={"checkpoint_every": 2})
    Trainer(config, root / "run").run()
    return root / "run"


def draw(model, out) -> np.ndarray:
    assert main(["generate", "a red square", "--model", str(model), "--out", str(out), "--steps", "2",
                 "--seed", "3", "--dtype", "float32"]) == 0
    return np.asarray(Image.open(out))


def test_the_last_checkpoint_draws_what_the_exported_folder_draws(run, tmp_path):
    first, last = list_checkpoints(run / "checkpoints")
    assert is_checkpoint_folder(last) and not is_checkpoint_folder(run / "model")
    from_checkpoint = draw(last, tmp_path / "checkpoint.png")
    assert np.array_equal(from_checkpoint, draw(run / "model", tmp_path / "folder.png"))
    # an earlier checkpoint holds other weights, and draws another image
    assert not np.array_equal(from_checkpoint, draw(first, tmp_path / "earlier.png"))


def test_a_stage_sees_its_text_length_and_the_encoder_is_left_as_configured(tmp_path):
    """A stage's text length reaches the loss through a view of the encoder; the encoder itself, which
    the exported folder holds, keeps the config's options."""
    root = tmp_path
    seen = []

    def loss(batch, parts, settings, generator):
        seen.append((parts.text_encoder.encode(batch["caption"]).shape[1],
                     trainer.text_encoder.config.max_length))
        return training_loss(batch, parts, settings, generator)
    config = tiny_config(square_folder(root / "squares"), text_encoder_folder(root / "text"),
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 1, "text_length": 4},
                                 {"resolution": 8, "batch_size": 4, "steps": 1, "text_length": 5}])
    trainer = Trainer(config, root / "run", builders=Builders(loss=loss))
    trainer.run()
    assert seen == [(4, 6), (5, 6)]  # (the stage's length, the shared encoder's), while training
    assert trainer.text_encoder.config == config.text_encoder.options
    assert HomeDiffPipeline.from_pretrained(root / "run" / "model").text_encoder.config.max_length == 6
