"""The two attention paths (homediff.models.attention) and which one a model takes. Equalities are
checked in float64, where both paths compute the same function to rounding; the choice is tested
through injected measurements, never through this machine's timings."""

import pytest
import torch
import torch.nn.functional as F

from homediff import precision
from homediff.models import XUT, XUTConfig, attention
from homediff.models.attention import MAX_SCORES, attend, choose_matmul_dtypes, matmul_attention

EPS64 = torch.finfo(torch.float64).eps


def qkv(shape, dtype=torch.float64, seed=0):
    draw = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=draw, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("queries, keys", [(12, 12), (7, 19)])
def test_the_matmul_path_computes_sdpa_and_its_gradients(queries, keys):
    q = qkv((2, 3, queries, 8))[0]
    k, v = qkv((2, 3, keys, 8), seed=1)[:2]
    grad = torch.randn(2, 3, queries, 8, dtype=torch.float64)
    ours = matmul_attention(q, k, v)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    reference = F.scaled_dot_product_attention(q, k, v)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad)
    assert torch.allclose(ours, reference, rtol=0, atol=1e3 * EPS64)
    for a, b in zip(ours_grads, reference_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e3 * EPS64)


def test_the_matmul_path_softmaxes_in_float32_and_returns_the_inputs_dtype():
    q, k, v = (t.detach().bfloat16() for t in qkv((2, 2, 16, 8)))
    out = matmul_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)))
    # bfloat16 keeps 8 significant bits: the inputs' and outputs' rounding, not a bfloat16 softmax
    assert (out.double() - exact).abs().max() < 2**-5 * exact.abs().max()


def test_attend_takes_the_matmul_path_only_in_its_dtypes_and_below_the_score_budget(monkeypatch):
    taken = []
    monkeypatch.setattr(attention, "matmul_attention",
                        lambda q, k, v: taken.append(q.shape) or F.scaled_dot_product_attention(q, k, v))
    q, k, v = (t.detach().transpose(1, 2) for t in qkv((2, 3, 10, 8)))  # (B, N, H, Dh)
    out = attend(q, k, v)
    assert out.shape == (2, 10, 24) and taken == []
    assert torch.equal(attend(q, k, v, frozenset({torch.float32})), out) and taken == []
    assert torch.allclose(attend(q, k, v, frozenset({torch.float64})), out, rtol=0, atol=1e3 * EPS64)
    assert taken == [(2, 3, 10, 8)]
    monkeypatch.setattr(attention, "MAX_SCORES", 2 * 3 * 10 * 10 - 1)
    attend(q, k, v, frozenset({torch.float64}))
    assert taken == [(2, 3, 10, 8)]


