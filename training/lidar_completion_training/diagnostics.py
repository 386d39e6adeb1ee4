"""Learnability diagnostics: is the denoiser learning, and at which noise levels?

A single training loss hides where a diffusion model fails: the MSE at tiny noise levels is
irreducible (5 cm voxels cannot see millimetre displacements) and dominates nothing, while
the levels the sampler actually starts from decide the completion. So training logs the
noise-prediction MSE per timestep bucket on *held-out* pairs, always with the same noise
(``diag/mse_t<lo>-<hi>``; 1.0 = no better than predicting zero), and the report plots it.
Sampled Chamfer distance against the number of steps is the other half (see
:func:`sampled_chamfer`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lidar_completion.config import PUBLISHED_CUT
from lidar_completion.model import CompletionModel
from lidar_completion.completer import encode_scans, predict_noise

from .metrics import chamfer_distance
from .objectives import generate, sample_bound

__all__ = ["timestep_buckets", "noise_mse_by_bucket", "sampled_chamfer"]


def timestep_buckets(max_timestep: int, count: int = 6) -> list[tuple[int, int]]:
    """``count`` contiguous [lo, hi] timestep ranges covering [0, max_timestep]."""
    edges = np.linspace(0, max_timestep + 1, count + 1).round().astype(int)
    return [(int(lo), int(hi) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


@torch.no_grad()
def noise_mse_by_bucket(
    model: CompletionModel,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    buckets: Sequence[tuple[int, int]],
    seed: int = 0,
) -> dict[str, float]:
    """Mean noise-prediction MSE per bucket over ``pairs`` of (partial [1, n, 3], full [1, N, 3]).

    Timestep and noise of pair ``i`` in bucket ``b`` are a pure function of ``(seed, i, b)``,
    so successive calls during training measure the same thing.
    """
    schedule = model.schedule
    was_training = model.training
    model.eval()
    sums = {f"mse_t{lo:03d}-{hi:03d}": 0.0 for lo, hi in buckets}
    for i, (partial, full) in enumerate(pairs):
        scan = encode_scans(model, partial)
        for b, ((lo, hi), key) in enumerate(zip(buckets, sums)):
            g = torch.Generator(full.device).manual_seed(int(np.random.SeedSequence([seed, i, b]).generate_state(1)[0]))
            t = torch.randint(lo, hi + 1, (1,), generator=g, device=full.device)
            noise = torch.randn(full.shape, generator=g, device=full.device)
            eps = predict_noise(model, schedule.add_noise(full, noise, t), [scan], t)[0]
            sums[key] += float(((eps - noise) ** 2).mean()) / len(pairs)
    model.train(was_training)
    return sums


@torch.no_grad()
def sampled_chamfer(
    model: CompletionModel,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    repeat: int = PUBLISHED_CUT.repeat,
    seed: int = 0,
) -> float:
    """Mean Chamfer distance (m) of ``steps``-step samples (the model's own sampler and t0,
    the loop distillation trains through) to the ground truth of ``pairs``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for partial, full in pairs:
        g = torch.Generator(partial.device).manual_seed(seed)
        noise = torch.randn(partial.shape[0], partial.shape[1] * repeat, 3, generator=g, device=partial.device)
        points = generate(model, model.denoiser, partial, encode_scans(model, partial), noise, 1.0, steps, repeat, g, sample_bound(partial))
        total += chamfer_distance(points[0].cpu().numpy(), full[0].cpu().numpy()) / len(pairs)
    model.train(was_training)
    return total
