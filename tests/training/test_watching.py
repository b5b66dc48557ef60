"""Watching a run: sample sheets, the held-out loss, the config in TensorBoard."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import (
    COLOURS,
    EPS32,
    square_folder,
    text_encoder_folder,
    tiny_config,
)

from homediff.errors import ConfigError
from homediff.figures import HEADER, LABEL_BAND, SHEET_TILE, sample_sheet
from homediff.training.components import Components
from homediff.training.loop import Trainer
from homediff.training.objective import LossSettings, training_loss
from homediff.training.validation import VAL_SEED, held_out_batches, validation_loss

HELD_OUT = ["red", "blue", "cyan"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A data set in the layout the built-in sets have: train/ and, beside it, heldout/ with three
    images (small squares) none of which is in train/."""
    root = tmp_path_factory.mktemp("watching")
    train = square_folder(root / "set" / "train")
    held = root / "set" / "heldout"
    held.mkdir()
    for i, name in enumerate(HELD_OUT):
        image = Image.new("RGB", (20, 20), "white")
        image.paste(COLOURS[name], (6, 6, 14, 14))
        image.save(held / f"held-{i}.png")
        (held / f"held-{i}.txt").write_text(f"a {name} square")
    return train, text_encoder_folder(root / "text")


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run_dir / "logs")).Reload()
    return [(event.step, event.value) for event in logs.Scalars(tag)]


def test_a_sheet_has_a_tile_and_a_label_band_per_image():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    sheet = sample_sheet([("a red square", [red, red, red]), ("a blue square", [blue, blue, blue])],
                         ["seed 0", "seed 1", "seed 2"], title="step 5")
    tile = SHEET_TILE  # 8 px enlarged 16 times
    assert sheet.size == (3 * tile, HEADER + 2 * (tile + LABEL_BAND))
    pixels = np.asarray(sheet)
    for column in range(3):
        left = column * tile
        assert (pixels[HEADER:HEADER + tile, left:left + tile] == (255, 0, 0)).all()
        second = HEADER + tile + LABEL_BAND
        assert (pixels[second:second + tile, left:left + tile] == (0, 0, 255)).all()
        for top in (HEADER + tile, second + tile):  # the prompt is written under every image
            band = pixels[top:top + LABEL_BAND, left:left + tile]
            assert (band < 128).any() and (band == 255).mean() > 0.5
    assert (pixels[:HEADER] < 128).any()  # the title and the seeds


def test_a_long_prompt_is_cut_to_the_label_band():
    tile = Image.new("RGB", (40, 40), "white")
    long = " ".join(["construction"] * 40)
    sheet = sample_sheet([(long, [tile])], ["seed 0"])
    assert sheet.size == (4 * 40, HEADER + 4 * 40 + LABEL_BAND)  # 40 px enlarged 4 times
    band = np.asarray(sheet)[HEADER + 4 * 40:]
    assert (band[-3:] == 255).all()  # nothing written past the band's last line


def test_sheets_come_every_sample_every_steps_and_at_the_stage_end(assets, tmp_path):
    """Sheets at steps 4, 8 and 10 (the end), each 2 prompts by 2 seeds of 8 px images; the image
    of (prompt, seed) is the one a single pipeline call with that seed draws."""
    prompts, seeds = ["a red square", "a blue square"], [0, 3]
    config = tiny_config(*assets, train={"sample_prompts": prompts, "sample_seeds": seeds,
                                         "sample_every": 4, "sample_steps": 2, "val_every": 0})
    trainer = Trainer(config, tmp_path)
    trainer.run()
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["step-00000004.png", "step-00000008.png", "step-00000010.png"]
    sheet = Image.open(tmp_path / "samples" / files[-1])
    tile = SHEET_TILE
    assert sheet.size == (len(seeds) * tile, HEADER + len(prompts) * (tile + LABEL_BAND))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(tmp_path / "logs")).Reload()
    assert [event.step for event in logs.Images("samples")] == [4, 8, 10]

    pipe = trainer.pipeline()  # the final weights: those of the last sheet
    scale = tile // 8
    for row, prompt in enumerate(prompts):
        for column, seed in enumerate(seeds):
            alone = pipe(prompt, num_inference_steps=2, guidance_scale=config.train.sample_cfg,
                         generator=torch.Generator().manual_seed(seed)).images[0]
            top = HEADER + row * (tile + LABEL_BAND)
            drawn = np.asarray(sheet)[top:top + tile:scale, column * tile:(column + 1) * tile:scale]
            # a batch and a single image differ in float32 rounding: at most one 8-bit level
            assert np.abs(drawn.astype(int) - np.asarray(alone).astype(int)).max() <= 1


def test_sample_every_zero_draws_at_stage_ends_only(assets, tmp_path):
    config = tiny_config(*assets, train={"sample_prompts": ["a red square"], "sample_every": 0,
                                         "sample_steps": 2, "val_every": 0},
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 3},
                                 {"resolution": 16, "batch_size": 2, "steps": 2}])
    Trainer(config, tmp_path).run()
    sheets = {p.name: Image.open(p).size for p in (tmp_path / "samples").iterdir()}
    # each stage's sheet at its own resolution: 8 px enlarged 16 times, 16 px 8 times
    assert sheets == {"step-00000003.png": (4 * SHEET_TILE, HEADER + SHEET_TILE + LABEL_BAND),
                      "step-00000005.png": (4 * SHEET_TILE, HEADER + SHEET_TILE + LABEL_BAND)}


