import math

import torch

from homediff.models.rope import AxialRoPE, rotate

#: positions and rotations are float32 by design, with coordinates and cos/sin within [-1, 1]: one
#: float32 rounding there is at most eps32 / 2, so a few roundings stay within a few eps32
EPS32 = torch.finfo(torch.float32).eps


def test_rope_is_identity_at_origin_and_preserves_norms():
    torch.manual_seed(0)
    rope = AxialRoPE(heads=4, head_dim=32)
    x = torch.randn(2, 5, 4, 32)
    pos = torch.randn(2, 5, 2)
    pos[:, 0] = 0
    y = rotate(x, rope.rotation(pos))
    assert torch.equal(y[:, 0], x[:, 0])
    # cos θ and sin θ are each within an ulp, so |e^{iθ}| = 1 within 2·eps32; the rotation
    # and the norm add a few roundings: 8·eps32 relative to the norm
    assert ((y.norm(dim=-1) - x.norm(dim=-1)).abs() <= 8 * EPS32 * x.norm(dim=-1)).all()
    assert not torch.allclose(y[:, 1:], x[:, 1:])


def test_rope_pair_layout_alternates_y_and_x():
    rope = AxialRoPE(heads=1, head_dim=8, init="hdm")
    rotation = rope.rotation(torch.tensor([[[0.5, 0.0]]]))
    cos, sin = rotation.unbind(-1)
    angle = 0.5 * math.pi
    # Pairs 0 and 2 turn with y, pairs 1 and 3 with x (here 0). The float32 angle (0.5 times the
    # exp of a rounded log π) is within 2 ulps of π/2, and cos, sin move by as much plus an ulp.
    tolerance = dict(rtol=0, atol=4 * EPS32)
    assert torch.allclose(cos[0, 0, 0], torch.tensor([math.cos(angle), 1, math.cos(angle), 1]), **tolerance)
    assert torch.allclose(sin[0, 0, 0], torch.tensor([math.sin(angle), 0, math.sin(angle), 0]), **tolerance)


def test_rope_inits():
    assert torch.allclose(AxialRoPE(2, 16, "hdm").freqs.exp(), torch.tensor(math.pi))
    spaced = AxialRoPE(2, 16, "spaced").freqs.exp()
    assert torch.allclose(spaced[0, [0, -1], 0], torch.tensor([math.pi, 5 * math.pi]))
