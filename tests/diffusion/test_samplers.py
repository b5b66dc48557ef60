"""Samplers on a problem with a known answer, and the guidance combinator.

Data x0 ~ N(μ, σ²) per element and noise ε ~ N(0, 1): x_t = t·ε + (1 − t)·x0 is Gaussian with mean
m_t = (1 − t)·μ and variance s_t² = t² + (1 − t)²σ², and the exact velocity is
v(x, t) = E[ε − x0 | x_t = x] = −μ + (x − m_t)·(t − (1 − t)σ²)/s_t². The ODE's flow map is affine, so
noise x1 lands exactly on μ + σ·x1.
"""

import math

import pytest
import torch

from homediff.diffusion.samplers import SAMPLERS, euler, get_sampler, guided_denoiser, heun, time_grid
from homediff.errors import ConfigError

MU, SIGMA = 2.0, 0.5


def gaussian_velocity(x, t):
    t = t.double()
    var = t**2 + (1 - t) ** 2 * SIGMA**2
    return -MU + (x.double() - (1 - t) * MU) * (t - (1 - t) * SIGMA**2) / var


def noise(n, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def slope(steps, errors):
    """Least-squares slope of log(error) against log(steps)."""
    xs, ys = torch.log(torch.tensor(steps, dtype=torch.float64)), torch.log(torch.tensor(errors))
    xs, ys = xs - xs.mean(), ys - ys.mean()
    return float((xs * ys).sum() / (xs * xs).sum())


@pytest.mark.parametrize("sampler, order", [(euler, 1), (heun, 2)])
def test_error_falls_with_the_method_order(sampler, order):
    x1 = noise(1000)
    steps = [4, 8, 16, 32, 64]
    errors = [(sampler(gaussian_velocity, x1, time_grid(n)).double() - (MU + SIGMA * x1)).abs().max()
              for n in steps]
    measured = slope(steps, [float(e) for e in errors])
    assert measured == pytest.approx(-order, abs=0.15), errors


def test_samples_have_the_data_mean_and_variance():
    samples = heun(gaussian_velocity, noise(20000, seed=1), time_grid(32))
    assert samples.mean().item() == pytest.approx(MU, abs=0.01)
    assert samples.std().item() == pytest.approx(SIGMA, abs=0.01)


def test_shifted_grid_also_converges():
    x1 = noise(1000)
    grid = time_grid(64, shift=3.0)
    assert grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    assert grid[32] == pytest.approx(0.75)  # t = 0.5 shifted by 3
    steps = [8, 16, 32, 64]
    errors = [float((heun(gaussian_velocity, x1, time_grid(n, shift=3.0)).double()
                     - (MU + SIGMA * x1)).abs().max()) for n in steps]
    assert slope(steps, errors) == pytest.approx(-2, abs=0.2), errors


def test_euler_on_the_uniform_grid_is_hdm_sampler():
    """x ← x − Δ·v at t_k = 1 − kΔ, with Δ = 1/N."""
    calls = []

    def velocity(x, t):
        calls.append(float(t))
        return torch.sin(3 * x) + t

    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    ours = euler(velocity, x, time_grid(8))
    expected = x.clone()
    for k in range(8):
        expected = expected - (1 / 8) * (torch.sin(3 * expected) + (1 - k / 8))
    assert calls == pytest.approx([1 - k / 8 for k in range(8)])
    # the same 8 steps written in another order: each may round its product and its sum apart,
    # 2 ulps of |x| a step, which the next step carries on with gain 1 + 3/8 (|d sin(3x)/dx| ≤ 3)
    gain = sum((1 + 3 / 8) ** k for k in range(8))
    assert (ours - expected).abs().max() <= 2 * gain * torch.finfo(torch.float32).eps * expected.abs().max()


def test_heun_costs_two_evaluations_per_step_but_none_at_zero():
    times = []
    heun(lambda x, t: times.append(float(t)) or x, torch.ones(3), time_grid(5))
    assert len(times) == 2 * 5 - 1 and min(times) > 0


def test_callback_sees_every_step():
    seen = []
    euler(lambda x, t: x, torch.ones(2), time_grid(4),
          callback=lambda k, t, x: seen.append((k, float(t))))
    assert seen == [(0, 0.75), (1, 0.5), (2, 0.25), (3, 0.0)]


class Recorder:
    """A fake model: velocity = mean of the context per sample + 10·rate; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, ctx, rate):
        self.calls.append((x.shape[0], rate))
        return x * 0 + ctx.mean(dim=(1, 2)).view(-1, 1) + 10 * rate


COND, UNCOND = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)


def test_guidance_combines_the_branches():
    model = Recorder()
    v = guided_denoiser(model, COND, UNCOND, scale=3.0)(torch.zeros(2, 5), torch.tensor(0.5))
    assert torch.allclose(v, torch.full((2, 5), -1 + 3 * (2 - -1.0)))
    assert model.calls == [(4, 0.0)]  # one batch of 2B


def test_scale_one_is_the_conditional_branch_alone():
    model = Recorder()
    v = guided_denoiser(model, COND, UNCOND, scale=1.0, rates=(0.0, 0.5))(torch.zeros(2, 5), 0.5)
    assert torch.equal(v, torch.full((2, 5), 2.0)) and model.calls == [(2, 0.0)]


def test_each_branch_gets_its_own_routing_rate():
    model = Recorder()
    v = guided_denoiser(model, COND, UNCOND, scale=2.0, rates=(0.1, 0.3))(torch.zeros(2, 5), 0.5)
    v_c, v_u = 2 + 1.0, -1 + 3.0
    assert torch.allclose(v, torch.full((2, 5), v_u + 2 * (v_c - v_u)))
    assert model.calls == [(2, 0.1), (2, 0.3)]


def test_batched_and_separate_guidance_agree():
    x = torch.randn(2, 5)
    batched = guided_denoiser(Recorder(), COND, UNCOND, 2.5)(x, 0.3)
    model = Recorder()
    separate = guided_denoiser(model, COND, UNCOND, 2.5, batch=False)(x, 0.3)
    assert torch.allclose(batched, separate) and model.calls == [(2, 0.0), (2, 0.0)]
    # contexts of different lengths cannot share a batch
    model = Recorder()
    guided_denoiser(model, COND, UNCOND[:, :2], 2.5)(x, 0.3)
    assert model.calls == [(2, 0.0), (2, 0.0)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=-1.0), "guidance scale must be a number >= 0"),
    (dict(scale=2.0, rates=(0.0, 1.0)), r"tread_gamma rates must be in \[0, 1\)"),
    (dict(scale=2.0, rates=0.5), "tread_gamma must be a pair"),
])
def test_invalid_guidance_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        guided_denoiser(Recorder(), COND, UNCOND, **kwargs)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_invalid_step_counts_raise(steps):
    with pytest.raises(ConfigError, match="number of sampling steps must be a positive integer"):
        time_grid(steps)


def test_unknown_sampler_names_the_choices():
    assert get_sampler("heun") is heun and set(SAMPLERS) == {"euler", "heun"}
    with pytest.raises(ConfigError, match="unknown sampler 'dpm'; choose one of: euler, heun"):
        get_sampler("dpm")


def test_uniform_grid_values():
    assert torch.allclose(time_grid(4), torch.tensor([1, 0.75, 0.5, 0.25, 0]))
    assert math.isclose(float(time_grid(1)[0]), 1.0)
