import pytest
import torch

from homediff.diffusion.flow import (add_noise, flow_loss, resolution_shift, sample_time,
                                     shift_time, velocity_target)
from homediff.errors import ConfigError

EPS64 = torch.finfo(torch.float64).eps


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def on_grid(*shape, seed=0):
    """Values in [-1, 1) on a grid of 1/64: the sums, differences and squares below are exact in
    float32 (they need at most 12 bits after the point and 11 before it)."""
    return torch.randint(-64, 64, shape, generator=gen(seed)) / 64


def test_path_endpoints_and_velocity_is_its_time_derivative():
    """x_t is linear in t, so a difference quotient equals the velocity up to rounding. In float64:
    each x_t is within 2 ulps of |ε| + |x0|, and t + h within ½ ulp of 1; over h = 2^-10 that is at
    most 5·eps64/h·(|ε| + |x0|) per element."""
    x0 = torch.randn(3, 4, 5, 5, generator=gen(0), dtype=torch.float64)
    noise = torch.randn(3, 4, 5, 5, generator=gen(1), dtype=torch.float64)
    assert torch.equal(add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(3)), noise)
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 2.0 ** -10
    derivative = (add_noise(x0, noise, t + h) - add_noise(x0, noise, t)) / h
    bound = 5 * EPS64 / h * (noise.abs() + x0.abs())
    assert ((derivative - velocity_target(x0, noise)).abs() <= bound).all()
    # one time per sample: sample 1 is halfway (halving is exact, so is this)
    assert torch.equal(add_noise(x0, noise, t)[1], (x0[1] + noise[1]) / 2)


def test_default_time_is_sigmoid_of_a_standard_normal():
    t = sample_time(20000, generator=gen())
    logit = torch.log(t / (1 - t))
    assert 0 < t.min() and t.max() < 1
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03


def test_logit_normal_mean_and_std_are_configurable():
    t = sample_time(20000, mean=1.5, std=0.5, generator=gen())
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 1.5) < 0.02 and abs(logit.std() - 0.5) < 0.02


def test_time_draws_repeat_with_the_generator():
    assert torch.equal(sample_time(8, generator=gen(3)), sample_time(8, generator=gen(3)))
    assert not torch.equal(sample_time(8, generator=gen(3)), sample_time(8, generator=gen(4)))


def test_shift_moves_time_towards_noise():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    assert shift_time(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    # the median of the shifted distribution is the shifted median
    median = sample_time(20001, shift=3.0, generator=gen()).median()
    assert median == pytest.approx(0.75, abs=0.01)


def test_resolution_shift_follows_the_pixel_count():
    assert resolution_shift(256, 256) == 1.0
    assert resolution_shift(512, 512) == 2.0
    assert resolution_shift(1024, 256, base=256) == pytest.approx(2.0)
    assert resolution_shift(128, 128) == pytest.approx(0.5)


def test_loss_is_the_mean_squared_velocity_error():
    x0, noise = on_grid(2, 3, 4, 4, seed=0), on_grid(2, 3, 4, 4, seed=1)
    target = noise - x0
    assert flow_loss(target, x0, noise) == 0
    prediction = (target + 0.5).requires_grad_()
    loss = flow_loss(prediction, x0, noise)
    assert loss.item() == 0.25  # exact on the grid
    loss.backward()
    assert torch.equal(prediction.grad, torch.full_like(target, 2 * 0.5 / target.numel()))


def test_contrastive_loss_subtracts_the_error_to_another_samples_velocity():
    x0, noise = on_grid(3, 2, 4, 4, seed=0), on_grid(3, 2, 4, 4, seed=1)
    target = noise - x0
    prediction = target + 0.5
    others = torch.stack([target[2], target[0], target[1]])  # sample i is pushed away from i - 1's
    mean_square = (prediction - others).square().mean().item()  # exact on the grid
    expected = 0.25 - 0.05 * mean_square
    # float32 rounds 0.05, 0.05·m and the difference: ½ ulp each of terms ≤ 0.05·m and 0.25
    tolerance = torch.finfo(torch.float32).eps * (0.05 * mean_square + 0.25)
    assert flow_loss(prediction, x0, noise, contrastive=0.05).item() == pytest.approx(expected, abs=tolerance)
    assert flow_loss(prediction, x0, noise, contrastive=0.0).item() == 0.25
    single = flow_loss(prediction[:1], x0[:1], noise[:1], contrastive=0.05)  # no other sample
    assert single.item() == 0.25


@pytest.mark.parametrize("call", [lambda: shift_time(torch.ones(1), 0.0),
                                  lambda: sample_time(2, std=-1.0)])
def test_invalid_settings_raise(call):
    with pytest.raises(ConfigError):
        call()
