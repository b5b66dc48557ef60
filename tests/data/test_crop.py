import math

import numpy as np
import pytest
import torch
from imagefiles import pattern
from PIL import Image

from homediff.data.crop import crop_offset, resized_size, shifted_square_crop, to_tensor
from homediff.errors import ConfigError
from homediff.geometry import canonical_grid

EPS32 = torch.finfo(torch.float32).eps


def column_image(height: int, width: int) -> Image.Image:
    """Pixel (r, c) has value c in every channel, so a crop's offset can be read off its pixels."""
    row = np.arange(width, dtype=np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=2))


def window(full_h, full_w, top, left, size):
    return canonical_grid(full_h, full_w).view(full_h, full_w, 2)[
        top:top + size, left:left + size].reshape(-1, 2)


def test_resized_size_short_side_becomes_size():
    assert resized_size(100, 200, 50) == (50, 100)
    assert resized_size(200, 100, 50) == (100, 50)
    assert resized_size(64, 64, 32) == (32, 32)
    assert resized_size(300, 1001, 64) == (64, 214)  # round(1001·64/300) = round(213.5…)


def test_random_crop_reaches_every_offset_including_both_ends():
    image = column_image(40, 60)  # no resize at size 40: offsets 0..20
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(400):
        crop = shifted_square_crop(image, 40, "random", generator)
        offset = round((crop.image[0, 0, 0].item() + 1) * 127.5)
        # bytes → [-1, 1] → bytes: three float32 roundings of at most ½ ulp of 255
        assert torch.allclose((crop.image[0, 0] + 1) * 127.5,
                              torch.arange(offset, offset + 40, dtype=torch.float32), rtol=0,
                              atol=2 * 255 * EPS32)
        seen.add(offset)
    assert seen == set(range(21))


def test_crop_offset_is_uniform_over_all_offsets():
    generator = torch.Generator().manual_seed(1)
    counts = np.bincount([crop_offset(13, 10, "random", generator) for _ in range(4000)])
    assert len(counts) == 4 and counts.min() > 850  # 1000 expected each
    assert crop_offset(13, 10, "center", None) == 1


@pytest.mark.parametrize("height,width", [(48, 80), (90, 36), (40, 40), (33, 100)])
def test_position_map_is_the_window_of_the_full_grid(height, width):
    image = Image.fromarray(pattern(height, width))
    generator = torch.Generator().manual_seed(3)
    size = 24
    full_h, full_w = resized_size(height, width, size)
    reference = to_tensor(image.resize((full_w, full_h), Image.Resampling.BICUBIC))
    for _ in range(10):
        crop = shifted_square_crop(image, size, "random", generator)
        assert crop.image.shape == (3, size, size) and crop.pos.shape == (size * size, 2)
        # Find the window by matching pixels against the whole resized image.
        windows = [(top, left) for top in range(full_h - size + 1)
                   for left in range(full_w - size + 1)]
        matches = [(top, left) for top, left in windows if torch.allclose(
            reference[:, top:top + size, left:left + size], crop.image, atol=2 / 255)]
        assert len(matches) == 1
        top, left = matches[0]
        assert torch.equal(crop.pos, window(full_h, full_w, top, left, size))


def test_aspect_is_log_width_over_height_of_the_full_image():
    landscape = shifted_square_crop(Image.fromarray(pattern(50, 100)), 25, "center")
    portrait = shifted_square_crop(Image.fromarray(pattern(100, 50)), 25, "center")
    square = shifted_square_crop(Image.fromarray(pattern(60, 60)), 25, "center")
    assert landscape.aspect == pytest.approx(math.log(2)) and landscape.aspect > 0
    assert portrait.aspect == pytest.approx(-math.log(2))
    assert square.aspect == 0.0


def test_landscape_map_spans_half_height_and_a_window_of_x():
    crop = shifted_square_crop(Image.fromarray(pattern(50, 100)), 50, "random",
                               torch.Generator().manual_seed(0))
    y, x = crop.pos[:, 0], crop.pos[:, 1]
    # float32 coordinates within [-1, 1]: a rounding or two of ½ ulp of 1 each
    assert y.min() == pytest.approx(-0.5 + 0.5 / 50, abs=EPS32)
    assert y.max() == pytest.approx(0.5 - 0.5 / 50, abs=EPS32)
    assert x.max() - x.min() == pytest.approx(1.0 - 2 / 100, abs=2 * EPS32)


def test_center_and_none_modes():
    image = column_image(20, 50)
    center = shifted_square_crop(image, 20, "center")
    assert round((center.image[0, 0, 0].item() + 1) * 127.5) == 15
    assert torch.equal(center.pos, window(20, 50, 0, 15, 20))
    whole = shifted_square_crop(image, 20, "none")
    assert whole.image.shape == (3, 20, 50)
    assert torch.equal(whole.pos, canonical_grid(20, 50))


def test_squash_resizes_the_whole_image_to_the_square_with_the_square_grid():
    image = column_image(20, 50)
    squashed = shifted_square_crop(image, 20, "squash")
    assert squashed.image.shape == (3, 20, 20)
    assert torch.equal(squashed.pos, canonical_grid(20, 20))
    assert squashed.aspect == pytest.approx(math.log(50 / 20))
    first, last = ((squashed.image[0, 0, [0, -1]] + 1) * 127.5).tolist()
    assert first < 3 and last > 46  # both ends of the 50 columns are in view


def test_small_image_is_upscaled_and_values_stay_in_range():
    crop = shifted_square_crop(Image.fromarray(pattern(10, 20)), 32, "random",
                               torch.Generator().manual_seed(0))
    assert crop.image.shape == (3, 32, 32)
    assert crop.image.min() >= -1 and crop.image.max() <= 1
    assert crop.aspect == pytest.approx(math.log(2))


def test_crops_repeat_with_a_seed():
    image = Image.fromarray(pattern(30, 90))
    def crops():
        return [shifted_square_crop(image, 30, generator=torch.Generator().manual_seed(s))
                for s in range(6)]
    first, again = crops(), crops()
    assert all(torch.equal(a.image, b.image) and torch.equal(a.pos, b.pos)
               for a, b in zip(first, again))
    assert len({c.pos[0, 1].item() for c in first}) > 1


def test_to_tensor_maps_bytes_to_minus_one_one():
    image = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8))
    # one float32 rounding of a value within [-1, 1]
    assert torch.allclose(to_tensor(image).flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]),
                          rtol=0, atol=EPS32 / 2)


def test_bad_mode_and_size_raise_config_errors():
    image = Image.fromarray(pattern(8, 8))
    with pytest.raises(ConfigError, match="crop mode"):
        shifted_square_crop(image, 8, "tile")
    with pytest.raises(ConfigError, match="positive"):
        shifted_square_crop(image, 0)
