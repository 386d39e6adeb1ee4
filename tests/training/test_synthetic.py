"""The synthetic generator writes real SemanticKITTI sequences of a physically consistent street."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from lidar_completion_training import kitti
from lidar_completion_training import synthetic as S

LITE = S.PRESETS["lite"]
SCANS = 12


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, S.Street]:
    root = tmp_path_factory.mktemp("synthetic")
    street = S.write_sequence(root / "sequences" / "00", scans=SCANS, lidar=LITE, seed=7)
    return root, street


def _world(sequence: kitti.KittiSequence, i: int) -> tuple[np.ndarray, np.ndarray]:
    points, labels = sequence.scan(i)[:, :3].astype(np.float64), sequence.labels(i)
    pose = sequence.poses[i]
    return points @ pose[:3, :3].T + pose[:3, 3], labels


def test_files_read_back_in_semantickitti_format(generated: tuple[Path, S.Street]) -> None:
    root, _ = generated
    directory = root / "sequences" / "00"
    sequence = kitti.KittiSequence(root, "00")
    assert len(sequence) == SCANS
    assert [p.name for p in sequence.scan_paths][:2] == ["000000.bin", "000001.bin"]
    n_rays = len(LITE.elevations_deg) * LITE.columns
    for i in range(SCANS):
        scan = sequence.scan(i)
        labels = sequence.labels(i, len(scan))
        assert scan.dtype == np.float32 and labels.dtype == np.uint32
        assert 0.8 * n_rays < len(scan) <= n_rays
        assert sequence.label_path(i).stat().st_size == 4 * len(scan)
        assert set(np.unique(kitti.semantic_ids(labels)).tolist()) <= S.SEMANTIC_IDS
        assert np.linalg.norm(scan[:, :3], axis=1).max() < LITE.max_range + 0.1
        assert 0.0 <= scan[:, 3].min() and scan[:, 3].max() <= 1.0
        # Only cars (parked or moving) carry instance ids, as in SemanticKITTI.
        things = kitti.instance_ids(labels) > 0
        assert set(np.unique(kitti.semantic_ids(labels)[things]).tolist()) <= {S.CAR, S.MOVING_CAR}
    every = np.concatenate([sequence.labels(i) for i in range(SCANS)])
    assert set(np.unique(kitti.semantic_ids(every)).tolist()) == S.SEMANTIC_IDS  # every class shows up
    calib = kitti.read_calib(directory / "calib.txt")
    assert set(calib) == {"P0", "P1", "P2", "P3", "Tr"} and calib["Tr"].shape == (4, 4)
    assert np.allclose(kitti.read_times(directory / "times.txt"), np.arange(SCANS) * 0.1)
    # The road under the sensor lies 1.73 m below it.
    scan, labels = sequence.scan(0), sequence.labels(0)
    near_road = (kitti.semantic_ids(labels) == S.ROAD) & (np.linalg.norm(scan[:, :2], axis=1) < 10)
    assert np.median(scan[near_road, 2]) == pytest.approx(-LITE.height, abs=0.05)


def test_poses_follow_kitti_camera_convention(generated: tuple[Path, S.Street]) -> None:
    root, street = generated
    sequence = kitti.KittiSequence(root, "00")
    sensor = np.stack([street.ego.pose(t) for t in np.arange(SCANS) * 0.1])
    assert np.allclose(sequence.poses, np.linalg.inv(sensor[0]) @ sensor, atol=1e-9)
    # poses.txt holds camera poses: the car drives along the camera's z (forward) axis.
    camera = kitti.read_poses(sequence.path / "poses.txt")
    assert camera[-1, 2, 3] > 5.0 and abs(camera[-1, 0, 3]) < 1.0


def test_poses_register_static_objects_across_scans(generated: tuple[Path, S.Street]) -> None:
    """Cars seen in scans 0-5 and again in scans 6-11 land on themselves in the world frame."""
    root, _ = generated
    sequence = kitti.KittiSequence(root, "00")
    clouds = [_world(sequence, i) for i in range(SCANS)]
    half = SCANS // 2
    ref, ref_labels = (np.concatenate(parts) for parts in zip(*clouds[:half], strict=True))
    checked = {S.CAR: 0, S.MOVING_CAR: 0}
    for points, labels in clouds[half:]:
        for instance in np.unique(kitti.instance_ids(labels)[kitti.instance_ids(labels) > 0]):
            a, b = ref[kitti.instance_ids(ref_labels) == instance], points[kitti.instance_ids(labels) == instance]
            if len(a) < 50 or len(b) < 50:
                continue
            semantic = int(kitti.semantic_ids(labels)[kitti.instance_ids(labels) == instance][0])
            distance = np.median(cKDTree(a).query(b)[0])
            if semantic == S.CAR:  # range noise (2 cm) plus the spacing of the lite scan's points
                assert distance < 0.08, f"parked car {instance} is off by {distance:.2f} m"
            else:
                assert distance > 0.5, f"moving car {instance} stood still"
            checked[semantic] += 1
    assert checked[S.CAR] >= 3 and checked[S.MOVING_CAR] >= 1

    # The road seen from the last scan lies on the road plane seen from the first (mm level)...
    def road(i: int) -> np.ndarray:
        points, labels = clouds[i]
        return points[kitti.semantic_ids(labels) == S.ROAD]

    first, last = road(0), road(SCANS - 1)
    plane = np.linalg.lstsq(np.c_[first[:, :2], np.ones(len(first))], first[:, 2], rcond=None)[0]
    residual = last[:, 2] - np.c_[last[:, :2], np.ones(len(last))] @ plane
    assert np.abs(residual).mean() < 0.01
    # ...while without the poses the same parked car would be metres away.
    ids = [kitti.instance_ids(sequence.labels(i)) for i in (0, SCANS - 1)]
    biggest = np.bincount(ids[0][kitti.semantic_ids(sequence.labels(0)) == S.CAR]).argmax()
    raw = [sequence.scan(i)[ids[k] == biggest, :3] for k, i in enumerate((0, SCANS - 1))]
    assert np.median(cKDTree(raw[0]).query(raw[1])[0]) > 1.0


def test_culled_raycast_returns_the_nearest_of_all_intersections(generated: tuple[Path, S.Street]) -> None:
    _, street = generated
    t = 0.5
    pose = street.ego.pose(t)
    fast = S.raycast(street, pose, LITE, t)
    exhaustive = S.raycast(street, pose, LITE, t, cull=False)
    np.testing.assert_array_equal(fast.range, exhaustive.range)
    np.testing.assert_array_equal(fast.semantic, exhaustive.semantic)
    np.testing.assert_array_equal(fast.instance, exhaustive.instance)


def test_pole_occludes_the_wall_behind_it() -> None:
    b = S.SceneBuilder()
    b.box((20.0, 0.0, 5.0), (1.0, 40.0, 10.0), semantic=S.BUILDING)  # front face at x = 19.5
    b.cylinder((10.0, 0.0, 2.0), 0.5, 4.0, semantic=S.POLE)  # r = 0.5, z in [0, 4]
    street = S.Street(b.build(), road_half_width=7.0, ego=S.EgoPath(x0=0.0, speed=10.0))
    pose = np.eye(4)
    pose[2, 3] = h = 1.73
    hits = S.raycast(street, pose, LITE, 0.0)

    d = LITE.directions
    with np.errstate(divide="ignore", invalid="ignore"):
        t_wall = 19.5 / d[:, 0]
        y, z = t_wall * d[:, 1], h + t_wall * d[:, 2]
        t_wall = np.where((d[:, 0] > 0) & (np.abs(y) <= 20) & (z >= 0) & (z <= 10), t_wall, np.inf)
        a, bb = d[:, 0] ** 2 + d[:, 1] ** 2, -10.0 * d[:, 0]
        disc = bb**2 - a * (100.0 - 0.25)
        t_pole = (-bb - np.sqrt(disc)) / a
        z = h + t_pole * d[:, 2]
        t_pole = np.where((disc >= 0) & (t_pole > 0) & (z >= 0) & (z <= 4), t_pole, np.inf)
        t_ground = np.where(d[:, 2] < 0, -h / d[:, 2], np.inf)
    expected = np.minimum(np.minimum(t_wall, t_pole), t_ground)
    expected[expected > LITE.max_range] = np.inf
    np.testing.assert_allclose(hits.range, expected, rtol=1e-9)

    behind = np.isfinite(t_pole) & np.isfinite(t_wall)
    assert behind.sum() > 10  # rays that cross both the pole and the wall...
    assert np.all(hits.semantic[behind] == S.POLE)  # ...return the pole
    assert np.all(hits.range[behind] < 10.0)
    wall = np.isfinite(t_wall) & ~np.isfinite(t_pole) & (t_wall < t_ground)
    assert np.all(hits.semantic[wall] == S.BUILDING)


def test_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    def files(seed: int, name: str) -> dict[str, bytes]:
        directory = tmp_path / name
        S.write_sequence(directory, scans=2, lidar=LITE, seed=seed)
        return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*.*"))}

    a, b, c = files(3, "a"), files(3, "b"), files(4, "c")
    assert a == b
    assert a["velodyne/000000.bin"] != c["velodyne/000000.bin"]
    assert a["poses.txt"] != c["poses.txt"]


def test_cli_writes_sequences(tmp_path: Path) -> None:
    assert S.main(["--out", str(tmp_path), "--sequences", "2", "--scans", "2", "--seed", "1", "--preset", "lite"]) == 0
    for name in ("00", "01"):
        assert len(kitti.KittiSequence(tmp_path, name)) == 2
        assert len(kitti.read_poses(tmp_path / "sequences" / name / "poses.txt")) == 2
    assert kitti.read_scan(tmp_path / "sequences/00/velodyne/000000.bin").shape != \
        kitti.read_scan(tmp_path / "sequences/01/velodyne/000000.bin").shape


@pytest.mark.parametrize("preset", ["hdl64", "lite"])
def test_scan_generation_speed(preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    lidar = S.PRESETS[preset]
    street = S.make_street(np.random.default_rng(0), 10, lidar)
    S.simulate_scan(street, lidar, 0.0, np.random.default_rng(0))  # warm caches (ray directions)
    times, sizes = [], []
    for i in range(3):
        start = time.perf_counter()
        points, labels = S.simulate_scan(street, lidar, 0.1 * i, np.random.default_rng(i))
        times.append(time.perf_counter() - start)
        sizes.append(len(points))
    rays = len(lidar.elevations_deg) * lidar.columns
    with capsys.disabled():
        print(f"\n[{preset}] {len(lidar.elevations_deg)} beams x {lidar.columns} azimuths: "
              f"{np.mean(sizes):,.0f} points/scan, {1e3 * min(times):.0f}-{1e3 * max(times):.0f} ms/scan")
    assert all(0.85 * rays < n <= rays for n in sizes)
    if preset == "hdl64":
        assert 100_000 < np.mean(sizes) < 130_000  # a KITTI-sized scan
