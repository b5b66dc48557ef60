"""Synthetic scenes for the camera measurement: a smooth colour field defined on positions, rendered
for any view exactly as the position map asks, and a stand-in pipeline that draws them."""

from types import SimpleNamespace

import torch

from homediff.evaluation.alignment import Camera
from homediff.geometry import camera as camera_edit
from homediff.geometry import canonical_grid


def scene(seed: int, blobs: int = 14):
    """A colour field over positions: Gaussian blobs of random colours spread beyond [−1, 1]²."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(blobs, 2, generator=g, dtype=torch.float64) * 3.6 - 1.8
    colours = torch.rand(blobs, 3, generator=g, dtype=torch.float64) * 2 - 1
    widths = 0.25 + 0.2 * torch.rand(blobs, generator=g, dtype=torch.float64)

    def field(pos: torch.Tensor) -> torch.Tensor:  # (N, 2) → (3, N)
        d2 = (pos[:, None, :] - centres[None]).square().sum(-1)
        return (torch.exp(-d2 / (2 * widths.square())) @ colours).T.tanh()
    return field


def view(field, height: int, width: int, cam: Camera = Camera()) -> torch.Tensor:
    """The (3, height, width) view of a field under a camera edit, in [−1, 1]."""
    pos = camera_edit(canonical_grid(height, width).double(), cam.zoom, cam.x, cam.y)
    return field(pos).reshape(3, height, width)


class SceneCamera:
    """A stand-in pipeline: each (prompt, seed) is one scene, drawn as the camera asks (or, with
    ``blind``, always the canonical grid of the frame, whatever the camera)."""

    sample_size = 32

    def __init__(self, blind: bool = False):
        self.blind, self.calls = blind, []

    def check_size(self, height, width):
        assert height % 8 == 0 and width % 8 == 0

    def __call__(self, prompts, height, width, camera, generator, output_type,
                 num_images_per_prompt=1, **settings):
        images_of = [p for p in prompts for _ in range(num_images_per_prompt)]
        assert output_type == "pt" and len(generator) == len(images_of)
        self.calls.append((len(images_of), height, width, camera))
        cam = Camera() if self.blind or camera is None else Camera(
            camera["zoom"], camera["y_shift"], camera["x_shift"])
        images = [view(scene(sum(map(ord, p)) * 1000 + g.initial_seed()), height, width, cam)
                  for p, g in zip(images_of, generator)]
        return SimpleNamespace(images=(torch.stack(images).float() + 1) / 2)
