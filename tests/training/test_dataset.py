"""Ground-truth maps and (partial, full) pairs on a generated sequence; reader errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from lidar_completion.config import ScanCut
from lidar_completion.points import voxel_keys
from lidar_completion_training import kitti, maps, metrics
from lidar_completion_training import synthetic as S
from lidar_completion_training.dataset import CompletionDataset, PairConfig

SCANS = 20
CONFIG = PairConfig(cut=ScanCut.for_training(4000, 20000))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kitti")
    S.write_sequence(root / "sequences" / "00", scans=SCANS, lidar=S.PRESETS["lite"], seed=11)
    assert maps.main(["--root", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def sequence(root: Path) -> kitti.KittiSequence:
    return kitti.KittiSequence(root, "00")


@pytest.fixture(scope="module")
def ground_truth(sequence: kitti.KittiSequence) -> np.ndarray:
    return maps.load_map(sequence)


def test_voxel_downsample_averages_each_cell() -> None:
    points = np.array([[0.01, 0.01, 0.01], [0.05, 0.09, 0.03], [0.15, 0.0, 0.0], [-0.05, 0.0, 0.0]])
    out = maps.voxel_downsample(points, 0.1)
    expected = np.array([[-0.05, 0.0, 0.0], [0.03, 0.05, 0.02], [0.15, 0.0, 0.0]])
    np.testing.assert_allclose(out[np.lexsort(out.T[::-1])], expected[np.lexsort(expected.T[::-1])], atol=1e-7)
    # Batches give the same result as one call.
    mean = maps.VoxelMean(0.1, flush_points=1)
    for point in points:
        mean.add(point[None])
    np.testing.assert_allclose(np.sort(mean.result(), 0), np.sort(out, 0), atol=1e-7)


def test_voxel_means_stay_in_their_own_voxel_far_from_the_origin() -> None:
    """A mean within a float32 step of its voxel's face (0.24 mm at 3 km) used to round into
    the neighbouring voxel; every mean now keys to its own voxel, in float32 and in float64."""
    i = np.arange(1000)
    x = (30_000 + i + 1) * 0.1 - 3e-5  # 3 km out, 0.03 mm below each voxel's upper face
    points = np.stack([x, np.full_like(x, -2000.05), np.full_like(x, 2.05)], axis=1)
    assert (voxel_keys(points.astype(np.float32), 0.1) != voxel_keys(points, 0.1)).sum() > 100  # plain rounding crosses
    for batch in (1, 8_000_000):
        mean = maps.VoxelMean(0.1, flush_points=batch)
        mean.add(points[:500])
        mean.add(points[500:])
        out = mean.result()
        assert out.dtype == np.float32 and len(out) == len(points)
        for keys in (voxel_keys(out, 0.1), voxel_keys(out.astype(np.float64), 0.1)):
            np.testing.assert_array_equal(np.sort(keys), np.sort(voxel_keys(points, 0.1)))
        np.testing.assert_allclose(np.sort(out[:, 0]), x, atol=3e-4, rtol=0)  # moved by a float32 step at most


def _write_scans(directory: Path, scans: list[tuple[np.ndarray, np.ndarray]], camera_poses: np.ndarray) -> kitti.KittiSequence:
    """A sequence of hand-made scans ((N, 3) points, (N,) labels) with identity calibration."""
    (directory / "velodyne").mkdir(parents=True)
    (directory / "labels").mkdir()
    for i, (points, labels) in enumerate(scans):
        kitti.write_scan(directory / "velodyne" / f"{i:06d}.bin", np.hstack([points, np.zeros((len(points), 1))]))
        kitti.write_labels(directory / "labels" / f"{i:06d}.label", labels)
    kitti.write_calib(directory / "calib.txt", {"Tr": np.eye(4)})
    kitti.write_poses(directory / "poses.txt", camera_poses)
    return kitti.KittiSequence(directory.parent.parent, directory.name)


def test_map_keeps_static_labelled_points_beyond_3_5_m_of_their_sensor(tmp_path: Path) -> None:
    """As LiDiff's map_from_scans: class > 1 and < 252 (moving ids 252-259 and unlabelled /
    outlier out), and nothing within 3.5 m of the scan's own sensor, whatever other scans saw."""
    road, moving_car, unlabelled, outlier = 40, 252, 0, 1
    points = np.array([[1.0, 0.05, 0.05], [3.45, 0.05, 0.05], [3.55, 0.05, 0.05], [10.05, 0.05, 0.05],
                       [20.05, 0.05, 0.05], [30.05, 0.05, 0.05], [40.05, 0.05, 0.05]])
    labels = np.array([road, road, road, road, moving_car, unlabelled, outlier], dtype=np.uint32)
    labels[3] |= 7 << 16  # an instance id does not change the class
    moved = np.eye(4)
    moved[:3, 3] = [100.0, 0.0, 0.0]  # the second scan 100 m along x (identity Tr: camera = velodyne)
    sequence = _write_scans(tmp_path / "sequences" / "00", [(points, labels), (points, labels)], np.stack([np.eye(4), moved]))
    built = maps.build_map(sequence)
    expected = np.array([[3.55, 0.05, 0.05], [10.05, 0.05, 0.05], [103.55, 0.05, 0.05], [110.05, 0.05, 0.05]])
    np.testing.assert_allclose(built[np.argsort(built[:, 0])], expected, atol=1e-5)
    # --min-range 0 keeps the ego points too (the second scan's 1 m point is 101 m from the first sensor).
    assert maps.main(["--root", str(tmp_path), "--min-range", "0"]) == 0
    np.testing.assert_allclose(np.sort(maps.load_map(sequence)[:, 0]), [1.0, 3.45, 3.55, 10.05, 101.0, 103.45, 103.55, 110.05], atol=1e-5)


