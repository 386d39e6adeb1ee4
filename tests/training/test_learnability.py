"""Learnability: a broken objective or sampler must not land again.

The overfit check trains a small teacher for a few hundred steps on one generated scene and
requires its sampled completion (the VE sampler it ships with, from t0) to get closer to the
ground truth than both the untrained model and the noised scan it starts from.
"""

from __future__ import annotations

import numpy as np
import torch

from lidar_completion.config import ScanCut
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.diffusion import NoiseSchedule
from lidar_completion_training.dataset import CompletionDataset, PairConfig
from lidar_completion_training.diagnostics import noise_mse_by_bucket, sampled_chamfer, timestep_buckets
from lidar_completion_training.metrics import chamfer_distance
from lidar_completion_training.objectives import seeded_generator, teacher_loss

T0 = 300


def one_scene(root) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10 m scene at about the shipped preset's density (the lite sensor is sparser)."""
    item = CompletionDataset(root, ["00"], PairConfig(cut=ScanCut.for_training(200, 2000, max_range=10.0)))[2]
    return torch.from_numpy(item["partial"])[None], torch.from_numpy(item["full"])[None]


def test_a_few_hundred_teacher_steps_on_one_scene_lower_its_sampled_chamfer(tiny_dataset):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        partial, full = one_scene(tiny_dataset)
        model = CompletionModel(ModelConfig(channel_ratio=0.25, sampler="ve", t0=T0, prediction="displacement"))
        schedule = NoiseSchedule.of(model.config)
        pair = [(partial, full)]
        untrained = sampled_chamfer(model, pair, steps=4)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for step in range(300):
            loss = teacher_loss(model, schedule, partial, full, seeded_generator(0, step), uncond_prob=0.0, reg_weight=0.0, max_timestep=T0)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained = sampled_chamfer(model, pair, steps=4)
        g = torch.Generator().manual_seed(0)  # the start the sampler denoises (same seed as sampled_chamfer)
        start = partial.repeat(1, 10, 1) + float(schedule.noise_scale(torch.tensor([T0]))) * torch.randn(full.shape, generator=g)
        noised_scan = chamfer_distance(start[0].numpy(), full[0].numpy())
        print(f"sampled CD: untrained {untrained:.3f} m, noised scan {noised_scan:.3f} m, after 300 steps {trained:.3f} m")
        assert trained < 0.8 * untrained
        assert trained < 0.9 * noised_scan
    finally:
        torch.set_num_threads(threads)


def test_noise_mse_by_bucket_is_repeatable_and_covers_the_range(tiny_dataset):
    torch.manual_seed(0)
    partial, full = one_scene(tiny_dataset)
    model = CompletionModel(ModelConfig(channel_ratio=0.25)).eval()
    buckets = timestep_buckets(600, 4)
    assert buckets[0][0] == 0 and buckets[-1][1] == 600
    assert all(a[1] + 1 == b[0] for a, b in zip(buckets, buckets[1:]))
    first = noise_mse_by_bucket(model, [(partial, full)], buckets)
    assert list(first) == [f"mse_t{lo:03d}-{hi:03d}" for lo, hi in buckets] and len(first) == 4
    assert all(np.isfinite(v) and v > 0 for v in first.values())
    assert noise_mse_by_bucket(model, [(partial, full)], buckets) == first
