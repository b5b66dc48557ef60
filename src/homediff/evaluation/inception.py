"""The Inception-v3 network that FID is defined with, loaded from a local file the user supplies.

Two files are accepted, both made from TensorFlow's ``inception-2015-12-05`` graph; nothing is
downloaded:

- pytorch-fid's state dict ``pt_inception-2015-12-05-6726825d.pth`` (its GitHub release
  ``fid_weights``), loaded strictly into ``FIDInceptionV3`` below. That network is Inception-v3 as
  TensorFlow's FID code runs it: 1008 classes, no auxiliary head, average pools in the A, C and
  first E blocks that leave the padding out of the mean, and a max pool in the last E block's pool
  branch. Its parameter names are torchvision's (``Mixed_5b.branch5x5_1.conv.weight``, …).
- StyleGAN's TorchScript ``inception-2015-12-05.pt`` (also used by clean-fid), called as StyleGAN's
  metrics call it: ``model(images_uint8, return_features=True)``, the file resizing by itself.

Input convention: RGB in [−1, 1], any size. Images are rounded to 8 bits first, so generated images
score as they would once saved as PNG files; ``FIDInceptionV3`` then resizes them to 299 × 299
bilinearly (pytorch-fid's resize) and reads the 2048-d average pool of the last block (pool3).
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from homediff.errors import CheckpointError

logger = logging.getLogger(__name__)

INPUT_SIZE = 299
FEATURE_DIM = 2048
EXPECTED = ("pytorch-fid's pt_inception-2015-12-05-6726825d.pth (a state dict) or StyleGAN's "
            "TorchScript inception-2015-12-05.pt")


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3) and ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _mean_pool(x: torch.Tensor) -> torch.Tensor:
    """3×3 average over the pixels inside the image (TensorFlow's "SAME" average pool)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class BlockA(nn.Module):
    """35 × 35 block: 1×1, 5×5 and double 3×3 branches beside a pooled 1×1."""

    def __init__(self, cin: int, pool_channels: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_mean_pool(x))], 1)


class BlockB(nn.Module):
    """35 → 17 reduction: a strided 3×3, a strided double 3×3 and a strided max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17 × 17 block with factorised 7×7 convolutions (1×7 then 7×1) of ``mid`` channels."""

    def __init__(self, cin: int, mid: int):
        super().__init__()
        wide, tall = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, mid, 1)
        self.branch7x7_2, self.branch7x7_3 = ConvBN(mid, mid, **wide), ConvBN(mid, 192, **tall)
        self.branch7x7dbl_1 = ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = ConvBN(mid, mid, **tall)
        self.branch7x7dbl_3 = ConvBN(mid, mid, **wide)
        self.branch7x7dbl_4 = ConvBN(mid, mid, **tall)
        self.branch7x7dbl_5 = ConvBN(mid, 192, **wide)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = [getattr(self, f"branch7x7dbl_{i}") for i in range(1, 6)]
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, *double), self.branch_pool(_mean_pool(x))], 1)


class BlockD(nn.Module):
    """17 → 8 reduction: strided 3×3 after 1×1, strided 3×3 after a 7×7 pair, strided max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                                 self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8 × 8 block whose 3×3 branches end in a 1×3 and a 3×1 side by side; ``pool`` is the pool
    branch's pooling (FID's network takes the maximum in its last block)."""

    def __init__(self, cin: int, pool=_mean_pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(single), self.branch3x3_2b(single),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
                          self.branch_pool(self.pool(x))], 1)


class FIDInceptionV3(nn.Module):
    """The network (module docstring): ``forward`` gives 1008 logits, ``pooled`` the features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = BlockA(192, 32), BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280), BlockE(2048, pool=_max_pool)
        self.fc = nn.Linear(FEATURE_DIM, 1008)  # unused by FID; the file carries it

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [−1, 1] → (N, 2048) pool3 features."""
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,
                   self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                   self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1], any size → (N, 2048), resized as pytorch-fid does."""
        x = F.interpolate(to_8bit(images) / 127.5 - 1, size=(INPUT_SIZE, INPUT_SIZE),
                          mode="bilinear", align_corners=False)
        return self.pooled(x)


class TorchScriptInception(nn.Module):
    """StyleGAN's TorchScript Inception behind the same ``features`` call."""

    def __init__(self, script: torch.jit.ScriptModule):
        super().__init__()
        self.script = script

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.script(to_8bit(images).to(torch.uint8), return_features=True)


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] → float values 0…255 rounded to integers, as an 8-bit file holds them."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images shaped (N, 3, H, W), got {tuple(images.shape)}")
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def _is_torchscript(path: Path) -> bool:
    """Whether a file is a TorchScript archive: a zip holding constants.pkl (torch.load's test)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The network of a local weight file (module docstring) in eval mode on ``device``; a missing
    or unsuitable file is a CheckpointError naming it and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; --inception-weights takes {EXPECTED}")
    try:
        if _is_torchscript(path):
            model = TorchScriptInception(torch.jit.load(str(path), map_location="cpu"))
        else:
            model = FIDInceptionV3()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not the FID Inception network; expected {EXPECTED} "
                              f"({' '.join(str(err).split())[:300]})") from err
    logger.info("loaded the FID Inception network from %s", path)
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def features(images: torch.Tensor, model: nn.Module, batch_size: int = 32) -> torch.Tensor:
    """(N, 2048) float32 CPU features of images in [−1, 1] (any size), in batches on the model's
    device."""
    device = next(model.parameters()).device
    out = [model.features(images[start:start + batch_size].to(device)).float().cpu()
           for start in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)