def test_map_is_a_dense_static_voxel_grid(sequence: kitti.KittiSequence, ground_truth: np.ndarray) -> None:
    assert ground_truth.dtype == np.float32 and ground_truth.shape[1] == 3
    assert len(np.unique(voxel_keys(ground_truth, 0.1))) == len(ground_truth)  # one point per 10 cm voxel
    assert len(ground_truth) > 4 * len(sequence.scan(0))


def test_moving_objects_are_absent_from_the_map(sequence: kitti.KittiSequence, ground_truth: np.ndarray) -> None:
    tree = cKDTree(ground_truth)
    road_z = -S.PRESETS["lite"].height  # the road in the world (= scan 0 velodyne) frame
    distances = {S.CAR: [], S.MOVING_CAR: []}
    for i in range(SCANS):
        points, labels = sequence.scan(i)[:, :3].astype(np.float64), sequence.labels(i)
        pose = sequence.poses[i]
        world = points @ pose[:3, :3].T + pose[:3, 3]
        semantic = kitti.semantic_ids(labels)
        for cls in distances:
            body = world[(semantic == cls) & (world[:, 2] > road_z + 0.5)]  # above the wheels
            distances[cls].append(tree.query(body)[0])
    moving, parked = np.concatenate(distances[S.MOVING_CAR]), np.concatenate(distances[S.CAR])
    assert len(moving) > 500 and len(parked) > 500
    assert moving.min() > 0.3  # nothing left where moving cars were
    assert np.median(parked) < 0.05  # while parked cars are in the map


