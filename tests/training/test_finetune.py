"""Fine-tuning: a run starts from saved weights exactly, refuses weights that do not fit, and with
[lora] trains only adapters that checkpoints, resume and the exported model carry."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_components import RELEASE_MEAN, hdm_release
from train_helpers import COLOURS, square_folder, text_encoder_folder, tiny_config

from homediff.errors import CheckpointError
from homediff.pipeline import HomeDiffPipeline
from homediff.training.checkpoint import Checkpoint, load_tensors
from homediff.training.loop import Trainer

STAGE = {"resolution": 8, "batch_size": 8, "lr": 0.5, "steps": 400, "tread_rate": 0.0}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model trained on the eight coloured squares: its run folder and config."""
    root = tmp_path_factory.mktemp("finetune")
    data, text = square_folder(root / "squares"), text_encoder_folder(root / "text")
    config = tiny_config(data, text, stages=[STAGE], ema={"enabled": False},
                         optimizer={"warmup_steps": 10})
    Trainer(config, root / "base").run()
    return root, config


def concept_folder(root: Path) -> Path:
    """Eight images of a new concept: a magenta square captioned with a word the model never saw."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        image = Image.new("RGB", (24 + 8 * (i % 3), 24), "white")
        image.paste((230, 20, 230), (4, 4, 20, 20))
        image.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text("a zorp square")
    return root


def finetune_config(pretrained, data, **sections):
    root, base = pretrained
    sections = {"ema": {"enabled": False}, "init": {"from": str(root / "base" / "model")}, **sections}
    return tiny_config(data, Path(base.text_encoder.name), **sections)


def test_a_finetune_starts_from_exactly_the_saved_weights(pretrained, tmp_path):
    root, _ = pretrained
    saved = HomeDiffPipeline.from_pretrained(root / "base" / "model")
    for source in (root / "base" / "model", root / "base" / "model.safetensors"):
        config = finetune_config(pretrained, concept_folder(tmp_path / "zorp"),
                                 init={"from": str(source)}, stages=[{**STAGE, "steps": 2}])
        trainer = Trainer(config, tmp_path / source.name)
        start = trainer.unwrapped.state_dict()
        assert all(torch.equal(start[k], v) for k, v in saved.transformer.state_dict().items()), source
    folder = saved.text_encoder.model.state_dict()
    assert all(torch.equal(v, folder[k]) for k, v in trainer.text_encoder.model.state_dict().items())


def test_weights_that_do_not_fit_the_config_are_named(pretrained, tmp_path):
    config = finetune_config(pretrained, concept_folder(tmp_path / "zorp"),
                             model={"overrides": {"dim": 64, "head_dim": 16, "mlp_dim": 64, "depth": 1,
                                                  "dec_blocks": 1}})
    with pytest.raises(CheckpointError, match=r"does not fit this XUT config:\n.*shape mismatches"):
        Trainer(config, tmp_path / "run")
    missing = finetune_config(pretrained, tmp_path, init={"from": str(tmp_path / "nothing")})
    with pytest.raises(CheckpointError, match="nothing: no such file or folder"):
        Trainer(missing, tmp_path / "run2")


LORA = {"rank": 4, "alpha": 4.0, "targets": ["attention", "cross_attention", "mlp"]}


def test_lora_trains_only_the_adapters_and_its_files_carry_them(pretrained, tmp_path):
    root, _ = pretrained
    config = finetune_config(pretrained, concept_folder(tmp_path / "zorp"), lora=LORA,
                             stages=[{**STAGE, "steps": 6, "lr": 0.1}], train={"checkpoint_every": 3})
    trainer = Trainer(config, tmp_path / "run")
    out = trainer.run()
    base = HomeDiffPipeline.from_pretrained(root / "base" / "model").transformer.state_dict()
    from homediff.models import lora
    assert all(torch.equal(v, base[k]) for k, v in lora.base_state(trainer.unwrapped).items())
    adapter = lora.adapter_state(trainer.unwrapped)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters trained
    saved = Checkpoint.load(tmp_path / "run" / "checkpoints" / "step-00000003")  # inside the stage
    assert saved.model and all(".lora_" in k for k in saved.model)
    assert len(saved.optimizer["optimizer"]["state"]) == len(saved.model)
    pipe = HomeDiffPipeline.from_pretrained(out)
    assert pipe.get_active_adapters() == ["default"]
    settings, state = lora.read_adapter(tmp_path / "run" / "lora.safetensors")
    assert settings.rank == 4 and state.keys() == adapter.keys()

    split = Trainer(config, tmp_path / "split", max_steps=3)
    split.run()
    resumed = Trainer(config, tmp_path / "split", resume="latest")
    assert resumed.progress.step == 3
    resumed.run()
    assert [x for _, x in resumed.progress.losses] == [x for _, x in trainer.progress.losses]
    final, again = load_tensors(tmp_path / "run" / "lora.safetensors"), load_tensors(
        tmp_path / "split" / "lora.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)


def images(pipe, caption: str, seeds=range(4)) -> torch.Tensor:
    return torch.cat([pipe(caption, height=8, width=8, num_inference_steps=8, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(s), output_type="pt").images
                      for s in seeds])


def test_a_lora_learns_a_new_caption_and_leaves_the_others(pretrained, tmp_path):
    """Trained on the new concept beside the squares the model knew (the usual prior preservation),
    images of "a zorp square" move towards the concept (their mean squared distance to its mean
    image at least halves), while the images of the eight colours the model knew move, on average,
    less than three quarters as far as the new caption's (the same seeds before and after)."""
    root, _ = pretrained
    concept = concept_folder(tmp_path / "data" / "2_zorp")
    square_folder(tmp_path / "data" / "1_squares")
    config = finetune_config(pretrained, tmp_path / "data", lora=LORA,
                             stages=[{**STAGE, "steps": 200, "lr": 0.05}])
    before = HomeDiffPipeline.from_pretrained(root / "base" / "model")
    after = HomeDiffPipeline.from_pretrained(Trainer(config, tmp_path / "run").run())
    for pipe in (before, after):
        pipe.set_progress_bar_config(disable=True)
    new_before, new_after = images(before, "a zorp square"), images(after, "a zorp square")
    zorp = mean_image(concept)
    assert distance(new_after, zorp) < 0.5 * distance(new_before, zorp)
    moved_new = distance(new_after, new_before)
    moved = [distance(images(after, f"a {colour} square"), images(before, f"a {colour} square"))
             for colour in COLOURS]
    assert sum(moved) / len(moved) < 0.75 * moved_new, (moved, moved_new)


