"""The analytic FLOP counts against ``torch.utils.flop_counter``, which counts every matrix product,
convolution and attention the graph really runs.

Attention runs on the math backend here: on a CPU, ``scaled_dot_product_attention`` otherwise picks
a fused kernel that the counter does not know, and would count nothing for it. Small models run in
float64; the real shapes (XUT-base, Qwen3-0.6B, the EQ-SDXL VAE from the shipped configs) run on
the meta device, where nothing is computed or allocated but every operation is dispatched and
counted. The counts are integers and must be equal.
"""

import json
from importlib import resources

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from homediff.errors import ConfigError
from homediff.models import XUT, XUTConfig
from homediff.models.flops import (forward_flops, text_encoder_flops, train_step_flops,
                                   vae_encoder_flops)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


def counted(run) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def shipped(name: str) -> dict:
    return json.loads(resources.files("homediff.encoders").joinpath("configs", name).read_text())


XUT_VARIANTS = [
    {},
    {"skip": "none"},
    {"skip": "mirror", "pooled_text": True},
    {"aspect_embedding": False, "enc_blocks": [1, 2], "dec_blocks": [2, 1], "patch_size": 4},
]


def _xut_step(config: XUTConfig, batch: int, height: int, width: int, tokens: int, rate: float,
              backward: bool, dtype=torch.float64):
    x = torch.randn(batch, config.in_channels, height, width, dtype=dtype)
    model = XUT(config).to(x.device, dtype)  # on the device of the surrounding context
    ctx = torch.randn(batch, tokens, config.ctx_dim, dtype=dtype)
    t = torch.rand(batch, dtype=dtype)

    def run():
        out = model(x, t, ctx, tread_rate=rate, generator=torch.Generator().manual_seed(0))
        if backward:
            out.square().mean().backward()
    return run


@pytest.mark.parametrize("overrides", XUT_VARIANTS)
@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_xut_forward_and_training_step_match_the_counter(overrides, rate):
    torch.manual_seed(0)
    config = XUTConfig.preset("xut-tiny", **overrides)
    batch, height, width, tokens = 2, 8, 12, 5
    forward = counted(_xut_step(config, batch, height, width, tokens, rate, backward=False))
    step = counted(_xut_step(config, batch, height, width, tokens, rate, backward=True))
    assert forward == batch * forward_flops(config, height, width, tokens, rate)
    assert step == batch * train_step_flops(config, height, width, tokens, rate)


def test_the_training_step_is_not_three_forward_passes():
    """The layers that read data compute no input gradient, so the step is a little under 3×."""
    config = XUTConfig.preset("xut-tiny")
    step, forward = train_step_flops(config, 8, 8, 5), forward_flops(config, 8, 8, 5)
    assert forward * 2 < step < forward * 3


def test_checkpointing_recomputes_forward_work_that_is_not_model_flops():
    config = XUTConfig.preset("xut-tiny", gradient_checkpointing=True)
    hardware = counted(_xut_step(config, 2, 8, 8, 5, 0.5, backward=True))
    model = 2 * train_step_flops(config, 8, 8, 5, 0.5)
    assert model < hardware <= model + 2 * forward_flops(config, 8, 8, 5, 0.5)


def test_xut_base_at_1024_with_routing_and_512_text_tokens():
    """HDM's last stage: 128 × 96 latents (a 1024 × 768 crop), 512 text tokens, routing 0.5."""
    config = XUTConfig.preset("xut-base", in_channels=4, ctx_dim=1024)
    with torch.device("meta"):
        run = _xut_step(config, 2, 128, 96, 512, 0.5, backward=True, dtype=torch.float32)
        assert counted(run) == 2 * train_step_flops(config, 128, 96, 512, 0.5)


def _qwen3(**values):
    config = transformers.Qwen3Config(vocab_size=320, **values)
    return config, transformers.Qwen3Model(config).double().eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_qwen3_model_with_grouped_query_attention(attention):
    config, model = _qwen3(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    model.config._attn_implementation = attention
    ids = torch.randint(0, 320, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flops = counted(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert flops == 3 * text_encoder_flops(config.to_dict(), 7)


def test_a_bert_encoder_with_its_pooler():
    config = transformers.BertConfig(vocab_size=320, hidden_size=48, intermediate_size=80,
                                     num_hidden_layers=2, num_attention_heads=4)
    model = transformers.BertModel(config).double().eval()
    ids = torch.randint(0, 320, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flops = counted(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert flops == 3 * text_encoder_flops(config.to_dict(), 7)


def test_qwen3_0_6b_from_the_shipped_config():
    values = shipped("qwen3-0.6b.json")
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(transformers.Qwen3Config(**values))
        ids = torch.zeros(2, 256, dtype=torch.long)
        with torch.no_grad():
            flops = counted(lambda: model(input_ids=ids))  # a mask would be read on the host
    assert flops == 2 * text_encoder_flops(values, 256)


def test_an_unknown_text_model_is_refused():
    with pytest.raises(ConfigError, match="t5"):
        text_encoder_flops({"model_type": "t5"}, 8)


@pytest.mark.parametrize("values", [
    dict(block_out_channels=(32, 32, 64), layers_per_block=2),
    dict(block_out_channels=(32, 64), layers_per_block=1, mid_block_add_attention=False,
         use_quant_conv=False),
])
def test_a_diffusers_autoencoder_kl_encoder(values):
    blocks = len(values["block_out_channels"])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
                                  down_block_types=("DownEncoderBlock2D",) * blocks,
                                  up_block_types=("UpDecoderBlock2D",) * blocks, **values)
    vae = vae.double().eval()
    images = torch.randn(2, 3, 32, 24, dtype=torch.float64)
    with torch.no_grad():
        flops = counted(lambda: vae.encode(images))
    assert flops == 2 * vae_encoder_flops(dict(vae.config), 32, 24)


def test_the_eq_sdxl_vae_at_1024_from_the_shipped_config():
    values = shipped("eq-sdxl-vae.json")
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL.from_config(values)
        images = torch.zeros(1, 3, 1024, 768)
        with torch.no_grad():
            flops = counted(lambda: vae.encode(images))
    assert flops == vae_encoder_flops(values, 1024, 768)
