import pytest
import torch

from homediff.errors import ConfigError
from homediff.flow import (add_noise, flow_loss, resolution_shift, sample_time, shift_time,
                           velocity_target)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_path_endpoints_and_velocity_is_its_time_derivative():
    x0, noise = torch.randn(3, 4, 5, 5, generator=gen(0)), torch.randn(3, 4, 5, 5, generator=gen(1))
    assert torch.equal(add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(3)), noise)
    t, h = torch.tensor([0.2, 0.5, 0.9]), 1e-3
    derivative = (add_noise(x0, noise, t + h) - add_noise(x0, noise, t)) / h
    assert torch.allclose(derivative, velocity_target(x0, noise), atol=1e-2)
    # one time per sample: sample 1 is halfway
    assert torch.allclose(add_noise(x0, noise, t)[1], (x0[1] + noise[1]) / 2)


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
    x0, noise = torch.randn(2, 3, 4, 4, generator=gen(0)), torch.randn(2, 3, 4, 4, generator=gen(1))
    target = noise - x0
    assert flow_loss(target, x0, noise) == 0
    prediction = (target + 0.5).requires_grad_()
    loss = flow_loss(prediction, x0, noise)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert torch.allclose(prediction.grad, torch.full_like(target, 2 * 0.5 / target.numel()))


def test_contrastive_loss_subtracts_the_error_to_another_samples_velocity():
    x0, noise = torch.randn(3, 2, 4, 4, generator=gen(0)), torch.randn(3, 2, 4, 4, generator=gen(1))
    target = noise - x0
    prediction = target + 0.5
    others = torch.stack([target[2], target[0], target[1]])  # sample i is pushed away from i - 1's
    expected = 0.25 - 0.05 * (prediction - others).square().mean()
    assert flow_loss(prediction, x0, noise, contrastive=0.05).item() == pytest.approx(expected.item())
    assert flow_loss(prediction, x0, noise, contrastive=0.0).item() == pytest.approx(0.25)
    single = flow_loss(prediction[:1], x0[:1], noise[:1], contrastive=0.05)  # no other sample
    assert single.item() == pytest.approx(0.25)


@pytest.mark.parametrize("call", [lambda: shift_time(torch.ones(1), 0.0),
                                  lambda: sample_time(2, std=-1.0)])
def test_invalid_settings_raise(call):
    with pytest.raises(ConfigError):
        call()
