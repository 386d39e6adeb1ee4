"""The published "local" diffusion parameterisation and its few-step sampler.

LiDiff does not scale the clean points: training noises ground truth as
``x_t = x_0 + sqrt(1 - abar_t) * eps`` and sampling starts at ``x_init + eps`` (the scan
repeated x10 plus unit noise), integrating the *offsets* ``x_t - x_init`` with diffusers'
DPM-Solver++ (SDE, order 2). The scheduler never calls the network (diffusers' contract);
the loop that does lives in :mod:`lidar_completion.completer`.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler

__all__ = ["NoiseSchedule", "make_sampler"]


class NoiseSchedule:
    """Linear betas (published defaults 3.5e-5 ... 0.007 over T = 1000) for training."""

    def __init__(self, beta_start: float = 3.5e-5, beta_end: float = 0.007, num_train_timesteps: int = 1000):
        self.beta_start, self.beta_end, self.num_train_timesteps = beta_start, beta_end, num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()

    def noise_scale(self, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(1 - abar_t)`` for integer timesteps ``t``."""
        return (1.0 - self.alphas_cumprod.to(t.device)[t]).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Local noising ``x_0 + sqrt(1 - abar_t) eps``; ``t`` has one entry per batch row of x0 [B, N, 3]."""
        return x0 + self.noise_scale(t).view(-1, *([1] * (x0.ndim - 1))) * noise

    def sampler(self, steps: int) -> DPMSolverMultistepScheduler:
        return make_sampler(steps, self.beta_start, self.beta_end, self.num_train_timesteps)


def make_sampler(
    steps: int, beta_start: float = 3.5e-5, beta_end: float = 0.007, num_train_timesteps: int = 1000
) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ SDE, order 2, set to ``steps`` steps (fresh state every call)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule="linear",
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
    )
    scheduler.set_timesteps(steps)
    return scheduler
