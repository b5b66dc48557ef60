"""The training loss as a pure function: the same batch, components and generator state give the
same loss; the position maps follow the latent grid; autocast is the settings' or the caller's."""

import pytest
import torch
from torch import nn

from homediff.diffusion import flow
from homediff.training.objective import LossSettings, flow_matching_loss, latent_positions


class Recorder(nn.Module):
    """A stand-in backbone: a per-channel scale, recording its inputs and the autocast state."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.5, -0.25]).double())
        self.calls = []

    def forward(self, x, t, ctx, *, pos_map, aspect, tread_rate, generator):
        self.calls.append({"t": t, "autocast": torch.is_autocast_enabled("cpu"), "tread": tread_rate})
        return x * self.scale.view(1, -1, 1, 1)


def test_the_loss_is_a_function_of_its_inputs_and_generator_state():
    model = Recorder()
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    ctx = torch.randn(3, 5, 8, dtype=torch.float64)
    settings = LossSettings(time_mean=-0.5, time_std=0.7, tread_rate=0.25)
    a = flow_matching_loss(model, x0, ctx, settings, torch.Generator().manual_seed(3))
    b = flow_matching_loss(model, x0, ctx, settings, torch.Generator().manual_seed(3))
    c = flow_matching_loss(model, x0, ctx, settings, torch.Generator().manual_seed(4))
    assert a.item() == b.item() != c.item()
    assert model.calls[0]["tread"] == 0.25

    # the same value written out: times and noise drawn in that order from the generator
    g = torch.Generator().manual_seed(3)
    t = torch.sigmoid(-0.5 + 0.7 * torch.randn(3, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    x_t = flow.add_noise(x0, noise, t)
    expected = ((x_t * model.scale.view(1, -1, 1, 1)).float() - (noise - x0).float()).square().mean()
    assert torch.equal(model.calls[0]["t"], t.to(model.calls[0]["t"].dtype))
    assert a.item() == pytest.approx(expected.item(), rel=4 * torch.finfo(torch.float32).eps)


def test_shifted_times_move_towards_noise():
    model = Recorder()
    x0, ctx = torch.zeros(64, 2, 2, 2), torch.zeros(64, 1, 4)
    flow_matching_loss(model, x0, ctx, LossSettings(), torch.Generator().manual_seed(0))
    flow_matching_loss(model, x0, ctx, LossSettings(), torch.Generator().manual_seed(0), shift=3.0)
    plain, shifted = model.calls[0]["t"], model.calls[1]["t"]
    # s·t / (1 + (s − 1)·t) adds ln s to the logit of every time
    assert torch.allclose(torch.logit(shifted.double()) - torch.logit(plain.double()),
                          torch.full((64,), torch.log(torch.tensor(3.0, dtype=torch.float64)).item(),
                                     dtype=torch.float64), atol=1e-5)


def test_autocast_is_the_settings_choice_and_none_keeps_the_callers():
    model, x0, ctx = Recorder().float(), torch.randn(2, 2, 2, 2), torch.randn(2, 1, 4)
    g = torch.Generator()
    flow_matching_loss(model, x0, ctx, LossSettings(), g)
    flow_matching_loss(model, x0, ctx, LossSettings(autocast=torch.bfloat16), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a precision probe times the loss this way
        flow_matching_loss(model, x0, ctx, LossSettings(), g)
    assert [call["autocast"] for call in model.calls] == [False, True, True]


def test_latent_positions_average_each_cell_of_the_pixel_map():
    side, factor = 8, 4
    pos = torch.randn(2, side * side, 2, dtype=torch.float64)
    out = latent_positions(pos, side, factor)
    grid = pos.reshape(2, side, side, 2)
    cell = grid[:, 4:8, 0:4].reshape(2, -1, 2).mean(dim=1)  # latent row 1, column 0
    assert out.shape == (2, 4, 2) and torch.allclose(out[:, 2], cell, rtol=0, atol=1e-15)
    assert latent_positions(pos, side, 1) is pos
