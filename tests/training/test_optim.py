import copy
import math

import pytest
import torch

from homediff.models import XUT, XUTConfig
from homediff.training.components import adamw
from homediff.training.optim import (EMA, MuonAdamW, fan_in, lr_multiplier, mark_muon_groups,
                                     orthogonalize, parameter_groups, set_lr)
from homediff.training.sharding import load_optimizer_state


def small():
    return XUT(XUTConfig(dim=64, ctx_dim=16, head_dim=16, mlp_dim=96, depth=1, dec_blocks=1))


def test_fan_in_rule_matches_hdm():
    model = small()
    groups = parameter_groups(model, weight_decay=0.02, lr_rule="fan_in", decay_norms_and_biases=True)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["ctx_proj.weight"])] == 1 / 16
    assert scale[id(named["in_patch.proj.weight"])] == 1 / 16  # conv: 4 channels × 2 × 2
    assert scale[id(named["backbone.enc_blocks.0.0.attn.rope.freqs"])] == 1 / 8  # (heads, 4, 2)
    assert scale[id(named["addon_info_embs_proj.0.weight"])] == 1.0  # fan-in 1: the full LR
    assert scale[id(named["ctx_proj.bias"])] == 1 / 64  # a vector: its length
    assert fan_in(torch.zeros(3, 5, 7)) == 35


def test_decay_exclusions_and_plain_rule():
    model = small()
    groups = parameter_groups(model, weight_decay=0.1, lr_rule="plain")
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["ctx_proj.weight"])] == 0.1
    assert decay[id(named["ctx_proj.bias"])] == 0.0
    assert decay[id(named["backbone.enc_blocks.0.0.attn.rope.freqs"])] == 0.0
    assert decay[id(named["backbone.enc_blocks.0.0.attn_pre_norm.norm.weight"])] == 0.0
    assert {g["lr_scale"] for g in groups} == {1.0}
    optimizer = torch.optim.AdamW(groups)
    set_lr(optimizer, 2e-3, 0.5)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}


def test_schedule_matches_hdm_curve():
    total, warmup = 10_000, 1000
    assert lr_multiplier(0, total, warmup, 0.01) == 0.0
    assert lr_multiplier(500, total, warmup, 0.01) == 0.5
    assert lr_multiplier(1000, total, warmup, 0.01) == 1.0
    middle = 1000 + 9000 // 2
    assert lr_multiplier(middle, total, warmup, 0.01) == pytest.approx(0.505)
    assert lr_multiplier(total, total, warmup, 0.01) == pytest.approx(0.01)
    assert lr_multiplier(total + 50, total, warmup, 0.01) == pytest.approx(0.01)


def test_ema_follows_then_smooths():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.9, 1/10) = 0.1: mostly the new weights
    start = ema.shadow["weight"].clone()
    assert torch.all(start > 0.8)
    for _ in range(100):
        ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.ones(2, 2), atol=1e-4)
    restored = EMA(torch.nn.Linear(2, 2))
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 101 and math.isclose(restored.decay, 0.9)


def test_muon_takes_the_hidden_matrices_and_keeps_each_groups_lr_and_decay():
    model = small()
    groups = mark_muon_groups(model, parameter_groups(model, weight_decay=0.02))
    group_of = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("backbone.enc_blocks.0.0.attn.qkv.weight", "ctx_proj.weight", "time_emb.proj.0.weight"):
        assert group_of[id(named[name])]["muon"], name
    for name in ("in_patch.proj.weight", "out_patch.proj.weight", "addon_info_embs_proj.0.weight",
                 "ctx_proj.bias", "backbone.enc_blocks.0.0.attn.rope.freqs"):
        assert not group_of[id(named[name])]["muon"], name
    qkv = group_of[id(named["backbone.enc_blocks.0.0.attn.qkv.weight"])]
    assert qkv["lr_scale"] == 1 / 64 and qkv["weight_decay"] == 0.02
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_orthogonalize_pushes_singular_values_towards_one(dtype):
    torch.manual_seed(0)
    spread = torch.diag(torch.logspace(-1, 1, 32))  # singular values over two decades
    for matrix in (torch.randn(96, 32) @ spread, spread @ torch.randn(32, 96)):
        ortho = orthogonalize(matrix, dtype=dtype)
        values = torch.linalg.svdvals(ortho)
        assert ortho.shape == matrix.shape and ortho.dtype == matrix.dtype
        assert 0.65 < values.min() and values.max() < 1.25, values  # from a spread of 100x


