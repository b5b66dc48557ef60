import itertools
from types import SimpleNamespace

import pytest
from PIL import Image
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.app.demo import fit_to_budget, recipe, run_demo, sample_sheet, train_for
from homediff.errors import HomediffError
from homediff.figures import labelled_grid
from homediff.pipeline import HomeDiffPipeline
from homediff.training import timing
from homediff.training.checkpoint import list_checkpoints
from homediff.training.config import load_config
from homediff.training.loop import Trainer


def test_packaged_recipes_load():
    for name in ("tiny-emoji", "tiny-shapes", "tiny-scenes", "hdm-xut-base", "finetune-lora-emoji",
                 "hdm-finetune-lora"):
        assert load_config(recipe(name)).stages
    tiny, finetune = load_config(recipe("tiny-emoji")), load_config(recipe("finetune-lora-emoji"))
    for section in ("model", "text_encoder", "autoencoder"):  # the demo model's own shape
        assert getattr(finetune, section) == getattr(tiny, section), section


def test_fit_to_budget_sets_the_stage_length(tmp_path, monkeypatch):
    """The probe's clock reads 0.05 s more at each micro-batch, so 6 s fit 120 steps on any
    machine; the warm-up is cut to a tenth of them."""
    config = tiny_config(square_folder(tmp_path / "sq"), text_encoder_folder(tmp_path / "te"),
                         optimizer={"warmup_steps": 50})
    ticks = itertools.count()
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: 0.05 * next(ticks)))
    steps = fit_to_budget(config, minutes=0.1)
    assert config.stages[0].steps == steps == 120
    assert config.optimizer.warmup_steps == 12


def test_training_for_a_time_budget_in_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tiny_config(square_folder(tmp_path / "sq"), text_encoder_folder(tmp_path / "te"),
                         train={"sample_prompts": [], "checkpoint_every": 10**6})
    config.stages[0].steps = 10**6  # the budget, not the stage length, ends this run
    steps = train_for(config, tmp_path / "run", minutes=0.1, processes=2)
    assert 10 <= steps < 10**6
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [f"step-{steps:08d}"]
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
    # again into the same folder: every process must pass the deletion's barrier, whatever it saw
    again = train_for(config, tmp_path / "run", minutes=0.05, processes=2, overwrite=True)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [f"step-{again:08d}"]


def test_the_sample_sheet_shows_seen_and_heldout_prompts(tmp_path):
    data = tmp_path / "data"
    square_folder(data / "train")
    held = data / "heldout"
    held.mkdir()
    (held / "x.png").write_bytes((data / "train" / "00.png").read_bytes())
    (held / "x.txt").write_text("a red square")
    config = tiny_config(data / "train", text_encoder_folder(tmp_path / "te"),
                         stages=[{"resolution": 8, "batch_size": 4, "steps": 2}])
    pipe = HomeDiffPipeline.from_pretrained(Trainer(config, tmp_path / "run").run())
    samples = Image.open(sample_sheet(pipe, data, tmp_path, seeds=2, rows=3, steps=2))
    assert samples.size == (260 + 2 * 16, 4 * 16)  # 3 seen rows and 1 held-out row of 2 seeds


def test_labelled_grid_layout():
    tile = Image.new("RGB", (8, 8), "red")
    sheet = labelled_grid([("a", [tile, tile]), ("b", [tile])], scale=2)
    assert sheet.size == (260 + 2 * 16, 2 * 16)
    assert sheet.getpixel((260 + 1, 1)) == (255, 0, 0)
    assert sheet.getpixel((260 + 20, 20)) == (255, 255, 255)  # row b has one image


def test_a_second_demo_into_the_same_folder_asks_for_overwrite(tmp_path):
    (tmp_path / "demo" / "model").mkdir(parents=True)
    with pytest.raises(HomediffError, match="holds an earlier run: `homediff demo --overwrite` "
                                            "replaces it"):
        run_demo(tmp_path / "demo", minutes=0.1, data=tmp_path / "no-data")
    assert not (tmp_path / "no-data").exists()  # refused before building anything
