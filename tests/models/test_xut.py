import json

import pytest
import torch
from safetensors.torch import load_file

from homediff.errors import ConfigError
from homediff.geometry import camera, canonical_grid
from homediff.models import XUT, XUTConfig, load_hdm_checkpoint
from homediff.models.flops import forward_flops

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny(**overrides):
    base = dict(in_channels=4, ctx_dim=16, dim=64, head_dim=16, mlp_dim=96, depth=2,
                enc_blocks=1, dec_blocks=2, tread_pre_blocks=1, tread_post_blocks=1)
    return XUT(XUTConfig(**{**base, **overrides}))


def perturb(model, scale=0.05):
    """Give zero-initialised layers weights, as after some training."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def inputs(batch=2, h=8, w=12, text=5, ctx_dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, h, w, generator=g).to(dtype), torch.rand(batch, generator=g),
            torch.randn(batch, text, ctx_dim, generator=g).to(dtype))


def test_reproduces_the_original_implementation(official_small):
    """Our forward pass in float64 against the original's, recorded in float32.

    The float16 weights and float32 inputs are exact in float64, so what remains is the recording's
    own rounding: its forward pass has about 64 matrix products and normalisations in a row (8
    blocks of about 8), each adding at most an ulp of relative error in norm: 64·eps32 (7e-6).
    """
    meta = json.loads((official_small / "meta.json").read_text())
    io = load_file(official_small / "io.safetensors")
    model = load_hdm_checkpoint(official_small / "model.safetensors", meta["config"])
    assert model.num_parameters() == meta["params"]
    assert len(model.state_dict()) == meta["keys"]
    model.double()
    x, ctx, aspect = io["x"].double(), io["ctx"].double(), io["addon_info"].double()
    with torch.no_grad():
        out = model(x, io["t"], ctx, aspect=aspect)
        assert rel_err(out, io["out_default"].double()) < 64 * EPS32
        out = model(x, io["t"], ctx, pos_map=io["pos_camera"], aspect=aspect)
        assert rel_err(out, io["out_camera"].double()) < 64 * EPS32
    for key in ("axial_pos_2x4", "axial_pos_5x3", "axial_pos_4x4"):
        h, w = map(int, key.rsplit("_", 1)[1].split("x"))
        assert torch.equal(canonical_grid(h, w), io[key])
    h, w = meta["latent_hw"]
    grid = canonical_grid(h, w).expand(2, -1, -1)
    assert torch.equal(camera(grid, **meta["camera"]), io["pos_camera"])


@pytest.mark.parametrize("name,count", [("xut-small", 237_290_128), ("xut-base", 343_176_208),
                                        ("xut-large", 555_628_816)])
def test_preset_sizes_match_the_report(name, count):
    with torch.device("meta"):
        assert XUT.from_preset(name).num_parameters() == count


def test_base_preset_equals_released_arch():
    released = {"patch_size": 2, "input_dim": 4, "dim": 1024, "ctx_dim": 1024, "ctx_size": 256,
                "heads": 16, "dim_head": 64, "mlp_dim": 3072, "depth": 4, "enc_blocks": 1,
                "dec_blocks": 3, "addon_info_embs_dim": 1,
                "tread_config": {"prev_trns_depth": 1, "post_trns_depth": 3, "dropout_ratio": 0.5}}
    imported = XUTConfig.from_hdm_config(released)
    assert imported == XUTConfig.preset("xut-base", rope_init="hdm")
    with torch.device("meta"):
        keys = XUT(imported).state_dict().keys()
    assert len(keys) == 255
    assert "backbone.dec_blocks.3.0.xattn.kv.weight" in keys
    assert "post_tread_trns.blocks.2.mlp.w12.bias" in keys


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.skip"):
        XUTConfig(skip="sideways")
    with pytest.raises(ConfigError, match="head_dim"):
        XUTConfig(dim=100, head_dim=64)
    with pytest.raises(ConfigError, match="colour"):
        XUTConfig.from_dict({"colour": 1})
    with pytest.raises(ConfigError, match="double_t"):
        XUTConfig.from_hdm_config({"double_t": True})


def test_output_shape_and_input_checks():
    model = tiny().eval()
    x, t, ctx = inputs()
    assert model(x, t, ctx).shape == x.shape
    with pytest.raises(ValueError, match="patch size"):
        model(x[..., :11], t, ctx)
    with pytest.raises(ValueError, match="pos_map"):
        model(x, t, ctx, pos_map=torch.zeros(2, 10, 2))


def test_routing_rate_semantics():
    torch.manual_seed(0)
    model = perturb(tiny())
    x, t, ctx = inputs()
    model.eval()
    with torch.no_grad():
        full = model(x, t, ctx)
        assert torch.equal(model(x, t, ctx, tread_rate=0), full)
        routed = model(x, t, ctx, tread_rate=0.5, generator=torch.Generator().manual_seed(3))
        again = model(x, t, ctx, tread_rate=0.5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(routed, again)
        assert rel_err(routed, full) > 1e-3
        model.train()
        assert torch.equal(model(x, t, ctx, tread_rate=0), full)
        trained = model(x, t, ctx, generator=torch.Generator().manual_seed(3))
        assert torch.equal(trained, routed)  # training mode routes at the configured 0.5


def test_skip_wirings_differ_and_train():
    torch.manual_seed(0)
    last = perturb(tiny(skip="last"))
    mirror = tiny(skip="mirror")
    mirror.load_state_dict(last.state_dict())
    x, t, ctx = inputs()
    outs = []
    for model in (last, mirror):
        out = model(x, t, ctx, generator=torch.Generator().manual_seed(0))
        out.square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        outs.append(out.detach())
    assert rel_err(outs[0], outs[1]) > 1e-3


def test_no_skip_is_a_plain_stack_of_the_same_blocks():
    plain, last = tiny(skip="none"), tiny(skip="last")
    missing = set(last.state_dict()) - set(plain.state_dict())
    assert missing and all(".xattn" in k for k in missing)
    assert set(plain.state_dict()) < set(last.state_dict())
    x, t, ctx = inputs()
    assert plain(x, t, ctx).shape == x.shape
    assert forward_flops(plain.config, 8, 12, 5) < forward_flops(last.config, 8, 12, 5)


def test_pooled_text_starts_as_the_time_only_model_and_then_conditions_the_adaln():
    torch.manual_seed(0)
    pooled, plain = tiny(pooled_text=True).eval(), tiny().eval()
    extra = set(pooled.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("pooled_text_proj.") for k in extra)
    perturb(plain)
    pooled.load_state_dict(plain.state_dict(), strict=False)
    x, t, ctx = inputs()
    with torch.no_grad():
        # the zero-initialised projection adds exact zeros to the conditioning: same arithmetic
        assert torch.equal(pooled(x, t, ctx), plain(x, t, ctx))
        perturb(pooled.pooled_text_proj)
        text_only = [m.scale for m in pooled._conditioning(t, None, ctx, 8, 12)]
        other_text = [m.scale for m in pooled._conditioning(t, None, ctx.flip(0), 8, 12)]
    assert all(a.shape == (2, 1, 64) and rel_err(a, b) > 1e-3 for a, b in zip(text_only, other_text))
    assert forward_flops(pooled.config, 8, 12, 5) > forward_flops(plain.config, 8, 12, 5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_every_parameter_from_the_default_init(checkpointing):
    torch.manual_seed(0)
    model = tiny(gradient_checkpointing=checkpointing).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, ctx = inputs()
    target = torch.randn_like(x)
    for step in range(4):  # zero-initialised layers open up one per step: output, adaLN, aspect
        opt.zero_grad()
        loss = (model(x, t, ctx, generator=torch.Generator().manual_seed(step)) - target).square().mean()
        loss.backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing activations in the backward pass repeats the same arithmetic; at most the order
    in which autograd adds up a parameter's gradient contributions may change. The shared adaLN
    and time layers get one contribution from each of the 8 blocks: ≤ 8 roundings of an ulp of the
    largest partial sum; 64 ulps of each tensor's largest gradient (in float64) bounds that."""
    torch.manual_seed(0)
    plain = perturb(tiny()).train().double()
    ckpt = tiny(gradient_checkpointing=True).train().double()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = inputs(dtype=torch.float64)
    for model in (plain, ckpt):
        model(x, t, ctx, generator=torch.Generator().manual_seed(0)).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert (a.grad - b.grad).abs().max() <= 64 * EPS64 * a.grad.abs().max(), name