def mean_image(folder: Path, pattern: str = "*.png") -> torch.Tensor:
    """The mean of the folder's images at 8×8, as the model's training crops see them."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize(
        (8, 8), Image.Resampling.BICUBIC))).permute(2, 0, 1).float() / 255
        for p in sorted(folder.glob(pattern))]).mean(0)


def distance(generated: torch.Tensor, reference: torch.Tensor) -> float:
    return (generated - reference).square().mean().item()


def test_a_finetune_can_start_from_a_released_hdm_file(tmp_path):
    """The release layout (backbone under unet.model., VAE and text-encoder tensors beside it): the
    trainer's backbone, text encoder and autoencoder hold the file's weights."""
    files = hdm_release(tmp_path)
    overrides = {"patch_size": 2, "dim": 128, "head_dim": 32, "mlp_dim": 320, "depth": 2, "enc_blocks": 1,
                 "dec_blocks": 2, "tread_pre_blocks": 1, "tread_post_blocks": 1, "skip": "last",
                 "pooled_text": False, "aspect_embedding": True}
    config = tiny_config(square_folder(tmp_path / "squares"), files.text_encoder,
                         model={"preset": "xut-tiny", "overrides": overrides},
                         autoencoder={"name": str(files.vae_config)},
                         init={"from": str(files.checkpoint), "arch": str(files.arch)},
                         stages=[{"resolution": 32, "batch_size": 2, "steps": 1}])
    trainer = Trainer(config, tmp_path / "run")
    state = trainer.unwrapped.state_dict()
    assert all(torch.equal(state[k], v) for k, v in files.backbone.items() if k in state)
    te = trainer.text_encoder.model.state_dict()
    assert all(torch.equal(te[k], v) for k, v in files.te.items())
    assert trainer.autoencoder.mean.flatten().tolist() == pytest.approx(RELEASE_MEAN)
