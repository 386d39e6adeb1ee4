"""Completion metrics on clouds whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import rel_entr

from lidar_completion_training import metrics as M

SQRT_LN2 = np.sqrt(np.log(2.0))


def _grid(spacing: float = 10.0, n: int = 4) -> np.ndarray:
    """Points far apart compared with any shift used below, so nearest neighbours stay paired."""
    axis = (np.arange(n) - n / 2) * spacing + 0.25  # +0.25: centres of 0.5 m voxels
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


@pytest.fixture
def cloud() -> np.ndarray:
    return np.random.default_rng(0).uniform(-30, 30, (3000, 3))


def test_identical_clouds_are_perfect(cloud: np.ndarray) -> None:
    result = M.evaluate_completion(cloud, cloud.copy())
    assert result["cd"] == 0.0 and result["emd"] == pytest.approx(0.0, abs=1e-12)
    assert result["jsd_3d"] == pytest.approx(0.0, abs=1e-7) and result["jsd_bev"] == pytest.approx(0.0, abs=1e-7)
    assert result["precision"] == result["recall"] == result["fscore"] == 1.0
    assert result["iou_0.5"] == result["iou_0.2"] == result["iou_0.1"] == 1.0
    assert set(result) == {"cd", "jsd_3d", "jsd_bev", "emd", "emd_voxel", "precision", "recall", "fscore",
                           "iou_0.5", "iou_0.2", "iou_0.1"}


@pytest.mark.parametrize("d", [0.01, 0.3, 1.7])
def test_shifted_cloud_has_chamfer_distance_equal_to_the_shift(d: float) -> None:
    direction = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
    points = _grid()
    assert M.chamfer_distance(points + d * direction, points) == pytest.approx(d, rel=1e-12)


def test_chamfer_averages_both_directions() -> None:
    pred, gt = np.zeros((1, 3)), np.array([[1.0, 0, 0], [3.0, 0, 0]])
    assert M.chamfer_distance(pred, gt) == pytest.approx(0.5 * (1.0 + (1.0 + 3.0) / 2))


def test_emd_of_a_one_voxel_shift_is_the_shift() -> None:
    points = _grid()
    assert M.emd(points + [0.5, 0, 0], points) == pytest.approx(0.5, rel=1e-9)
    # Half the mass moves 2 m, the other half stays: 1 m on average.
    gt = np.array([[0.25, 0.25, 0.25], [10.25, 0.25, 0.25]])
    pred = np.array([[0.25, 0.25, 0.25], [12.25, 0.25, 0.25]])
    assert M.emd(pred, gt) == pytest.approx(1.0, rel=1e-9)


def test_emd_coarsens_voxels_to_respect_the_cap(cloud: np.ndarray) -> None:
    result = M.evaluate_completion(cloud, cloud + 0.01, emd_max_voxels=500)
    assert result["emd_voxel"] > M.EMD_VOXEL
    assert result["emd"] < result["emd_voxel"]


def test_precision_recall_fscore_integrate_over_5_to_10_cm() -> None:
    points = _grid()
    assert M.precision_recall_fscore(points + [0.3, 0, 0], points) == (0.0, 0.0, 0.0)
    shift = 0.07  # inside at the thresholds above 7 cm only
    expected = float(np.mean(M.PRF_THRESHOLDS > shift))
    p, r, f = M.precision_recall_fscore(points + [shift, 0, 0], points)
    assert p == pytest.approx(expected) and r == pytest.approx(expected) and f == pytest.approx(expected)
    # Half of the prediction is right, all of the ground truth is covered.
    gt = points
    pred = np.concatenate([points, points + [5.0, 0, 0]])
    p, r, f = M.precision_recall_fscore(pred, gt)
    assert (p, r, f) == pytest.approx((0.5, 1.0, 2 * 0.5 / 1.5))


def test_disjoint_clouds_have_maximal_jsd(cloud: np.ndarray) -> None:
    left = cloud * [0.5, 1, 1] - [25, 0, 0]  # x in [-40, -10]
    right = cloud * [0.5, 1, 1] + [25, 0, 0]  # x in [10, 40]
    assert M.jsd_3d(left, right) == pytest.approx(SQRT_LN2)
    assert M.jsd_bev(left, right) == pytest.approx(SQRT_LN2)
    assert M.completion_iou(left, right, 0.5) == 0.0


def test_bev_jsd_counts_occupied_voxels_not_points() -> None:
    column = np.array([[0.25, 0.25, z] for z in (0.25, 0.75, 1.25, 1.75)])
    # One column holding 4 occupied voxels vs. the same column with 100 points in one voxel
    # plus another column holding 4 occupied voxels: BEV sees 1/2 + 1/2 against 1.
    other = column + [5.0, 0, 0]
    pred = np.concatenate([np.repeat(column[:1], 100, 0), column, other])
    bev = M.jsd_bev(pred, column)
    p, q = np.array([0.5, 0.5]), np.array([1.0, 0.0])
    m = (p + q) / 2
    assert bev == pytest.approx(np.sqrt(0.5 * rel_entr(p, m).sum() + 0.5 * rel_entr(q, m).sum()))
    assert M.jsd_3d(pred, column) > bev  # per-point histograms see the 100-point pile


def test_completion_iou_counts_shared_voxels() -> None:
    gt = np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]])
    pred = np.array([[0.0, 0, 0], [1.0, 0, 0], [0.0, 2.0, 0], [0.0, 3.0, 0]])
    assert M.completion_iou(pred, gt, 0.5) == pytest.approx(2 / 6)
    offset = np.array([123.4, -56.7, 8.9])
    assert M.completion_iou(pred + offset, gt + offset, 0.5) == pytest.approx(2 / 6)


def test_iou_covers_the_whole_scene_not_a_central_window() -> None:
    """The published grid saw only +-5 m at 0.1 m; here far voxels count too."""
    near = np.array([[1.0, 1.0, 0.0]])
    far = np.array([[40.0, -30.0, 1.0]])
    both = np.concatenate([near, far])
    assert M.completion_iou(near, both, 0.1) == pytest.approx(0.5)


def test_metrics_do_not_depend_on_point_order(cloud: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    pred = cloud + rng.normal(0, 0.05, cloud.shape)
    base = M.evaluate_completion(pred, cloud)
    shuffled = M.evaluate_completion(pred[rng.permutation(len(pred))], cloud[rng.permutation(len(cloud))])
    assert shuffled == pytest.approx(base, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    "metric",
    [M.chamfer_distance, M.jsd_3d, M.jsd_bev, M.emd, M.precision_recall_fscore, M.evaluate_completion,
     lambda a, b: M.completion_iou(a, b, 0.1)],
)
def test_bad_inputs_raise_value_error(metric, cloud: np.ndarray) -> None:
    with pytest.raises(ValueError, match="empty"):
        metric(np.zeros((0, 3)), cloud)
    with pytest.raises(ValueError, match="empty"):
        metric(cloud, np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        metric(cloud[:, :2], cloud)
    with pytest.raises(ValueError, match="NaN"):
        metric(np.concatenate([cloud, [[np.nan, 0, 0]]]), cloud)


def test_jsd_needs_points_inside_the_histogram(cloud: np.ndarray) -> None:
    with pytest.raises(ValueError, match="histogram"):
        M.jsd_3d(cloud + 1000.0, cloud)
