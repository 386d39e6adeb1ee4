"""SceneCompleter: pre-/post-processing edge cases, sampler step counts, seeds, refinement, batches.

A tiny random model (channel ratio 0.25) and small point budgets keep every test to seconds;
what is checked is the pipeline's bookkeeping, not completion quality.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.completer import HEIGHT_TOLERANCE, ScanError, SceneCompleter
from lidar_completion.points import farthest_point_sample, seen_through
from lidar_completion.config import CompletionConfig, ScanCut


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on busy shared cores OpenMP's spinning
    threads make them up to 10x slower; one thread keeps the timings steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> CompletionModel:
    torch.manual_seed(0)
    return CompletionModel(ModelConfig(channel_ratio=0.25, refine_channel_ratio=0.25)).eval()


def make_completer(model: CompletionModel, **overrides) -> SceneCompleter:
    """Completion only unless a test asks for the composed output (it has tests of its own)."""
    values = {"device": "cpu", "refine": False, "data.n_part": 64, "sampling.steps": 1, "sampling.guidance": 0.0,
              "data.completion_only": True}
    return SceneCompleter(model, CompletionConfig.from_dict(values | overrides))


def ring_scan(n: int, seed: int = 0) -> np.ndarray:
    """Points 5-40 m around the sensor, z in [-2, 1] m: all inside the default range band."""
    rng = np.random.default_rng(seed)
    r, phi = rng.uniform(5, 40, n), rng.uniform(-np.pi, np.pi, n)
    return np.stack([r * np.cos(phi), r * np.sin(phi), rng.uniform(-2, 1, n)], axis=1).astype(np.float32)


# ---------------------------------------------------------------- pre-processing


def test_fewer_points_than_n_part_are_repeated(model):
    scan = ring_scan(10)
    partial, used = make_completer(model).preprocess(scan)
    assert partial.shape == (64, 3) and used == 10
    rows = {tuple(p) for p in partial}
    assert rows == {tuple(p) for p in scan}  # every point used, nothing invented
    counts = [np.all(partial == p, axis=1).sum() for p in scan]
    assert min(counts) >= 6 and max(counts) <= 7  # evenly repeated: 64 = 6 * 10 + 4


def test_more_points_than_n_part_are_sampled(model):
    scan = ring_scan(500)
    partial, used = make_completer(model).preprocess(scan)
    assert partial.shape == (64, 3) and used == 500
    assert len(np.unique(partial, axis=0)) == 64
    assert {tuple(p) for p in partial} <= {tuple(p) for p in scan}


def test_farthest_point_sample_is_deterministic_and_spread():
    scan = ring_scan(3000, seed=1)
    first, second = farthest_point_sample(scan, 100), farthest_point_sample(scan, 100)
    np.testing.assert_array_equal(first, second)
    random = scan[np.random.default_rng(0).choice(len(scan), 100, replace=False)]

    def min_gap(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return d[~np.eye(len(points), dtype=bool)].min()

    assert min_gap(first) > min_gap(random)  # FPS keeps points apart, random sampling does not


@pytest.mark.parametrize(
    "points",
    [
        np.full((20, 3), 0.5, np.float32),  # all inside min_range
        np.full((20, 3), 100.0, np.float32),  # all beyond max_range
        np.full((20, 3), np.nan, np.float32),
        np.zeros((0, 3), np.float32),
    ],
    ids=["too-close", "too-far", "all-nan", "empty"],
)
def test_no_point_in_range_raises(model, points):
    with pytest.raises(ScanError, match="no finite point"):
        make_completer(model).complete(points)


def test_nan_and_inf_rows_are_dropped(model):
    scan = ring_scan(200)
    dirty = scan.copy()
    dirty[::5, 0] = np.nan
    dirty[1::7, 2] = np.inf
    dirty[2::11, 1] = -np.inf
    finite = np.isfinite(dirty).all(axis=1)
    completer = make_completer(model)
    partial, used = completer.preprocess(dirty)
    assert used == finite.sum() and np.isfinite(partial).all()
    result = completer.complete(dirty)
    assert result.input_points == 200 and result.used_points == finite.sum()
    assert np.isfinite(result.points).all()


@pytest.mark.parametrize("shape", [(30,), (30, 2), (2, 30, 3)])
def test_wrong_shape_raises(model, shape):
    with pytest.raises(ScanError, match="expected an \\[N, 3\\] array"):
        make_completer(model).complete(np.ones(shape, np.float32) * 10)


def test_extra_channels_are_ignored(model):
    scan = ring_scan(300)
    with_remission = np.hstack([scan, np.full((300, 1), 0.3, np.float32)])
    completer = make_completer(model)
    np.testing.assert_array_equal(completer.complete(with_remission).points, completer.complete(scan).points)


def test_postprocess_keeps_range_and_height_band(model):
    completer = make_completer(model, **{"data.n_part": 128})
    scan = ring_scan(400)
    partial, _ = completer.preprocess(scan)
    start = time.perf_counter()
    result = completer.complete(scan)
    wall_ms = 1000 * (time.perf_counter() - start)
    z = partial[:, 2]
    assert len(result.points) > 0 and result.points.dtype == np.float32
    assert (np.linalg.norm(result.points, axis=1) < 50).all()
    tolerance = HEIGHT_TOLERANCE
    assert (result.points[:, 2] >= z.mean() - 2 * z.std() - tolerance).all()
    assert (result.points[:, 2] <= z.max() + tolerance).all()
    assert set(result.timings_ms) == {"preprocess", "encode", "sample", "postprocess", "free_space", "compose", "total"}
    stages = sum(v for k, v in result.timings_ms.items() if k != "total")
    assert result.timings_ms["total"] == pytest.approx(stages) and all(v >= 0 for v in result.timings_ms.values())
    # The stages time the call itself: nothing counted twice, no untimed work between them.
    assert 0.5 * wall_ms <= result.timings_ms["total"] <= wall_ms


def test_free_space_stage_drops_exactly_the_seen_through_points_last(model):
    """With the margin set, the output is the margin-free output (refined too: the refiner
    sees the same coarse points) minus the points in front of a return of the whole scan."""
    scan = ring_scan(3000)
    for refine in (False, True):
        keep_all = make_completer(model, refine=refine, **{"data.free_space_margin": None})
        full = keep_all.complete(scan).points
        carved = make_completer(model, refine=refine, **{"data.free_space_margin": 0.5}).complete(scan)
        expected = full[~seen_through(full, keep_all.points_in_band(scan), 0.5)]
        assert 0 < len(carved.points) < len(full)
        np.testing.assert_array_equal(carved.points, expected)
        assert "free_space" in carved.timings_ms and "free_space" not in keep_all.complete(scan).timings_ms


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("guidance", [0.0, 6.0], ids=["unguided", "guided"])
@pytest.mark.parametrize("steps", [1, 2, 8, 50])
def test_sampler_runs_the_requested_steps(model, steps, guidance):
    # 16 points x2 keep a denoiser call to a few ms: this counts calls, it does not judge quality.
    completer = make_completer(model, **{"sampling.steps": steps, "sampling.guidance": guidance,
                                         "data.n_part": 16, "data.repeat": 2})
    timesteps = []
    hook = model.denoiser.register_forward_hook(lambda mod, args, out: timesteps.append(int(args[2][0])))
    try:
        result = completer.complete(ring_scan(100))
    finally:
        hook.remove()
    per_step = 2 if guidance else 1
    assert result.steps == steps and result.guidance == guidance
    assert result.nfe == per_step * steps == len(timesteps)
    distinct = list(dict.fromkeys(timesteps))  # guided: the same t twice in a row
    assert len(distinct) == steps and distinct == sorted(distinct, reverse=True)
    assert timesteps == [t for t in distinct for _ in range(per_step)]
    assert np.isfinite(result.points).all()


def test_guidance_one_is_conditional_only(model):
    completer = make_completer(model, **{"sampling.steps": 2, "sampling.guidance": 1.0, "data.n_part": 16})
    assert not completer.guided
    assert completer.complete(ring_scan(50)).nfe == 2


def test_steps_and_guidance_default_to_the_checkpoint(model):
    completer = SceneCompleter(model, CompletionConfig(refine=False, device="cpu"))
    assert (completer.steps, completer.guidance, completer.guided) == (50, 6.0, True)
    short = CompletionModel(ModelConfig(channel_ratio=0.25, num_train_timesteps=100))
    with pytest.raises(ValueError, match="exceeds"):
        SceneCompleter(short, CompletionConfig(device="cpu", refine=False).replace(**{"sampling.steps": 200}))


def test_refine_without_refiner_is_an_error():
    plain = CompletionModel(ModelConfig(channel_ratio=0.25))
    with pytest.raises(ValueError, match="no refinement net"):
        SceneCompleter(plain, CompletionConfig(device="cpu", refine=True))


# ---------------------------------------------------------------- seeds, refinement, batches


def test_same_seed_same_output_different_seed_different_output(model):
    scan = ring_scan(300)

    def seeded(seed: int) -> np.ndarray:
        return make_completer(model, **{"sampling.steps": 2, "sampling.seed": seed}).complete(scan).points

    first, again, other = seeded(3), seeded(3), seeded(4)
    np.testing.assert_array_equal(first, again)
    assert first.shape != other.shape or not np.allclose(first, other)


def test_refinement_gives_six_points_per_point(model):
    scan = ring_scan(300)
    keep_all = {"data.free_space_margin": None}  # that last stage has its own test
    plain = make_completer(model, refine=False, **keep_all).complete(scan)
    completer = make_completer(model, refine=True, **keep_all)
    raw = completer.refine(plain.points)
    assert raw.shape == (6 * len(plain.points), 3)
    # Each group of six is its coarse point plus offsets bounded by tanh (|offset| < 1 m).
    groups = raw.reshape(-1, 6, 3) - plain.points[:, None, :]
    assert np.abs(groups).max() <= 1.0
    # The pipeline then applies the same range / height band to the refined points.
    refined = completer.complete(scan)
    assert "refine" in refined.timings_ms and np.isfinite(refined.points).all()
    assert 0 < len(refined.points) <= 6 * len(plain.points)
    np.testing.assert_allclose(np.sort(refined.points, axis=0), np.sort(completer.postprocess(raw, completer.preprocess(scan)[0]), axis=0), atol=1e-5)


def test_batch_of_two_matches_two_single_completions(model):
    a, b = ring_scan(300, seed=1), ring_scan(150, seed=2)
    completer = make_completer(model, **{"data.n_part": 64, "sampling.steps": 3})
    batch = completer.complete_batch([a, b])
    singles = [completer.complete(a), completer.complete(b)]
    assert len(batch) == 2
    for got, single, scan in zip(batch, singles, (a, b)):
        assert got.points.ndim == 2 and got.points.shape[1] == 3 and len(got.points) > 0
        assert np.isfinite(got.points).all()
        assert (got.input_points, got.used_points, got.nfe) == (len(scan), single.used_points, single.nfe)
    # Each scan draws its own noise from its own seeded generator, so a scan completes the
    # same inside a batch as alone (several steps, SDE noise included): nothing leaks.
    for got, single in zip(batch, singles):
        np.testing.assert_allclose(got.points, single.points, atol=1e-4)
    assert completer.complete_batch([]) == []
    with pytest.raises(ScanError):
        completer.complete_batch([a, np.full((5, 3), 200.0, np.float32)])


# ---------------------------------------------------------------- composition (the default output)


def test_output_is_every_finite_measured_point_plus_completed_points_that_add(model):
    """Default output: the whole finite scan (beyond the radius too) with its intensity and
    measured = 1, then completed points (measured = 0, intensity 0) inside the radius and
    none within data.compose_distance of a return."""
    scan = ring_scan(800)
    far = np.array([[80.0, 0.0, 1.0], [0.0, -120.0, 2.0]], np.float32)  # beyond any radius
    xyz = np.vstack([scan, far, [[np.nan, 1.0, 1.0]]]).astype(np.float32)
    intensity = np.linspace(0, 1, len(xyz), dtype=np.float32)[:, None]
    composed = make_completer(model, **{"data.completion_only": False, "data.max_range": 30.0,
                                        "data.compose_support": 0})  # the random model's points are sparse
    result = composed.complete(np.hstack([xyz, intensity]))
    finite = np.isfinite(xyz).all(axis=1)
    measured = result.points[result.measured]
    np.testing.assert_array_equal(measured, xyz[finite])  # every finite point, in order, unchanged
    np.testing.assert_array_equal(result.intensity[result.measured], intensity[finite, 0])
    added = result.points[~result.measured]
    assert result.completed_points == len(added) > 0 and (result.intensity[~result.measured] == 0).all()
    assert (np.linalg.norm(added, axis=1) < 30.0).all() and result.radius == 30.0
    gaps = np.linalg.norm(added[:, None, :] - xyz[finite][None, :, :], axis=2).min(axis=1)
    assert gaps.min() >= 0.3  # the default compose_distance
    # completion_only: the completed points before composition, a superset of what was added
    alone = make_completer(model, **{"data.max_range": 30.0}).complete(np.hstack([xyz, intensity]))
    assert not alone.measured.any() and len(alone.points) >= len(added)
    assert {tuple(p) for p in added} <= {tuple(p) for p in alone.points}


def test_compose_distance_and_support_zero_keep_every_completed_point(model):
    scan = ring_scan(500)
    alone = make_completer(model).complete(scan)
    composed = make_completer(model, **{"data.completion_only": False, "data.compose_distance": 0.0,
                                        "data.compose_support": 0}).complete(scan)
    np.testing.assert_array_equal(composed.points[~composed.measured], alone.points)


# ---------------------------------------------------------------- runaway samples


def _exploding(model: CompletionModel) -> CompletionModel:
    """The model with its last layer scaled by 1e6: every prediction is huge (like the shipped
    student's on a scan far outside its training data, which reached 1e17)."""
    import copy

    wild = copy.deepcopy(model)
    with torch.no_grad():
        wild.denoiser.last[-1].weight.mul_(1e6)
        wild.denoiser.last[-1].bias.add_(1e6)
    return wild


def test_noise_clip_keeps_a_runaway_model_near_the_scan_and_says_so(model):
    scan = ring_scan(500)
    wild = _exploding(model)
    clipped = make_completer(wild, **{"sampling.steps": 2}).complete(scan)
    assert clipped.clipped_fraction == 1.0 and clipped.out_of_domain
    # each of 2 steps moves a point at most noise_clip * sigma_t (< 6 * 1 m): nothing at the box
    reach = np.linalg.norm(clipped.points, axis=1)
    assert len(clipped.points) and reach.max() < 40 * np.sqrt(2) + 2 * 6.0
    unbounded = make_completer(wild, **{"sampling.steps": 2, "sampling.noise_clip": None})
    raw, _, _ = unbounded.sample_scans(unbounded.preprocess(scan)[0][None])
    assert (np.abs(raw) >= unbounded.sample_bound - 1e-3).any()  # without the clip it runs to the box


def test_in_domain_completion_is_not_clipped(model):
    result = make_completer(model, **{"sampling.steps": 2}).complete(ring_scan(500))
    assert result.clipped == 0 and not result.out_of_domain


# ---------------------------------------------------------------- density the model was trained at


def test_budget_scales_with_the_scans_surface():
    """A model that records its training surface gets a cropped field of view at the trained
    density (proportionally fewer points); one that does not gets n_part as before."""
    scan = ring_scan(20_000)
    quarter = scan[(scan[:, 0] > 0) & (np.abs(scan[:, 1]) < scan[:, 0])]
    plain = CompletionModel(ModelConfig(channel_ratio=0.25))
    cells = __import__("lidar_completion.points", fromlist=["surface_cells"]).surface_cells
    matched = CompletionModel(ModelConfig(channel_ratio=0.25, surface_cells=cells(scan)))
    config = CompletionConfig.from_dict({"device": "cpu", "data.n_part": 1000})
    assert SceneCompleter(plain, config).model_budget(quarter) == 1000
    whole, crop = (SceneCompleter(matched, config).model_budget(s) for s in (scan, quarter))
    assert whole == 1000 and 200 <= crop <= 300
    assert SceneCompleter(matched, config).model_budget(scan[:3]) == 16  # never fewer than 16


def test_stray_completed_points_are_not_added(model):
    """compose_support: a completed point needs that many completed neighbours within twice
    compose_distance; the ones kept are exactly the supported ones."""
    from lidar_completion.points import near_measured, supported

    scan = ring_scan(500)
    alone = make_completer(model).complete(scan).points
    composed = make_completer(model, **{"data.completion_only": False, "data.compose_support": 3}).complete(scan)
    candidates = alone[~near_measured(alone, scan, 0.3)]  # the default compose_distance
    expected = candidates[supported(candidates, 0.6, 3)]
    np.testing.assert_array_equal(composed.points[~composed.measured], expected)
    assert len(expected) < len(candidates)


# ---------------------------------------------------------------- from_checkpoint


def test_from_checkpoint_takes_a_shipped_name_or_a_path(model, tmp_path):
    from lidar_completion.checkpoints import SHIPPED_MODELS, save_model

    config = CompletionConfig(device="cpu")
    shipped = SceneCompleter.from_checkpoint("student_lite", config)
    assert shipped.checkpoint == SHIPPED_MODELS / "student_lite" and shipped.refine_checkpoint is None
    saved = save_model(model, tmp_path / "tiny")
    completer = SceneCompleter.from_checkpoint(tmp_path / "tiny", config.replace(refine=True))
    assert completer.checkpoint == tmp_path / "tiny" and completer.config.refine
    for name, value in model.state_dict().items():
        torch.testing.assert_close(completer.model.state_dict()[name], value)
    assert saved.exists()


def test_from_checkpoint_refuses_a_missing_checkpoint_or_refiner(model, tmp_path):
    from lidar_completion.checkpoints import CheckpointError, RefinerError, save_model

    with pytest.raises(CheckpointError, match=r"checkpoint not found: no_such_model \(.*shipped models: .*student_lite"):
        SceneCompleter.from_checkpoint("no_such_model")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing"):
        SceneCompleter.from_checkpoint(tmp_path / "missing")
    save_model(model, tmp_path / "tiny")
    with pytest.raises(RefinerError, match="refinement checkpoint not found"):
        SceneCompleter.from_checkpoint(tmp_path / "tiny", CompletionConfig(device="cpu"), tmp_path / "nope.ckpt")


def test_from_checkpoint_checks_the_config_against_the_model(tmp_path):
    from lidar_completion.checkpoints import save_model

    plain = save_model(CompletionModel(ModelConfig(channel_ratio=0.25, cut=ScanCut.recorded_before(None, 20.0))), tmp_path / "plain")
    with pytest.raises(ValueError, match="refine is on but the checkpoint has no refinement net"):
        SceneCompleter.from_checkpoint(plain, CompletionConfig(device="cpu", refine=True))
    with pytest.raises(ValueError, match="data.min_range: 30 m leaves no range band: the model completes up to 20 m"):
        SceneCompleter.from_checkpoint(plain, CompletionConfig.from_dict({"device": "cpu", "data.min_range": 30.0}))
