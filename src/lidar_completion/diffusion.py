"""The "local" diffusion process of LiDiff, its two samplers and the one sampling loop.

LiDiff does not scale the clean points: training noises ground truth as
``x_t = x_0 + sigma_t * eps`` with ``sigma_t = sqrt(1 - abar_t)`` — a variance-exploding
(VE) process indexed by the integer timestep. Two samplers integrate it:

* ``"dpmsolver++"`` (published): diffusers' DPM-Solver++ (SDE, order 2) on the *offsets*
  ``x_t - x_init``, starting at ``x_init + eps``. It treats the offsets as a
  variance-preserving process (``x_0 = (x_t - sigma_t eps) / alpha_t``), which amplifies
  the predicted displacement by ``1 / alpha_t`` (~5.9x at t = 999). Kept as the default
  for published checkpoints: their numbers were measured with it.
* ``"ve"`` (consistent with training): deterministic DDIM steps of the VE process,
  ``x_0 = x_t - sigma_t eps_hat``, ``x_s = x_0 + sigma_s eps_hat``, from the scan noised to
  a start timestep ``t0`` (``x_init + sigma_t0 eps``, as LiDPM does). Written here rather
  than taken from diffusers because diffusers' VE-style schedulers (Euler, k-diffusion
  sigmas) derive sigma as ``sqrt((1 - abar) / abar)`` and map it back to a float timestep;
  this process's sigma is ``sqrt(1 - abar)`` at integer timesteps, and the step is one line.

:func:`sample` is the only loop that calls a denoiser step by step; the completer (node,
CLI, evaluation) and distillation (the student's differentiable samples) both use it.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from .config import SAMPLERS

__all__ = ["SAMPLERS", "Cancelled", "NoiseSchedule", "Sampler", "VESampler", "PublishedSampler", "make_sampler",
           "clip_noise", "sample"]


class Cancelled(Exception):
    """The caller's ``should_stop()`` said so between two steps: the sample was abandoned."""