def test_pairs_match_the_ground_truth(root: Path) -> None:
    dataset = CompletionDataset(root, ["00"], CONFIG)
    assert len(dataset) == SCANS
    for index in (0, SCANS // 2, SCANS - 1):
        partial, full = dataset.pair(index)
        r = np.linalg.norm(partial, axis=1)
        assert r.min() > 3.5 and r.max() < 50.0 and partial[:, 2].min() > -4.0
        assert np.linalg.norm(full, axis=1).max() < 50.0 and full[:, 2].min() > -4.0
        assert len(full) > 3 * len(partial)  # the ground truth is much denser than the scan
        assert cKDTree(full).query(partial)[0].mean() < 0.06  # every scan point lies on the ground truth
        cells = lambda p: set(map(tuple, np.floor(p[:, :2] / CONFIG.cell).astype(int)))  # noqa: E731
        assert cells(full) <= cells(partial)

        item = dataset[index]
        assert item["partial"].shape == (CONFIG.n_part, 3) and item["full"].shape == (CONFIG.n_full, 3)
        assert item["partial"].dtype == item["full"].dtype == np.float32
        assert item["sequence"] == "00" and item["scan_index"] == index
        assert metrics.chamfer_distance(item["partial"], item["full"]) < 0.6
        assert len(np.unique(item["partial"], axis=0)) == CONFIG.n_part  # farthest-point sampled, no repeats


def test_items_are_reproducible_and_batch(root: Path) -> None:
    dataset = CompletionDataset(root, ["00"], CONFIG, seed=5)
    a, b = dataset[3], dataset[3]
    np.testing.assert_array_equal(a["partial"], b["partial"])
    np.testing.assert_array_equal(a["full"], b["full"])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["partial"].shape == (2, CONFIG.n_part, 3) and batch["full"].shape == (2, CONFIG.n_full, 3)
    assert batch["sequence"] == ["00", "00"] and batch["scan_index"].tolist() == [0, 1]
    with pytest.raises(IndexError):
        dataset[SCANS]


def test_few_points_are_repeated_up_to_n_part(root: Path) -> None:
    dataset = CompletionDataset(root, ["00"], PairConfig(cut=ScanCut.for_training(50_000, 500_000)))
    item, (partial, full) = dataset[0], dataset.pair(0)
    assert item["partial"].shape == (50_000, 3) and item["full"].shape == (500_000, 3)
    assert len(np.unique(item["partial"], axis=0)) == len(partial)
    assert len(np.unique(item["full"], axis=0)) == len(full)


def test_augmentation_moves_both_clouds_together(root: Path) -> None:
    plain = CompletionDataset(root, ["00"], CONFIG, seed=1)[4]
    rigid = CompletionDataset(root, ["00"], PairConfig(cut=ScanCut.for_training(4000, 20000), jitter=0.0), augment=True, seed=1)
    moved = rigid[4]
    # One linear map s * R_z * mirror explains both clouds.
    matrix = np.linalg.lstsq(plain["partial"], moved["partial"], rcond=None)[0].T
    scale = np.sqrt(abs(np.linalg.det(matrix[:2, :2])))
    assert 0.95 <= scale <= 1.05
    np.testing.assert_allclose(matrix.T @ matrix, scale**2 * np.eye(3), atol=1e-4)
    np.testing.assert_allclose(matrix[2], [0, 0, scale], atol=1e-4)  # z is only scaled
    np.testing.assert_allclose(moved["full"], plain["full"] @ matrix.T, atol=1e-3)
    assert not np.allclose(moved["partial"], plain["partial"], atol=0.1)
    # Fresh augmentation each epoch; jitter is clipped at 0.18 m per axis.
    rigid.set_epoch(1)
    assert not np.allclose(rigid[4]["partial"], moved["partial"])
    jittered = CompletionDataset(root, ["00"], CONFIG, augment=True, seed=1)[4]
    assert np.abs(jittered["partial"] - moved["partial"]).max() <= CONFIG.jitter_clip + 1e-5
    assert cKDTree(jittered["full"]).query(jittered["partial"])[0].mean() < 0.3


def test_missing_map_tells_how_to_build_it(tmp_path: Path) -> None:
    S.write_sequence(tmp_path / "sequences" / "03", scans=1, lidar=S.PRESETS["lite"], seed=0)
    with pytest.raises(FileNotFoundError, match="lidar-build-maps"):
        CompletionDataset(tmp_path, ["03"], CONFIG)[0]


def test_malformed_files_raise_errors_naming_them(tmp_path: Path) -> None:
    bad_scan = tmp_path / "000000.bin"
    bad_scan.write_bytes(b"\0" * 18)
    with pytest.raises(ValueError, match="000000.bin"):
        kitti.read_scan(bad_scan)
    labels = tmp_path / "000000.label"
    kitti.write_labels(labels, np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match="000000.label.*3 labels for a scan of 4"):
        kitti.read_labels(labels, 4)
    poses = tmp_path / "poses.txt"
    poses.write_text("1 0 0 0 0 1 0 0 0 0 1 0\n1 0 0 0 0 1 0 0 0 0 1\n")
    with pytest.raises(ValueError, match=r"poses.txt:2: expected 12 numbers, found 11"):
        kitti.read_poses(poses)
    poses.write_text("1 0 0 0 0 1 0 0 0 0 1 x\n")
    with pytest.raises(ValueError, match=r"poses.txt:1: not a list of numbers"):
        kitti.read_poses(poses)
    calib = tmp_path / "calib.txt"
    calib.write_text("P0: 1 0 0 0 0 1 0 0 0 0 1 0\n")
    with pytest.raises(ValueError, match="calib.txt.*Tr"):
        kitti.read_calib(calib)
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        kitti.read_scan(tmp_path / "nothing.bin")
    with pytest.raises(FileNotFoundError, match="velodyne"):
        kitti.KittiSequence(tmp_path, "99")


def test_render_writes_a_png(root: Path, tmp_path: Path) -> None:
    from lidar_completion_training import render

    out = tmp_path / "scan_vs_gt.png"
    assert render.main(["--root", str(root), "--sequence", "00", "--scan", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_field_of_view_crops_cut_both_clouds_to_one_sector_at_the_whole_scans_density(root: Path) -> None:
    """With fov_crop the scan and its ground truth are cut to the same azimuth sector (nothing
    behind the sensor is asked for) and the counts shrink with the scan's surface, so a crop
    reaches the model at a whole scan's density; without a surface reference, n_part as given."""
    from lidar_completion.points import surface_cells
    from lidar_completion_training.dataset import crop_sector, mean_surface_cells

    whole = CompletionDataset(root, ["00"], PairConfig(cut=ScanCut.for_training(1000, 10000, max_range=20.0)))
    cells = mean_surface_cells(whole)
    partial, full = whole.pair(0)
    assert abs(cells - surface_cells(partial)) < 0.5 * cells  # a typical scan's surface
    part, gt = crop_sector(partial, full, center=0.0, width=np.pi / 2)
    for cloud in (part, gt):
        assert len(cloud) and (np.abs(np.arctan2(cloud[:, 1], cloud[:, 0])) <= np.pi / 4 + 1e-6).all()
    config = PairConfig(cut=ScanCut.for_training(1000, 10000, max_range=20.0), fov_crop=1.0, fov_deg=(90.0, 90.0),
                        surface_cells=cells)
    cropped = CompletionDataset(root, ["00"], config, augment=True)
    sizes = [len(cropped[i]["partial"]) for i in range(5)]
    assert all(100 <= n <= 600 for n in sizes), sizes  # about a quarter of the surface -> of n_part
    for i in range(5):
        item = cropped[i]
        assert len(item["full"]) == 10 * len(item["partial"])
    assert len(CompletionDataset(root, ["00"], PairConfig(cut=ScanCut.for_training(1000, 10000, max_range=20.0),
                                                          fov_crop=1.0), augment=True)[0]["partial"]) == 1000
