import codecs
import itertools

import pytest
import torch

from homediff.data.captions import CaptionConfig, decode_caption, process_caption
from homediff.errors import ConfigError

NO_DROP = dict(caption_dropout=0.0)


def draws(text, config, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [process_caption(text, config, generator) for _ in range(n)]


def test_keep_tokens_come_first_in_order_and_are_never_dropped():
    config = CaptionConfig(tag_dropout=1.0, group_dropout=1.0, **NO_DROP)
    for out in draws("1girl, solo ||| red hair, smile %% outdoors", config, 50):
        assert out == "1girl, solo"
    config = CaptionConfig(**NO_DROP)
    for out in draws("1girl, solo ||| red hair, smile %% outdoors", config, 50):
        assert out.startswith("1girl, solo, ")
        assert sorted(out.split(", ")[2:]) == ["outdoors", "red hair", "smile"]


def test_every_separator_but_the_last_delimits_keep_tokens():
    out = draws("a ||| b ||| c, d", CaptionConfig(shuffle_tags=False, **NO_DROP), 1)[0]
    assert out == "a, b, c, d"


def test_groups_stay_together_and_both_orders_occur():
    config = CaptionConfig(**NO_DROP)
    orders = set()
    for out in draws("a1, a2, a3 %% b1, b2", config, 200):
        tags = out.split(", ")
        groups = "".join(tag[0] for tag in tags)
        assert groups in ("aaabb", "bbaaa")  # a group's tags are contiguous
        orders.add(groups)
    assert orders == {"aaabb", "bbaaa"}


def test_tag_shuffle_reaches_every_permutation_and_can_be_off():
    outs = set(draws("a, b, c", CaptionConfig(**NO_DROP), 300))
    assert outs == {", ".join(p) for p in itertools.permutations("abc")}
    fixed = CaptionConfig(shuffle_tags=False, shuffle_groups=False, **NO_DROP)
    assert set(draws("c, a %% b", fixed, 20)) == {"c, a, b"}


def test_tag_dropout_rate_within_tolerance():
    tags = [f"t{i}" for i in range(10)]
    outs = draws(", ".join(tags), CaptionConfig(tag_dropout=0.25, **NO_DROP), 2000)
    kept = sum(len(o.split(", ")) if o else 0 for o in outs) / (2000 * 10)
    assert kept == pytest.approx(0.75, abs=0.015)


def test_group_dropout_rate_within_tolerance():
    outs = draws("keep ||| a, b %% c", CaptionConfig(group_dropout=0.3, **NO_DROP), 4000)
    without_c = sum("c" not in o.split(", ") for o in outs) / 4000
    assert without_c == pytest.approx(0.3, abs=0.025)
    # a group is dropped whole: "a" and "b" leave together
    assert all(("a" in o) == ("b" in o) for o in outs)


def test_caption_dropout_empties_the_whole_caption_at_the_default_rate():
    config = CaptionConfig()
    assert config.caption_dropout == 0.1
    outs = draws("keep ||| a, b", config, 4000)
    empty = sum(o == "" for o in outs) / 4000
    assert empty == pytest.approx(0.1, abs=0.015)
    assert all(o.startswith("keep") for o in outs if o)


def test_same_seed_same_captions_other_seed_other_captions():
    config = CaptionConfig(tag_dropout=0.3, group_dropout=0.2)
    text = "k ||| a, b, c, d, e %% f, g, h"
    assert draws(text, config, 30, seed=5) == draws(text, config, 30, seed=5)
    assert draws(text, config, 30, seed=5) != draws(text, config, 30, seed=6)


def test_natural_language_caption_without_commas_passes_whole():
    text = "a teapot on the left and a cat on the right"
    assert set(draws(text, CaptionConfig(**NO_DROP), 20)) == {text}


def test_whitespace_and_empty_tags_are_cleaned():
    config = CaptionConfig(shuffle_tags=False, **NO_DROP)
    assert draws("  a ,, b ,  ", config, 1)[0] == "a, b"
    assert draws("", config, 1)[0] == ""


@pytest.mark.parametrize("field,value", [("tag_dropout", 1.5), ("caption_dropout", -0.1),
                                         ("group_separator", "")])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ConfigError, match=field):
        CaptionConfig(**{field: value})


def test_decode_caption_handles_bom_utf16_and_bad_bytes():
    notes = []
    assert decode_caption("café\n".encode(), notes) == "café"
    assert decode_caption(codecs.BOM_UTF8 + b"tea", notes) == "tea"
    assert decode_caption("chá".encode("utf-16"), notes) == "chá"
    assert notes == []
    assert decode_caption(b"caf\xe9 au lait", notes) == "caf\ufffd au lait"
    assert notes == [("caption-not-utf8", "decoded with replacement characters")]
