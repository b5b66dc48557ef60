import pytest
import torch

from homediff.geometry import camera, canonical_grid, crop_window, resize_to_patches

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
