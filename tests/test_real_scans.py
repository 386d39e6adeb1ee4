"""The shipped student on scans unlike its training data: cropped fields of view, only the upper
rings, flat ground, tall structures, a tilted sensor, other sensors.

Each must give a completion that stays where the scene is: no point at the sampler's bound,
every completed point inside the model's radius and near the scan's own surfaces, most noise
predictions unclipped, and (the default output) every measured point kept. Before the
density-matched budget and the noise clip, the 90-degree crop sent most sampled points to the
bound and the quarter-ring crop and upper rings left nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from lidar_completion.checkpoints import SHIPPED_MODELS
from lidar_completion.completer import SceneCompleter
from lidar_completion.config import CompletionConfig
from lidar_completion.io import read_points
from lidar_completion.points import in_range


@pytest.fixture(scope="module", params=["student_lite", "student_1step_lite"])
def completer(request: pytest.FixtureRequest) -> SceneCompleter:
    """Each shipped student at its own preset (2 steps; the fast one: 1)."""
    return SceneCompleter.from_checkpoint(SHIPPED_MODELS / request.param, CompletionConfig(device="cpu"))


@pytest.fixture(scope="module")
def real(real_scan_path: Path) -> np.ndarray:
    return read_points(real_scan_path)


def _elevation_band(points: np.ndarray, keep_every: int) -> np.ndarray:
    """One elevation band (~ one HDL-64 ring, 0.42 deg) in ``keep_every``."""
    elevation = np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))
    return points[np.floor((elevation + 30) / 0.42).astype(int) % keep_every == 0]


def _rotate_pitch(points: np.ndarray, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    rotation = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    return (points @ rotation.T).astype(np.float32)


def _vlp16(seed: int = 7) -> np.ndarray:
    from lidar_completion_training import synthetic as S

    lidar = S.PRESETS["vlp16"]
    street = S.make_urban(np.random.default_rng([seed, 0, 0]), 1, lidar)
    return S.simulate_scan(street, lidar, 0.0, np.random.default_rng(seed))[0][:, :3]


def _cases(real: np.ndarray) -> dict[str, np.ndarray]:
    front = real[real[:, 0] > 0]
    fov90 = real[(real[:, 0] > 0) & (np.abs(real[:, 1]) < real[:, 0])]
    return {
        "half field of view": front,
        "quarter field of view": fov90,
        "quarter field of view, one ring in four": _elevation_band(fov90, 4),
        "upper rings only": real[:25_000],
        "flat ground only": np.column_stack([real[:, :2], np.full(len(real), -1.73, np.float32)]),
        "tall structures only": real[real[:, 2] > -1.0],
        "sensor pitched 8 degrees": _rotate_pitch(real, 8.0),
        "16-beam sensor (generated)": _vlp16(),
    }


CASES = list(_cases(np.zeros((1, 3), np.float32)))


@pytest.mark.parametrize("case", CASES)
def test_completion_stays_on_the_scene_for_any_field_of_view_and_sensor(completer, real, case):
    scan = _cases(real)[case]
    result = completer.complete(scan)
    completed = result.points[~result.measured]
    # The measured scan is all there, first, unchanged.
    np.testing.assert_array_equal(result.points[result.measured], scan[np.isfinite(scan).all(axis=1)])
    assert result.sampled_points > 0 and result.completed_points > 0, case
    assert np.isfinite(completed).all()
    assert (np.abs(completed) < completer.sample_bound - 1).all(), "points at the sampler's bound"
    assert (np.linalg.norm(completed, axis=1) < completer.max_range).all()
    assert result.clipped_fraction < 0.05 and not result.out_of_domain, (case, result.clipped_fraction)
    # Sensible, not a scatter: completed points lie near the scan's own surfaces (and, by the
    # composition, never within compose_distance of a return).
    band = scan[in_range(scan, 0.0, completer.max_range + 2.0)]
    gap = cKDTree(band).query(completed)[0]
    assert gap.min() >= completer.config.data.compose_distance - 1e-6
    assert np.median(gap) < 1.0 and np.mean(gap < 2.0) > 0.95, (case, np.median(gap), np.mean(gap < 2.0))