def test_the_held_out_folder_beside_the_training_one_is_the_default(assets, tmp_path):
    train, text = assets
    assert tiny_config(train, text).dataset.val_path == str(train.parent / "heldout")
    alone = square_folder(tmp_path / "alone" / "train")
    assert tiny_config(alone, text).dataset.val_path == ""
    assert tiny_config(train, text, dataset={"path": str(train), "val_path": ""}).dataset.val_path == ""
    for key, value, match in (("val_every", -1, "val_every must be >= 0"),
                              ("sample_seeds", [], "sample_seeds must list at least one seed")):
        with pytest.raises(ConfigError, match=match):
            tiny_config(train, text, train={key: value})


def test_held_out_images_are_never_trained_on(assets, tmp_path):
    train, text = assets
    config = tiny_config(train, text, train={"val_every": 2},
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 6}])
    trained = set()
    trainer = Trainer(config, tmp_path)
    trainer.run(callback=lambda progress, batch: trained.update(Path(k).resolve() for k in batch["key"]))
    held = {Path(k).resolve() for batch in trainer.held_out for k in batch["key"]}
    assert held == {(train.parent / "heldout" / f"held-{i}.png").resolve() for i in range(3)}
    assert len(trained) == 8 and not trained & held

    overlapping = tiny_config(train, text, dataset={"path": str(train.parent), "workers": 0,
                                                    "val_path": str(train.parent / "heldout")})
    with pytest.raises(ConfigError, match="shares 3 images with dataset.path"):
        Trainer(overlapping, tmp_path / "overlap", max_steps=1).run()
    missing = tiny_config(train, text, dataset={"path": str(train), "workers": 0,
                                                "val_path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="nowhere is not a folder"):
        Trainer(missing, tmp_path / "missing", max_steps=1).run()


def test_the_validation_loss_depends_on_the_weights_alone(assets, tmp_path):
    """Two evaluations of the same weights agree exactly; other weights give another number; it
    is the training loss at the validation seed's draws, with no routing."""
    config = tiny_config(*assets, dataset={"path": str(assets[0]), "workers": 0, "val_images": 2})
    trainer = Trainer(config, tmp_path)
    batches = held_out_batches(config.dataset, 8, 4)
    assert [batch["caption"] for batch in batches] == [["a red square", "a cyan square"]]  # evenly spaced
    parts = Components(trainer.model, trainer.text_encoder, trainer.autoencoder)
    settings = LossSettings.of(config, config.stages[0], None)
    model = trainer.unwrapped
    first = validation_loss(model, batches, parts, settings, trainer.device)
    assert validation_loss(model, batches, parts, settings, trainer.device) == first
    direct = training_loss(batches[0], parts, LossSettings(tread_rate=0.0),
                           torch.Generator().manual_seed(VAL_SEED))
    assert first == direct.item()
    with torch.no_grad():  # every tensor: the output layer starts at zero, hiding the others
        for parameter in model.parameters():
            parameter.add_(0.01)
    assert validation_loss(model, batches, parts, settings, trainer.device) != first


def test_the_held_out_loss_is_logged_and_leaves_training_alone(assets, tmp_path):
    """Every 3 steps and at the end (10), of the EMA weights, in the progress, TensorBoard and
    loss.png; the training losses are those of a run without sheets or held-out loss, bit for bit."""
    watched = tiny_config(*assets, train={"val_every": 3, "sample_every": 5, "sample_steps": 2,
                                          "sample_prompts": ["a red square"]})
    trainer = Trainer(watched, tmp_path / "watched")
    trainer.run()
    steps = [step for step, _ in trainer.progress.val_losses]
    assert steps == [3, 6, 9, 10]
    logged = scalars(tmp_path / "watched", "val/loss")  # in float32
    assert [step for step, _ in logged] == steps
    assert [value for _, value in logged] == pytest.approx([v for _, v in trainer.progress.val_losses],
                                                           rel=EPS32, abs=0)
    assert all(math.isfinite(loss) for _, loss in trainer.progress.val_losses)
    final = validation_loss(trainer.pipeline().transformer, trainer.held_out,
                            Components(trainer.model, trainer.text_encoder, trainer.autoencoder),
                            LossSettings.of(watched, watched.stages[0], None), trainer.device)
    assert trainer.progress.val_losses[-1][1] == final  # the EMA weights at the end

    plain = tiny_config(*assets, dataset={"path": str(assets[0]), "workers": 0, "val_path": ""},
                        train={"sample_every": 0})
    alone = Trainer(plain, tmp_path / "plain")
    alone.run()
    assert trainer.progress.losses == alone.progress.losses and not alone.progress.val_losses


def test_a_resumed_run_has_the_held_out_losses_of_the_uninterrupted_one(assets, tmp_path):
    config = tiny_config(*assets, train={"val_every": 2},
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 8, "tread_rate": 0.5}])
    whole = Trainer(config, tmp_path / "whole")
    whole.run()
    Trainer(config, tmp_path / "split", max_steps=5).run()
    resumed = Trainer(config, tmp_path / "split", resume="latest")
    assert [step for step, _ in resumed.progress.val_losses] == [2, 4]
    resumed.run()
    assert [tuple(pair) for pair in resumed.progress.val_losses] == whole.progress.val_losses  # bit for bit
    assert [step for step, _ in whole.progress.val_losses] == [2, 4, 6, 8]


def test_the_resolved_config_is_text_in_tensorboard(assets, tmp_path):
    """The config as the run resolved it: the held-out folder found beside the training one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(*assets, train={"val_every": 0}, stages=[{"resolution": 8, "batch_size": 4, "steps": 1}])
    Trainer(config, tmp_path).run()
    logs = EventAccumulator(str(tmp_path / "logs")).Reload()
    text = logs.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f'val_path = "{assets[0].parent / "heldout"}"' in text and "val_every = 0" in text
