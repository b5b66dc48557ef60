import math

import pytest
import torch

from homediff.models.rope import (AxialRoPE, camera, canonical_grid, crop_window, resize_to_patches,
                                  rotate)

#: positions and rotations are float32 by design, with coordinates and cos/sin within [-1, 1]: one
#: float32 rounding there is at most eps32 / 2, so a few roundings stay within a few eps32
EPS32 = torch.finfo(torch.float32).eps


def test_grid_long_side_spans_unit_box_with_cell_centres():
    grid = canonical_grid(2, 4)
    assert sorted(set(grid[:, 0].tolist())) == [-0.25, 0.25]
    assert sorted(set(grid[:, 1].tolist())) == [-0.75, -0.25, 0.25, 0.75]
    assert grid[1].tolist() == [-0.25, -0.25]  # row-major: second token is the next column


def test_portrait_grid_is_the_transposed_landscape_grid():
    assert torch.equal(canonical_grid(4, 2).view(4, 2, 2).flip(-1).transpose(0, 1),
                       canonical_grid(2, 4).view(2, 4, 2))


def test_crop_window_is_a_window_of_the_full_grid():
    full = canonical_grid(6, 10).view(6, 10, 2)
    window = crop_window(6, 10, 0, 4, 6, 6).view(6, 6, 2)
    assert torch.equal(window, full[:, 4:10])
    with pytest.raises(ValueError, match="outside"):
        crop_window(6, 10, 0, 5, 6, 6)


def test_camera_identity_and_formula():
    pos = canonical_grid(3, 5)
    assert torch.equal(camera(pos), pos)
    edited = camera(pos, zoom=2.0, x_shift=0.4, y_shift=-0.2)
    assert torch.allclose(edited[:, 0], (pos[:, 0] - 0.2) / 2)
    assert torch.allclose(edited[:, 1], (pos[:, 1] + 0.4) / 2)
    with pytest.raises(ValueError, match="zoom"):
        camera(pos, zoom=0)


def test_resize_to_patches_hits_interior_patch_centres():
    pos = canonical_grid(16, 16).expand(1, -1, -1)
    small = resize_to_patches(pos, 16, 16, 2).view(8, 8, 2)
    centres = canonical_grid(8, 8).view(8, 8, 2)
    # bilinear weights applied to float32 coordinates: a few roundings each
    assert torch.allclose(small[1:-1, 1:-1], centres[1:-1, 1:-1], rtol=0, atol=4 * EPS32)
    # Antialiased borders are pulled inward, as the original's interpolation does.
    assert small[0, 0, 0] > centres[0, 0, 0]


def test_rope_is_identity_at_origin_and_preserves_norms():
    torch.manual_seed(0)
    rope = AxialRoPE(heads=4, head_dim=32)
    x = torch.randn(2, 5, 4, 32)
    pos = torch.randn(2, 5, 2)
    pos[:, 0] = 0
    y = rotate(x, rope.rotation(pos))
    assert torch.equal(y[:, 0], x[:, 0])
    # cos θ and sin θ are each within an ulp, so |e^{iθ}| = 1 within 2·eps32; the rotation
    # and the norm add a few roundings: 8·eps32 relative to the norm
    assert ((y.norm(dim=-1) - x.norm(dim=-1)).abs() <= 8 * EPS32 * x.norm(dim=-1)).all()
    assert not torch.allclose(y[:, 1:], x[:, 1:])


def test_rope_pair_layout_alternates_y_and_x():
    rope = AxialRoPE(heads=1, head_dim=8, init="hdm")
    rotation = rope.rotation(torch.tensor([[[0.5, 0.0]]]))
    cos, sin = rotation.unbind(-1)
    angle = 0.5 * math.pi
    # Pairs 0 and 2 turn with y, pairs 1 and 3 with x (here 0). The float32 angle (0.5 times the
    # exp of a rounded log π) is within 2 ulps of π/2, and cos, sin move by as much plus an ulp.
    tolerance = dict(rtol=0, atol=4 * EPS32)
    assert torch.allclose(cos[0, 0, 0], torch.tensor([math.cos(angle), 1, math.cos(angle), 1]), **tolerance)
    assert torch.allclose(sin[0, 0, 0], torch.tensor([math.sin(angle), 0, math.sin(angle), 0]), **tolerance)


def test_rope_inits():
    assert torch.allclose(AxialRoPE(2, 16, "hdm").freqs.exp(), torch.tensor(math.pi))
    spaced = AxialRoPE(2, 16, "spaced").freqs.exp()
    assert torch.allclose(spaced[0, [0, -1], 0], torch.tensor([math.pi, 5 * math.pi]))