def tiny_xut() -> XUT:
    torch.manual_seed(0)
    model = XUT(XUTConfig.preset("xut-tiny", ctx_dim=16)).double()
    for p in model.parameters():  # the zero-initialised output layers would hide any difference
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_an_xut_computes_the_same_output_and_gradients_by_either_path():
    model = tiny_xut()
    draw = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=draw, dtype=torch.float64)
    ctx = torch.randn(2, 5, 16, generator=draw, dtype=torch.float64)
    t = torch.rand(2, generator=draw, dtype=torch.float64)

    def run():
        model.zero_grad()
        out = model(x, t, ctx, tread_rate=0.5, generator=torch.Generator().manual_seed(2))
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    sdpa_out, sdpa_grads = run()
    model.use_matmul_attention([torch.float64])
    assert model.matmul_attention_dtypes == {torch.float64}
    assert all(m.matmul_dtypes == {torch.float64} for m in model.modules() if hasattr(m, "matmul_dtypes"))
    matmul_out, matmul_grads = run()
    assert torch.allclose(matmul_out, sdpa_out, rtol=1e-10, atol=1e-12)
    for a, b in zip(matmul_grads, sdpa_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_step_s_attention_layers_follow_the_routing_and_the_skips():
    model = XUT(XUTConfig.preset("xut-tiny", ctx_dim=16))  # 1 pre, 1 post; 2 groups: 1 + 2 blocks
    heads = 128 // 32
    assert model.attention_layers(3, 8, 8, 5, 0.5) == (((3, heads, 21, 32), 2), ((3, heads, 13, 32), 8))
    assert model.attention_layers(3, 8, 8, 5, 0.0) == (((3, heads, 21, 32), 10),)
    plain = XUT(XUTConfig.preset("xut-tiny", ctx_dim=16, skip="none", tread_pre_blocks=0, tread_post_blocks=0))
    assert plain.attention_layers(1, 8, 8, 5, 0.5) == (((1, heads, 13, 32), 6),)


def injected(speedups):
    """Every attention measurement reads ``speedups[dtype]``; the layers it was asked about are
    collected."""
    asked = []

    def measure(layers, dtype, device):
        asked.append(layers)
        return speedups[dtype]
    return precision.measured_with(lambda shape, device: 1.0, measure), asked


def test_the_choice_follows_the_measured_speedup_per_dtype():
    layers = (((8, 4, 288, 64), 2), ((8, 4, 160, 64), 8))
    block, asked = injected({torch.float32: 1.1, torch.bfloat16: 3.0})
    with block:
        chosen, found = choose_matmul_dtypes(layers, [torch.float32, torch.bfloat16], "cpu")
    assert chosen == {torch.bfloat16}
    assert "float32 1.10×" in found and "bfloat16 3.00×" in found
    assert asked == ["2×8×4×288×64 + 8×8×4×160×64"] * 2
    block, _ = injected({torch.float32: 1.25})
    with block:
        assert choose_matmul_dtypes(layers, [torch.float32], "cpu")[0] == {torch.float32}  # the margin itself


def test_layers_above_the_score_budget_are_left_out_and_without_any_nothing_is_measured():
    large, small = (1, 16, 4096, 64), (1, 16, 256, 64)
    assert not attention.fits(1, 16, 4096, 4096) and attention.fits(1, 16, 256, 256)
    block, asked = injected({torch.bfloat16: 3.0})
    with block:
        assert choose_matmul_dtypes(((large, 4), (small, 8)), [torch.bfloat16], "cpu")[0] == {torch.bfloat16}
        assert asked == ["8×1×16×256×64"]
        assert choose_matmul_dtypes(((large, 4),), [torch.bfloat16], "cpu")[0] == frozenset()
        assert choose_matmul_dtypes(((small, 8),), [torch.bfloat16], "meta")[0] == frozenset()
    assert asked == ["8×1×16×256×64"]


def test_the_measurement_weighs_each_shape_by_its_layers(monkeypatch):
    """With each path's time per shape made up (SDPA 1 s and 3 s, matmul 2 s and 1 s), the ratio is
    that of the layer-weighted sums."""
    made_up = {("sdpa", 16): 1.0, ("sdpa", 8): 3.0, ("matmul", 16): 2.0, ("matmul", 8): 1.0}
    called = []

    class Output:
        def backward(self, grad):
            pass

    def path(name):
        def run(q, k, v):
            called.append((name, q.shape[2]))
            return Output()
        return run
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", path("sdpa"))
    monkeypatch.setattr(attention, "matmul_attention", path("matmul"))
    monkeypatch.setattr(precision, "seconds", lambda fn, device, **how: fn() or made_up[called[-1]])
    speedup = attention.matmul_speedup((((1, 1, 16, 4), 1), ((1, 1, 8, 4), 2)), torch.float32, "cpu",
                                       rounds=3)
    assert speedup == (1.0 + 2 * 3.0) / (2.0 + 2 * 1.0)
    assert sorted(called) == sorted(list(made_up) * 4)  # a warm-up round, then 3 rounds


def test_a_measurement_is_remembered_per_layers_dtype_and_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []

    def timed(layers, dtype, device):
        measured.append((layers, dtype))
        return 2.0
    monkeypatch.setattr(attention, "matmul_speedup", timed)
    layers = (((2, 2, 16, 8), 3),)
    for _ in range(2):
        assert choose_matmul_dtypes(layers, [torch.float32, torch.bfloat16], "cpu")[0] == {
            torch.float32, torch.bfloat16}
    assert measured == [(layers, torch.float32), (layers, torch.bfloat16)]
    names = [name for entry in precision.remembered() for name in entry["speedups"]]
    assert f"attention 3×2×2×16×8 float32 {torch.get_num_threads()} threads" in names


def test_the_real_measurement_is_a_positive_ratio():
    assert attention.matmul_speedup((((2, 2, 16, 8), 1),), torch.float32, "cpu") > 0
