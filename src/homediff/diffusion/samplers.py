"""Samplers for the flow ODE dx/dt = v(x, t), run from t = 1 (noise) to t = 0 (data), and guidance.

A sampler is a pure function ``sampler(denoise, x, ts, callback=None)`` over a callable
``denoise(x, t) → v`` and a decreasing time grid ``ts`` (N + 1 times from 1 to 0, N steps):

* ``euler``: x ← x + (t_{k+1} − t_k)·v(x, t_k); on HDM's uniform grid this is the original sampler;
* ``heun``: Euler's prediction corrected by the mean of the two slopes (second order); the last step,
  to t = 0, is a plain Euler step, so a run costs 2N − 1 evaluations.

``guided_denoiser`` builds ``denoise`` from a model callable ``velocity(x, t, ctx, rate)``:
classifier-free guidance v = v_u + s·(v_c − v_u), where the conditional and unconditional branches
each run at their own TREAD routing rate (γ_c, γ_u; 0 = no routing). HDM's "guidance by routing rate"
is γ_u > γ_c: the unconditional branch is also a weaker model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from homediff.diffusion.flow import shift_time
from homediff.errors import ConfigError

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]  # may return new latents


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 1 to 0: uniform (HDM), or shifted by t ← s·t / (1 + (s − 1)·t)."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"the number of sampling steps must be a positive integer, got {steps!r}")
    uniform = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift_time(uniform, shift).to(device=device, dtype=torch.float32)


def euler(denoise: Denoise, x: torch.Tensor, ts: torch.Tensor,
          callback: Callback | None = None) -> torch.Tensor:
    """First-order steps along the grid ``ts``; x is kept in float32."""
    x = x.float()
    for k in range(len(ts) - 1):
        x = x + (ts[k + 1] - ts[k]) * denoise(x, ts[k]).float()
        if callback is not None:
            x = _replaced(callback(k, ts[k + 1], x), x)
    return x


def _replaced(returned, x: torch.Tensor) -> torch.Tensor:
    """A callback may return new latents (diffusers' callback_on_step_end does); None keeps x."""
    return x if returned is None else returned.float()


def heun(denoise: Denoise, x: torch.Tensor, ts: torch.Tensor,
         callback: Callback | None = None) -> torch.Tensor:
    """Second-order steps (Heun's method) along ``ts``; the step to t = 0 is an Euler step."""
    x = x.float()
    for k in range(len(ts) - 1):
        t, t_next = ts[k], ts[k + 1]
        slope = denoise(x, t).float()
        predicted = x + (t_next - t) * slope
        if t_next > 0:
            slope = (slope + denoise(predicted, t_next).float()) / 2
            predicted = x + (t_next - t) * slope
        x = predicted
        if callback is not None:
            x = _replaced(callback(k, t_next, x), x)
    return x


SAMPLERS: dict[str, Callable] = {"euler": euler, "heun": heun}


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_rates(rates) -> tuple[float, float]:
    """A (γ_c, γ_u) pair of routing rates, each in [0, 1)."""
    try:
        rate_c, rate_u = (float(r) for r in rates)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"tread_gamma must be a pair of numbers (conditional, unconditional), "
                          f"got {rates!r}") from err
    if not (0 <= rate_c < 1 and 0 <= rate_u < 1):
        raise ConfigError(f"tread_gamma rates must be in [0, 1) (0 = no routing), got {rates!r}")
    return rate_c, rate_u


def check_scale(scale: float) -> None:
    if not scale >= 0:
        raise ConfigError(f"guidance scale must be a number >= 0 (1 = no guidance), got {scale!r}")


def guided_denoiser(velocity: Velocity, cond: torch.Tensor, uncond: torch.Tensor | None,
                    scale: float, rates=(0.0, 0.0), *, batch: bool = True) -> Denoise:
    """denoise(x, t) = v_u + s·(v_c − v_u), v_c = velocity(x, t, cond, γ_c), v_u likewise.

    Scale 1 runs the conditional branch only. When both branches have the same rate and context
    shape (and ``batch``), they run as one batch of 2B.
    """
    check_scale(scale)
    rate_c, rate_u = check_rates(rates)
    if scale != 1 and uncond is None:
        raise ConfigError("guidance with a scale other than 1 needs unconditional context")
    together = batch and rate_c == rate_u and uncond is not None and cond.shape == uncond.shape
    both = torch.cat((cond, uncond)) if together else None

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1:
            return velocity(x, t, cond, rate_c)
        if together:
            v_c, v_u = velocity(torch.cat((x, x)), t, both, rate_c).chunk(2)
        else:
            v_c, v_u = velocity(x, t, cond, rate_c), velocity(x, t, uncond, rate_u)
        return v_u + scale * (v_c - v_u)

    return denoise
