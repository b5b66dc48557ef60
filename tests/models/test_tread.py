import math

import pytest
import torch

from homediff.models import tread


@pytest.mark.parametrize("n_image,rate", [(8, 0.5), (192, 0.5), (10, 0.25), (7, 0.3), (64, 0.0)])
def test_select_keeps_the_right_tokens_in_order(n_image, rate):
    n_text, batch = 3, 4
    x = torch.arange(batch * (n_image + n_text), dtype=torch.float32).view(batch, -1, 1)
    kept = tread.choose(batch, n_image, rate, generator=torch.Generator().manual_seed(0))
    routed = tread.select(x, kept, n_image)
    assert routed.shape == (batch, n_image - math.floor(rate * n_image) + n_text, 1)
    for b in range(batch):
        image = routed[b, : kept.shape[1], 0]
        assert torch.all(image[1:] > image[:-1])  # original order
        assert torch.equal(routed[b, kept.shape[1]:], x[b, n_image:])  # all text tokens


def test_samples_route_independently_and_generator_repeats():
    a = tread.choose(8, 64, 0.5, generator=torch.Generator().manual_seed(1))
    b = tread.choose(8, 64, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) == 8


def test_merge_restores_bypassed_tokens_exactly():
    torch.manual_seed(0)
    n_image, n_text = 16, 4
    x = torch.randn(2, n_image + n_text, 8)
    kept = tread.choose(2, n_image, 0.5)
    processed = tread.select(x, kept, n_image) * 3 + 1
    merged = tread.merge(x, processed, kept, n_image)
    bypassed = torch.ones(2, n_image, dtype=torch.bool)
    bypassed[torch.arange(2)[:, None], kept] = False
    assert torch.equal(merged[:, :n_image][bypassed], x[:, :n_image][bypassed])
    assert torch.equal(tread.select(merged, kept, n_image), processed)


def test_rate_bounds():
    assert tread.kept_count(10, 0.0) == 10
    with pytest.raises(ValueError):
        tread.kept_count(10, 1.0)


def test_a_model_without_pre_routing_blocks_routes_under_bfloat16_autocast():
    """Without blocks before the routed span the full sequence is the float32 embedding while the
    span returns bfloat16 under autocast: the merge must take both."""
    from homediff.models import XUT, XUTConfig

    torch.manual_seed(0)
    model = XUT(XUTConfig(dim=64, ctx_dim=48, head_dim=16, mlp_dim=96, depth=2, enc_blocks=1,
                          dec_blocks=2, tread_pre_blocks=0, tread_post_blocks=1)).train()
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 48), torch.rand(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ctx, tread_rate=0.5, generator=torch.Generator().manual_seed(0))
    out.float().square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
               if p.requires_grad and p.grad is not None)
