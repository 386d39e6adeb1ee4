"""Samplers of the local diffusion process: the VE sampler is consistent with training (an
oracle noise prediction lands exactly on the clean points), the published path is unchanged,
and the sampler settings travel with a saved model (save / reload / step, in the style of
diffusers' scheduler tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lidar_completion.checkpoints import load_model, save_model
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.completer import SceneCompleter
from lidar_completion.config import CompletionConfig, ScanCut
from lidar_completion.diffusion import NoiseSchedule, make_sampler, sample

CONFIG = ModelConfig(channel_ratio=0.25)


def oracle(x0: torch.Tensor, schedule: NoiseSchedule):
    """The exact noise prediction for a process whose clean points are ``x0``."""
    return lambda x_t, t: (x_t - x0) / schedule.noise_scale(t.reshape(1))


@pytest.mark.parametrize("steps,t0", [(1, 999), (1, 300), (4, 300), (8, None)])
def test_ve_sampler_with_the_true_noise_lands_on_the_clean_points(steps, t0):
    schedule = NoiseSchedule.of(CONFIG)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 500, 3, generator=g) * 10
    x_init = x0 + 0.3 * torch.randn(x0.shape, generator=g)  # the scan: near, not on, the scene
    out = sample(oracle(x0, schedule), make_sampler(CONFIG, "ve", steps, t0), x_init, torch.randn(x0.shape, generator=g))
    assert torch.allclose(out, x0, atol=1e-4)


def test_published_sampler_amplifies_the_displacement_the_ve_one_does_not():
    """The issue's finding, as a check: with the true noise, DPM-Solver++ on the offsets
    treats them as variance-preserving and does not land on the clean points."""
    schedule = NoiseSchedule.of(CONFIG)
    x0 = torch.zeros(1, 200, 3)
    x_init = torch.full_like(x0, 0.5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    published = sample(oracle(x0, schedule), make_sampler(CONFIG, "dpmsolver++", 1), x_init, noise)
    consistent = sample(oracle(x0, schedule), make_sampler(CONFIG, "ve", 1), x_init, noise)
    assert (consistent - x0).abs().max() < 1e-4
    assert (published - x0).abs().mean() > 0.5


def test_published_sampler_keeps_diffusers_default_timesteps_and_unit_start_noise():
    from diffusers import DPMSolverMultistepScheduler

    reference = DPMSolverMultistepScheduler(beta_start=3.5e-5, beta_end=0.007, beta_schedule="linear")
    for steps in (1, 2, 8, 50):
        reference.set_timesteps(steps)
        sampler = make_sampler(CONFIG, "dpmsolver++", steps)
        assert sampler.timesteps.tolist() == reference.timesteps.tolist()
        assert sampler.start_scale == 1.0
    sampler = make_sampler(CONFIG, "dpmsolver++", 2, t0=300)
    assert sampler.timesteps.tolist() == [300, 150]
    assert sampler.start_scale == pytest.approx(float(NoiseSchedule.of(CONFIG).noise_scale(torch.tensor([300]))))


def test_ve_timesteps_start_at_t0_and_are_distinct():
    assert make_sampler(CONFIG, "ve", 4, 400).timesteps.tolist() == [400, 300, 200, 100]
    assert make_sampler(CONFIG, "ve", 1).timesteps.tolist() == [999]
    ts = make_sampler(CONFIG, "ve", 50, 100).timesteps.tolist()
    assert len(set(ts)) == 50 and ts == sorted(ts, reverse=True)


@pytest.mark.parametrize(
    "kind,steps,t0,message",
    [("ddim", 1, None, "unknown sampler"), ("ve", 5, 3, "steps must be in"), ("ve", 1, 1000, "t0 must be in"), ("ve", 0, None, "steps must be in")],
)
def test_bad_sampler_settings_are_rejected(kind, steps, t0, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(CONFIG, kind, steps, t0)


def test_model_and_completion_configs_validate_sampler_keys():
    with pytest.raises(ValueError, match="sampler must be one of"):
        ModelConfig(sampler="euler")
    with pytest.raises(ValueError, match="t0 must be in"):
        ModelConfig(t0=1000)
    with pytest.raises(ValueError, match="sampling.sampler"):
        CompletionConfig().replace(**{"sampling.sampler": "euler"})
    with pytest.raises(ValueError, match="sampling.t0"):
        CompletionConfig().replace(**{"sampling.t0": 0})


def test_sampler_settings_survive_save_and_reload_and_sample_the_same(tmp_path):
    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25, sampler="ve", t0=300, default_steps=2, default_guidance=1.0, cut=ScanCut.recorded_before(64, None))).eval()
    reloaded = load_model(save_model(model, tmp_path / "m"))
    assert (reloaded.config.sampler, reloaded.config.t0) == ("ve", 300)
    scan = np.random.default_rng(0).uniform(-15, 15, (2000, 3)).astype(np.float32)
    scan[:, 2] = np.abs(scan[:, 2]) / 10 - 1.5
    config = CompletionConfig().replace(device="cpu")
    first = SceneCompleter(model, config)
    second = SceneCompleter(reloaded, config)
    assert (first.sampler, first.t0, first.steps) == ("ve", 300, 2)
    np.testing.assert_array_equal(first.complete(scan).points, second.complete(scan).points)
    # The completion config overrides the model's own choice.
    override = SceneCompleter(model, config.replace(**{"sampling.sampler": "dpmsolver++", "sampling.t0": 999}))
    assert (override.sampler, override.t0) == ("dpmsolver++", 999)
    assert not np.array_equal(override.complete(scan).points, first.complete(scan).points)


def test_start_timestep_beyond_the_model_is_a_clear_error():
    model = CompletionModel(ModelConfig(channel_ratio=0.25, num_train_timesteps=500))
    with pytest.raises(ValueError, match="sampling.t0=600"):
        SceneCompleter(model, CompletionConfig().replace(device="cpu", **{"sampling.t0": 600}))


def test_displacement_models_are_read_back_as_noise_predictions():
    """A displacement model outputs x_0 - x_t; every consumer sees the same noise as an
    epsilon model would: eps = -(x_0 - x_t) / sigma_t."""
    model = CompletionModel(ModelConfig(channel_ratio=0.25, prediction="displacement"))
    t = torch.tensor([0, 300, 999])
    x0, eps = torch.randn(3, 50, 3), torch.randn(3, 50, 3)
    x_t = model.schedule.add_noise(x0, eps, t)
    assert torch.allclose(model.as_noise(x0 - x_t, t), eps, atol=1e-3)
    epsilon_model = CompletionModel(ModelConfig(channel_ratio=0.25))
    assert epsilon_model.as_noise(eps, t) is eps
    with pytest.raises(ValueError, match="prediction must be one of"):
        ModelConfig(prediction="x0")


def test_should_stop_abandons_the_sample_between_two_steps():
    """Issue 28, item 1: a node shutting down cancels the sampling loop at the next step
    instead of waiting for all of them; nothing else changes when it never says stop."""
    from lidar_completion.diffusion import Cancelled

    schedule = NoiseSchedule.of(CONFIG)
    x0 = torch.zeros(1, 50, 3)
    calls = []

    def predict(x_t, t):
        calls.append(int(t))
        return oracle(x0, schedule)(x_t, t)

    sampler = make_sampler(CONFIG, "ve", 10, 300)
    with pytest.raises(Cancelled, match="before timestep"):
        sample(predict, sampler, x0, torch.randn(x0.shape), should_stop=lambda: len(calls) >= 3)
    assert len(calls) == 3  # the three steps before the stop ran; none after
    calls.clear()
    out = sample(predict, sampler, x0, torch.randn(x0.shape), should_stop=lambda: False)
    assert len(calls) == 10 and torch.allclose(out, x0, atol=1e-4)


def test_completer_passes_should_stop_to_its_sampler():
    from lidar_completion.diffusion import Cancelled

    torch.manual_seed(0)
    completer = SceneCompleter(CompletionModel(CONFIG), CompletionConfig.from_dict(
        {"device": "cpu", "sampling.steps": 4, "sampling.guidance": 1.0, "data.n_part": 64, "data.repeat": 2}))
    scan = np.random.default_rng(0).uniform(-15, 15, (500, 3)).astype(np.float32)
    asked = []

    def stop_at_third() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(Cancelled):
        completer.complete(scan, should_stop=stop_at_third)
    assert len(asked) == 3
    assert completer.complete(scan, should_stop=lambda: False).nfe == 4