def test_flops_follow_the_routed_token_count():
    config = XUTConfig(dim=256, ctx_dim=128, head_dim=64, mlp_dim=768, depth=2, dec_blocks=2,
                       tread_post_blocks=1)
    full = forward_flops(config, 32, 32, 256, 0.0)
    routed = forward_flops(config, 32, 32, 256, 0.5)
    assert 0.7 < routed / full < 0.85
    bigger = forward_flops(config, 64, 64, 256, 0.0)
    assert bigger > 3 * full


def test_the_conditioning_runs_outside_autocast_and_compiles_under_it():
    """The modulations stay float32 under bfloat16 autocast, and a model with both pooled-text and
    aspect embeddings (whose last biases get identical gradients) compiles and trains under it:
    inside autocast, inductor generated C++ for that pair that did not compile."""
    torch.manual_seed(0)
    model = XUT(XUTConfig.preset("xut-tiny", ctx_dim=16, pooled_text=True, depth=1, dec_blocks=1,
                                 tread_pre_blocks=0, tread_post_blocks=0))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 16).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        mods = model._conditioning(t, None, ctx, 8, 8)
        out = torch.compile(model)(x, t, ctx, tread_rate=0.5)
    assert {m.dtype for kind in mods for m in kind} == {torch.float32}
    out.float().square().mean().backward()
    assert model.pooled_text_proj[2].bias.grad is not None
    assert torch.equal(model.pooled_text_proj[2].bias.grad, model.addon_info_embs_proj[2].bias.grad)
