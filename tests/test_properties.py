"""Property tests (hypothesis): what must hold for every input, not only the examples written down.

Caption processing, config parsing and overrides, the crop and position-map geometry and the
camera edit. Every example is deterministic (``derandomize``), so a run on any machine tries the
same cases."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from homediff.data.captions import process_caption
from homediff.data.crop import resized_size, shifted_square_crop
from homediff.data.options import CaptionConfig
from homediff.data.transform import hflip
from homediff.errors import ConfigError
from homediff.geometry import camera, canonical_grid, crop_window
from homediff.training.config import apply_override, config_from_dict, load_config, to_dict, to_toml

SETTINGS = settings(derandomize=True, max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
WORDS = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters=" -'"),
                min_size=1, max_size=12).map(str.strip).filter(bool)


@SETTINGS
@given(keep=st.lists(WORDS, max_size=3), groups=st.lists(st.lists(WORDS, min_size=1, max_size=4),
                                                          min_size=1, max_size=3),
       seed=st.integers(0, 2**31))
def test_captions_keep_every_tag_once_with_keep_tokens_first(keep, groups, seed):
    text = (", ".join(keep) + " ||| " if keep else "") + " %% ".join(", ".join(g) for g in groups)
    config = CaptionConfig(caption_dropout=0.0)
    out = process_caption(text, config, torch.Generator().manual_seed(seed))
    tags = out.split(", ") if out else []
    assert tags[:len(keep)] == keep
    assert sorted(tags[len(keep):]) == sorted(t for g in groups for t in g)


@SETTINGS
@given(text=st.text(max_size=60), rate=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_any_caption_text_gives_a_subset_of_its_tags(text, rate, seed):
    config = CaptionConfig(tag_dropout=rate, group_dropout=rate, caption_dropout=0.0)
    out = process_caption(text, config, torch.Generator().manual_seed(seed))
    source = {t.strip() for part in text.replace("|||", ",").replace("%%", ",").split(",")
              for t in [part] if t.strip()}
    assert {t for t in out.split(", ") if t} <= source


TINY = {"model": {"preset": "xut-tiny"}, "dataset": {"path": "data"},
        "stages": [{"resolution": 64, "batch_size": 4, "steps": 10}]}
OVERRIDES = st.sampled_from([
    ("stages.0.lr", st.floats(0, 10, allow_nan=False)), ("stages.0.batch_size", st.integers(1, 512)),
    ("stages.0.tread_rate", st.floats(0, 0.99)), ("train.seed", st.integers(0, 2**31)),
    ("ema.decay", st.floats(0, 0.9999)), ("optimizer.warmup_steps", st.integers(0, 10**6)),
    ("dataset.options.flip", st.floats(0, 1)), ("train.time_std", st.floats(0, 5)),
])


@SETTINGS
@given(data=st.data())
def test_overrides_set_their_key_and_the_saved_config_reads_back_the_same(data, tmp_path_factory):
    key, values = data.draw(OVERRIDES)
    value = data.draw(values)
    raw = {k: (dict(v) if isinstance(v, dict) else [dict(s) for s in v]) for k, v in TINY.items()}
    apply_override(raw, f"{key}={value!r}")
    config = config_from_dict(raw)
    node = to_dict(config)
    for part in key.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    assert node == value
    path = tmp_path_factory.mktemp("config") / "saved.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# what each key accepts, from its documented type and range
ACCEPTS = {
    "stages.0.lr": lambda v: _number(v) and v >= 0,
    "ema.decay": lambda v: _number(v) and 0 <= v < 1,
    "train.checkpoint_every": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "stages.0.tread_rate": lambda v: _number(v) and 0 <= v < 1,
    "dataset.options.flip": lambda v: _number(v) and 0 <= v <= 1,
    "optimizer.eps": lambda v: _number(v) and v >= 0,
}
# override texts and the TOML values they read as
VALUES = {"-1": -1, "0": 0, "0.5": 0.5, "1": 1, "5": 5, "1e9": 1e9, "nope": "nope", "[1]": [1],
          "true": True}


@pytest.mark.parametrize("key", ACCEPTS)
@pytest.mark.parametrize("text", VALUES)
def test_an_override_loads_exactly_when_its_value_is_in_range(key, text):
    """Every key against every value: in range, it loads and sets the key; out of range or of
    the wrong type, a config error names the key."""
    raw = {k: (dict(v) if isinstance(v, dict) else [dict(s) for s in v]) for k, v in TINY.items()}
    value = VALUES[text]
    if not ACCEPTS[key](value):
        with pytest.raises(ConfigError, match=key.split(".")[-1]):
            apply_override(raw, f"{key}={text}")
            config_from_dict(raw)
        return
    apply_override(raw, f"{key}={text}")
    node = to_dict(config_from_dict(raw))
    for part in key.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    assert node == value


@SETTINGS
@given(h=st.integers(1, 300), w=st.integers(1, 300), data=st.data())
def test_a_crop_window_is_that_window_of_the_canonical_grid(h, w, data):
    top, left = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    height, width = data.draw(st.integers(1, h - top)), data.draw(st.integers(1, w - left))
    whole = canonical_grid(h, w).view(h, w, 2)
    assert torch.equal(crop_window(h, w, top, left, height, width),
                       whole[top:top + height, left:left + width].reshape(-1, 2))


@SETTINGS
@given(h=st.integers(1, 400), w=st.integers(1, 400), size=st.integers(1, 48), seed=st.integers(0, 99),
       mode=st.sampled_from(["random", "center"]))
def test_a_shifted_square_crop_lies_inside_its_image_and_is_square(h, w, size, seed, mode):
    from PIL import Image

    assume(max(h, w) <= 50 * min(h, w))
    crop = shifted_square_crop(Image.new("RGB", (w, h)), size, mode, torch.Generator().manual_seed(seed))
    full_h, full_w = resized_size(h, w, size)
    assert crop.image.shape == (3, size, size) and crop.pos.shape == (size * size, 2)
    bound = canonical_grid(full_h, full_w).abs().amax(dim=0)
    assert (crop.pos.abs() <= bound).all()
    assert crop.aspect == pytest.approx(math.log(full_w / full_h))
    flipped_image, flipped = hflip(crop.image, crop.pos)
    assert torch.equal(hflip(flipped_image, flipped)[1], crop.pos)  # mirroring twice is the identity


@SETTINGS
@given(zoom=st.floats(0.05, 20), x=st.floats(-5, 5), y=st.floats(-5, 5))
def test_the_camera_edit_is_undone_by_its_inverse(zoom, x, y):
    pos = canonical_grid(7, 11).double()
    there = camera(pos, zoom, x, y)
    back = camera(there, 1 / zoom, -x / zoom, -y / zoom)
    assert torch.allclose(back, pos, rtol=0, atol=1e-12 * max(1.0, zoom, abs(x), abs(y)) * 8)
    centre = camera(pos.new_tensor([[-y, -x]]), zoom, x, y)  # the point shifted to the centre
    assert torch.equal(centre, pos.new_zeros(1, 2))