class NoiseSchedule:
    """Linear betas (published defaults 3.5e-5 ... 0.007 over T = 1000) for training."""

    def __init__(self, beta_start: float = 3.5e-5, beta_end: float = 0.007, num_train_timesteps: int = 1000):
        self.beta_start, self.beta_end, self.num_train_timesteps = beta_start, beta_end, num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()

    @classmethod
    def of(cls, config) -> "NoiseSchedule":
        """The schedule of a model config (anything with beta_start, beta_end, num_train_timesteps)."""
        return cls(config.beta_start, config.beta_end, config.num_train_timesteps)

    def noise_scale(self, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(1 - abar_t)`` for integer timesteps ``t``."""
        return (1.0 - self.alphas_cumprod.to(t.device)[t]).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Local noising ``x_0 + sqrt(1 - abar_t) eps``; ``t`` has one entry per batch row of x0 [B, N, 3]."""
        return x0 + self.noise_scale(t).view(-1, *([1] * (x0.ndim - 1))) * noise

    def timesteps(self, steps: int, t0: int | None = None) -> list[int]:
        """``steps`` integer timesteps evenly spaced from ``t0`` (default T - 1) down towards 0."""
        t0 = self.num_train_timesteps - 1 if t0 is None else t0
        if not 1 <= steps <= t0 + 1:
            raise ValueError(f"steps must be in [1, {t0 + 1}] for a start timestep {t0}, got {steps}")
        return np.linspace(t0, 0, steps + 1).round().astype(np.int64)[:-1].tolist()


class Sampler(Protocol):
    """What :func:`sample` needs: the timesteps, the start noise scale and a step."""

    timesteps: torch.Tensor
    start_scale: float

    def step(self, eps: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, x_init: torch.Tensor,
             generator: list[torch.Generator] | torch.Generator | None = None) -> torch.Tensor: ...


class VESampler:
    """Deterministic VE / DDIM steps of the local process (consistent with training)."""

    def __init__(self, schedule: NoiseSchedule, steps: int, t0: int | None = None):
        ts = schedule.timesteps(steps, t0)
        self.timesteps = torch.tensor(ts)
        sigmas = schedule.noise_scale(self.timesteps).tolist()
        self.start_scale = sigmas[0]
        self._next = dict(zip(ts, sigmas[1:] + [0.0]))  # the last step lands on clean points
        self._sigma = dict(zip(ts, sigmas))

    def step(self, eps, t, x_t, x_init, generator=None):
        t = int(t)
        return x_t + (self._next[t] - self._sigma[t]) * eps


class PublishedSampler:
    """LiDiff's DPM-Solver++ (SDE, order 2) on the offsets ``x_t - x_init`` (fresh state per sample)."""

    def __init__(self, schedule: NoiseSchedule, steps: int, t0: int | None = None):
        # heavy import, only on this path; from its module (diffusers/__init__ types it as the dummy)
        from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

        last = schedule.num_train_timesteps - 1
        self.solver = DPMSolverMultistepScheduler(
            num_train_timesteps=schedule.num_train_timesteps,
            beta_start=schedule.beta_start,
            beta_end=schedule.beta_end,
            beta_schedule="linear",
            algorithm_type="sde-dpmsolver++",
            solver_order=2,
        )
        if t0 is None or t0 == last:
            schedule.timesteps(steps)  # same validation as the VE sampler
            self.solver.set_timesteps(steps)
            self.start_scale = 1.0  # published: x_init + eps
        else:
            self.solver.set_timesteps(timesteps=schedule.timesteps(steps, t0))
            self.start_scale = float(schedule.noise_scale(torch.tensor([t0])))
        self.timesteps = self.solver.timesteps

    def step(self, eps, t, x_t, x_init, generator=None):
        return x_init + self.solver.step(eps, t, x_t - x_init, generator=generator).prev_sample


def make_sampler(config, kind: str, steps: int, t0: int | None = None) -> Sampler:
    """A fresh sampler of ``kind`` for a model config's schedule (``t0`` None: start at T - 1)."""
    schedule = NoiseSchedule.of(config)
    if t0 is not None and not 1 <= t0 < schedule.num_train_timesteps:
        raise ValueError(f"start timestep t0 must be in [1, {schedule.num_train_timesteps - 1}], got {t0}")
    if kind == "ve":
        return VESampler(schedule, steps, t0)
    if kind == "dpmsolver++":
        return PublishedSampler(schedule, steps, t0)
    raise ValueError(f"unknown sampler {kind!r} (use one of {list(SAMPLERS)})")


def clip_noise(eps: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``eps`` [B, N, 3] with every point's prediction scaled down to norm ``max_norm`` where
    it is longer, and the number of such points per batch row [B]. A step moves a point by
    ``(sigma_next - sigma_t) * eps`` (VE), so this bounds each move to ``max_norm * sigma_t``:
    a model asked about a scan unlike its training data can no longer run away."""
    norm = eps.norm(dim=-1, keepdim=True)
    over = norm > max_norm
    scale = torch.where(over, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
    return eps * scale, over.squeeze(-1).sum(dim=1)


def sample(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler: Sampler,
    x_init: torch.Tensor,
    noise: torch.Tensor,
    generator: list[torch.Generator] | torch.Generator | None = None,
    bound: float | None = None,
    noise_clip: float | None = None,
    clipped: torch.Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Points from ``x_init + start_scale * noise`` after every step of ``sampler``;
    ``predict(x_t, t)`` is the (possibly guided) noise prediction. ``noise_clip`` bounds
    each point's predicted noise norm (:func:`clip_noise`) and adds the clipped predictions
    per batch row to ``clipped`` [B] when given. ``bound`` is the last resort that keeps
    points in a box, so a weak model cannot overflow voxel coordinates. ``should_stop()``
    is asked before every step; when it is true the sample is abandoned with
    :class:`Cancelled` (a node shutting down does not wait for a 50-step teacher)."""
    x_t = x_init + sampler.start_scale * noise
    for t in sampler.timesteps:
        if should_stop is not None and should_stop():
            raise Cancelled(f"sampling stopped before timestep {int(t)}")
        eps = predict(x_t, t.to(x_t.device).reshape(1))
        if noise_clip is not None:
            eps, over = clip_noise(eps, noise_clip)
            if clipped is not None:
                clipped += over
        x_t = sampler.step(eps, t, x_t, x_init, generator)
        if bound is not None:
            x_t = x_t.clamp(-bound, bound)
    return x_t