def test_a_stack_of_matrices_is_orthogonalised_each_on_its_own():
    torch.manual_seed(0)
    for shape in ((3, 24, 8), (3, 8, 24)):  # tall and wide
        stack = torch.randn(*shape, dtype=torch.float64)
        together = orthogonalize(stack, dtype=torch.float64)
        alone = torch.stack([orthogonalize(m, dtype=torch.float64) for m in stack])
        assert torch.allclose(together, alone, rtol=0, atol=1e-12)


def _train(parameters, optimizer, steps=5):
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(16, parameters[0].shape[1]).to(parameters[0].dtype)
        (x @ parameters[0].T).sin().pow(2).sum().backward()
        optimizer.step()


def test_muon_adamw_equals_torch_adamw_on_plain_groups():
    """The same AdamW step written in another order (bias corrections, square root, division):
    in float64 each of the 5 steps can differ by a few roundings of the weights, ≤ 4 ulps of the
    largest weight (lr·|update| ≤ 0.01 is far below it); 5 steps: 20, so 32 ulps."""
    start = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    _train([ours], MuonAdamW([{"params": [ours], "lr": 0.01, "weight_decay": 0.1}]))
    _train([theirs], torch.optim.AdamW([theirs], lr=0.01, weight_decay=0.1, betas=(0.9, 0.98)))
    assert (theirs - start).abs().max() > 1e-3  # they moved
    assert (ours - theirs).abs().max() <= 32 * torch.finfo(torch.float64).eps * theirs.abs().max()


def test_the_trainers_adamw_is_fused_on_a_cpu_and_steps_as_the_per_tensor_one():
    """The fused kernel computes the same update in another order: ≤ 32 ulps of the largest weight
    after 5 steps in float64, as above; a state saved by a per-tensor AdamW (an earlier checkpoint)
    resumes in the fused one, which stays fused."""
    start = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fused_weights, plain_weights = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    options = dict(lr=0.01, weight_decay=0.1, betas=(0.9, 0.98))
    fused = adamw([fused_weights], torch.device("cpu"), **options)
    plain = torch.optim.AdamW([plain_weights], foreach=False, **options)
    assert fused.defaults["fused"]
    _train([fused_weights], fused)
    _train([plain_weights], plain)
    assert (plain_weights - start).abs().max() > 1e-3  # they moved
    tolerance = 32 * torch.finfo(torch.float64).eps * plain_weights.abs().max()
    assert (fused_weights - plain_weights).abs().max() <= tolerance
    resumed = adamw([fused_weights], torch.device("cpu"), **options)
    load_optimizer_state(None, resumed, copy.deepcopy(plain.state_dict()), sharded=False)
    assert resumed.param_groups[0]["fused"], "a state saved unfused does not unfuse the optimiser"
    _train([fused_weights], resumed)
    _train([plain_weights], plain)
    assert (fused_weights - plain_weights).abs().max() <= 2 * tolerance


def test_muon_groups_step_as_torch_muon_with_adamw_matched_rms():
    """torch's Muon runs Newton-Schulz in bfloat16, so ours does too. The same iteration in the
    same precision: an intermediate rounded differently moves an element by ≤ ½ ulp of bfloat16
    (2^-9 of its step), and the mean over 2048 elements by less: eps_bf16 / 8 = 2^-10 of the mean
    step. (Newton-Schulz in float32 instead would move them by about 3 %.)"""
    start = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    _train([ours], MuonAdamW([{"params": [ours], "lr": 0.02, "weight_decay": 0.1, "muon": True}],
                             ns_dtype=torch.bfloat16))
    _train([theirs], torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    moved = (theirs - start).abs().mean()
    assert moved > 0.01
    assert (ours - theirs).abs().mean() <= torch.finfo(torch.bfloat16).eps / 8 * moved
