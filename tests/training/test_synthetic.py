"""The synthetic generator writes real SemanticKITTI sequences of a physically consistent street.

The classic world (straight, flat; what the shipped models were trained on) must stay bit
for bit what it was; the urban world (bends, slopes, curbs, junctions, many classes) and the
sensor presets are checked for what they claim.
"""

from __future__ import annotations

import hashlib
import json
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
    street = S.write_sequence(root / "sequences" / "00", scans=SCANS, lidar=LITE, seed=7, world="classic")
    return root, street


@pytest.fixture(scope="module")
def urban(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, S.Street]:
    root = tmp_path_factory.mktemp("urban")
    street = S.write_sequence(root / "sequences" / "00", scans=SCANS, lidar=LITE, seed=7, sequence=1, world="urban")
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
        assert set(np.unique(kitti.semantic_ids(labels)).tolist()) <= S.CLASSIC_IDS
        assert np.linalg.norm(scan[:, :3], axis=1).max() < LITE.max_range + 0.1
        assert 0.0 <= scan[:, 3].min() and scan[:, 3].max() <= 1.0
        # Only cars (parked or moving) carry instance ids, as in SemanticKITTI.
        things = kitti.instance_ids(labels) > 0
        assert set(np.unique(kitti.semantic_ids(labels)[things]).tolist()) <= {S.CAR, S.MOVING_CAR}
    every = np.concatenate([sequence.labels(i) for i in range(SCANS)])
    assert set(np.unique(kitti.semantic_ids(every)).tolist()) == S.CLASSIC_IDS  # every class shows up
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
    street = S.Street(b.build(), road_half_width=7.0, ego=S.EgoPath(x0=0.0, speed=10.0))  # classic flat ground
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


@pytest.mark.parametrize("world", S.WORLDS)
def test_same_seed_and_sequence_same_files_others_differ(world: str, tmp_path: Path) -> None:
    def files(seed: int, sequence: int, name: str) -> dict[str, bytes]:
        directory = tmp_path / name
        S.write_sequence(directory, scans=2, lidar=LITE, seed=seed, sequence=sequence, world=world)
        return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*.*"))}

    a, b, c, d = files(3, 0, "a"), files(3, 0, "b"), files(4, 0, "c"), files(3, 1, "d")
    assert a == b
    for other in (c, d):
        assert a["velodyne/000000.bin"] != other["velodyne/000000.bin"]
        assert a["poses.txt"] != other["poses.txt"]
    assert json.loads(a["synthetic.json"])["world"] == world


def _digest(directory: Path, scans: int) -> str:
    """Scans at 1 mm, labels and poses at 1e-6: immune to last-bit floating-point differences between machines."""
    h = hashlib.sha256()
    for i in range(scans):
        points = kitti.read_scan(directory / "velodyne" / f"{i:06d}.bin").astype(np.float64)
        h.update(np.round(points * 1000).astype(np.int64).tobytes())
        h.update(kitti.read_labels(directory / "labels" / f"{i:06d}.label").tobytes())
    h.update(np.round(kitti.read_poses(directory / "poses.txt") * 1e6).astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def test_classic_world_is_unchanged(tmp_path: Path) -> None:
    """Digests taken before the urban world existed: the shipped models' training data can be regenerated."""
    for seed, sequence, expected in ((1, 0, "edb5f48817c397b9"), (7, 3, "b3cd54993fd44a52")):
        directory = tmp_path / f"{seed}_{sequence}"
        S.write_sequence(directory, scans=2, lidar=LITE, seed=seed, sequence=sequence, world="classic")
        assert _digest(directory, 2) == expected


def test_cli_writes_sequences(tmp_path: Path) -> None:
    assert S.main(["--out", str(tmp_path), "--sequences", "2", "--scans", "2", "--seed", "1", "--preset", "lite"]) == 0
    for name in ("00", "01"):
        assert len(kitti.KittiSequence(tmp_path, name)) == 2
        assert len(kitti.read_poses(tmp_path / "sequences" / name / "poses.txt")) == 2
        assert json.loads((tmp_path / "sequences" / name / "synthetic.json").read_text())["world"] == "urban"
    assert kitti.read_scan(tmp_path / "sequences/00/velodyne/000000.bin").shape != \
        kitti.read_scan(tmp_path / "sequences/01/velodyne/000000.bin").shape
    # --world classic is exactly write_sequence(world="classic"), the shipped models' data.
    assert S.main(["--out", str(tmp_path / "c"), "--scans", "2", "--seed", "1", "--preset", "lite", "--world",
                   "classic"]) == 0
    assert _digest(tmp_path / "c" / "sequences" / "00", 2) == "edb5f48817c397b9"


def test_cli_mixes_sensors_one_per_sequence(tmp_path: Path) -> None:
    assert S.sequence_presets("mixed", None, 6) == ["hdl64", "hdl32", "vlp16", "os128", "hdl64", "hdl32"]
    assert S.sequence_presets("hdl64", ["lite", "vlp16"], 3) == ["lite", "vlp16", "lite"]
    with pytest.raises(ValueError, match="nope"):
        S.sequence_presets("hdl64", ["nope"], 1)
    assert S.main(["--out", str(tmp_path), "--sequences", "3", "--scans", "1", "--presets", "lite", "vlp16"]) == 0
    beams = []
    for name, preset in zip(("00", "01", "02"), ("lite", "vlp16", "lite"), strict=True):
        info = json.loads((tmp_path / "sequences" / name / "synthetic.json").read_text())
        assert info["preset"] == preset and info["beams"] == len(S.PRESETS[preset].elevations_deg)
        points = kitti.read_scan(tmp_path / "sequences" / name / "velodyne" / "000000.bin")
        beams.append(len(_beams(points, S.PRESETS[preset])))
    assert beams == [32, 16, 32]


@pytest.mark.parametrize(("world", "preset"), [("classic", "hdl64"), ("classic", "lite"), *(
    ("urban", name) for name in ("hdl64", "hdl32", "vlp16", "os128", "lite"))])
def test_scan_generation_speed(world: str, preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    lidar = S.PRESETS[preset]
    street = S.make_world(world, np.random.default_rng(0), 10, lidar)
    S.simulate_scan(street, lidar, 0.0, np.random.default_rng(0))  # warm caches (ray directions)
    times, sizes = [], []
    for i in range(3):
        start = time.perf_counter()
        points, labels = S.simulate_scan(street, lidar, 0.1 * i, np.random.default_rng(i))
        times.append(time.perf_counter() - start)
        sizes.append(len(points))
    rays = len(lidar.elevations_deg) * lidar.columns
    with capsys.disabled():
        print(f"\n[{world} {preset}] {len(lidar.elevations_deg)} beams x {lidar.columns} azimuths: "
              f"{np.mean(sizes):,.0f} points/scan, {1e3 * min(times):.0f}-{1e3 * max(times):.0f} ms/scan")
    if world == "classic":
        assert all(0.85 * rays < n <= rays for n in sizes)
    else:  # upward beams of the wide sensors see sky
        assert all(0.5 * rays < n <= rays for n in sizes)
    if preset == "hdl64":
        assert 100_000 < np.mean(sizes) < 130_000  # a KITTI-sized scan


# --------------------------------------------------------------------------- urban world and sensors


def _beams(points: np.ndarray, lidar: S.Lidar) -> np.ndarray:
    """The beam of each point, from its elevation (exact: the noise is along the ray)."""
    xyz = points[:, :3].astype(np.float64)
    elevation = np.degrees(np.arcsin(xyz[:, 2] / np.linalg.norm(xyz, axis=1)))
    table = np.asarray(lidar.elevations_deg)
    nearest = np.abs(elevation[:, None] - table[None]).argmin(1)
    assert np.abs(elevation - table[nearest]).max() < 1e-3  # every point lies on one of the beams
    return np.unique(nearest)


@pytest.mark.parametrize("preset", sorted(S.PRESETS))
def test_each_preset_has_its_beams_and_mounting_height(preset: str) -> None:
    lidar = S.PRESETS[preset]
    street = S.make_urban(np.random.default_rng([3, 1, 0]), 2, lidar)
    height = street.ego.height
    assert abs(height - lidar.height) <= 0.1 + 1e-9  # per-sequence mounting jitter
    assert 0 < max(abs(street.ego.mount_pitch), abs(street.ego.mount_roll)) <= np.deg2rad(1.5)
    points, labels = S.simulate_scan(street, lidar, 0.0, np.random.default_rng(0))
    assert len(_beams(points, lidar)) == len(lidar.elevations_deg)
    assert np.linalg.norm(points[:, :3], axis=1).max() < lidar.max_range + 0.2
    # The road around the car is a plane ``height`` below the sensor (whatever its tilt).
    r = np.hypot(points[:, 0], points[:, 1])
    road = points[(kitti.semantic_ids(labels) == S.ROAD) & (r > 3) & (r < 12), :3].astype(np.float64)
    a, b, c = np.linalg.lstsq(np.c_[road[:, :2], np.ones(len(road))], road[:, 2], rcond=None)[0]
    assert -c / np.sqrt(a * a + b * b + 1) == pytest.approx(height, abs=0.05)


def test_presets_match_their_sensors() -> None:
    expected = {"hdl64": (64, 2.0, -24.8, 1.73), "hdl32": (32, 10.67, -30.67, 1.84), "vlp16": (16, 15.0, -15.0, 1.80),
                "os128": (128, 22.5, -22.5, 1.85), "lite": (32, 2.0, -24.8, 1.73)}
    for name, (beams, top, bottom, height) in expected.items():
        lidar = S.PRESETS[name]
        assert (len(lidar.elevations_deg), max(lidar.elevations_deg), min(lidar.elevations_deg), lidar.height) == \
            (beams, top, bottom, height), name
    assert np.allclose(np.diff(sorted(S.PRESETS["vlp16"].elevations_deg)), 2.0)
    assert S.PRESETS["hdl32"].columns == 1084 and S.PRESETS["os128"].columns == 1024


def test_urban_world_has_every_class_with_semantickitti_ids_and_instances() -> None:
    seen: set[int] = set()
    for sequence in range(3):
        street = S.make_urban(np.random.default_rng([7, sequence, 0]), 12, LITE)
        for i in (0, 8):
            points, labels = S.simulate_scan(street, LITE, 0.1 * i, np.random.default_rng(i))
            semantic, instance = kitti.semantic_ids(labels), kitti.instance_ids(labels)
            seen |= set(np.unique(semantic).tolist())
            things = np.isin(semantic, list(S.THING_IDS))
            assert np.all(instance[things] > 0) and np.all(instance[~things] == 0)  # instances: vehicles, humans
            for k in np.unique(instance[things]):  # one class per instance
                assert len(np.unique(semantic[instance == k])) == 1
    assert seen == S.SEMANTIC_IDS
    assert S.SEMANTIC_IDS >= {10, 11, 18, 20, 30, 31, 40, 44, 48, 50, 51, 70, 71, 72, 80, 81, 252, 253, 254, 258, 259}
    assert S.MOVING_IDS == {i for i in S.SEMANTIC_IDS if i >= 252}


def test_moving_classes_are_kept_out_of_ground_truth_maps() -> None:
    ids = np.array(sorted(S.SEMANTIC_IDS), dtype=np.uint32) | (np.uint32(5) << 16)
    static = kitti.static_mask(ids)
    assert {int(i) for i in sorted(S.SEMANTIC_IDS) if not static[sorted(S.SEMANTIC_IDS).index(i)]} == S.MOVING_IDS


def test_urban_ground_has_curbs_camber_and_slopes(urban: tuple[Path, S.Street]) -> None:
    root, street = urban
    terrain = street.ground
    sequence = kitti.KittiSequence(root, "00")
    sensor0 = street.ego.pose(0.0)
    sides = []
    for i in (0, SCANS - 1):
        points, labels = _world(sequence, i)
        world = points @ sensor0[:3, :3].T + sensor0[:3, 3]  # simulation frame
        semantic = kitti.semantic_ids(labels)
        ground = np.isin(semantic, [S.ROAD, S.PARKING, S.SIDEWALK, S.TERRAIN])
        # Every ground return lies on the height field (range noise: a few cm).
        residual = world[ground, 2] - terrain.height(world[ground, 0], world[ground, 1])
        assert np.median(np.abs(residual)) < 0.01 and np.percentile(np.abs(residual), 95) < 0.05
        # Sidewalks stand a curb above the road edge beside them.
        d, _ = terrain.lateral(world[:, 0], world[:, 1])
        smooth = world[:, 2] - terrain.smooth(world[:, 0], world[:, 1])
        near = np.hypot(*(world[:, :2] - sensor0[:2, 3]).T) < 25
        for side, band in ((-1, terrain.band[0]), (1, terrain.band[1])):
            edge = near & (semantic == S.ROAD) & (side * d > terrain.half_width - 0.5)
            walk = near & (semantic == S.SIDEWALK) & (side * d < terrain.half_width + band) & \
                (side * d > terrain.half_width + band - 1.0)
            if edge.sum() > 20 and walk.sum() > 20:
                sides.append(np.median(smooth[walk]) - np.median(smooth[edge]))
        # ... and the ground is not a plane: curbs and camber stand off the best plane.
        g = world[ground & near]
        _, res, *_ = np.linalg.lstsq(np.c_[g[:, :2], np.ones(len(g))], g[:, 2], rcond=None)
        assert np.sqrt(res[0] / len(g)) > 0.03
    assert sides and all(abs(step - terrain.curb) < 0.04 for step in sides), (sides, terrain.curb)
    assert 0.10 <= terrain.curb <= 0.16


@pytest.fixture(scope="module")
def worlds() -> list[S.Street]:
    return [S.make_urban(np.random.default_rng([7, k, 0]), 12, LITE) for k in range(6)]


def test_urban_roads_climb_and_descend(worlds: list[S.Street]) -> None:
    grades, drops = [], []
    for street in worlds:
        start = street.ego.pose(0.0)[:3, 3]
        grades.append(np.hypot(*street.ground.smooth_gradient(start[0], start[1])))
        x = street.ego.x_at(street.ego.s0 + np.array([0.0, 60.0]))
        point, _, _ = street.ground.road.frame(x)
        drops.append(abs(np.diff(street.ground.smooth(point[:, 0], point[:, 1]))[0]))
    assert np.median(grades) > 0.01 and max(grades) > 0.02, grades  # 1-2 % and more, as in towns
    assert max(drops) > 1.0, drops  # a metre or more over 60 m of road


def test_urban_road_bends_and_objects_follow_it() -> None:
    street = S.make_urban(np.random.default_rng([7, 1, 0]), 12, LITE)
    x = np.linspace(0, 300, 61)
    _, tangent, _ = street.ground.road.frame(x)
    heading = np.degrees(np.arctan2(tangent[:, 1], tangent[:, 0]))
    assert np.ptp(heading) > 10  # the centreline bends
    # Parked vehicles sit in parking bays beside the road, along it.
    p = street.primitives
    parked = np.isin(p.semantic, [S.CAR, S.TRUCK, S.OTHER_VEHICLE])
    d, _ = street.ground.lateral(p.center[parked, 0], p.center[parked, 1])
    assert np.all(np.abs(d) > street.ground.half_width) and np.all(np.abs(d) < street.ground.half_width + 2.6)


def test_urban_junction_has_its_own_road_and_sidewalks(worlds: list[S.Street]) -> None:
    crossing = [w for w in worlds if w.ground.cross is not None]
    assert 1 <= len(crossing) < len(worlds)
    terrain = crossing[0].ground
    px, py, ux, uy, half_width, walk, sides = terrain.cross
    direction = 1.0 if sides >= 0 else -1.0
    along = direction * (terrain.half_width + max(terrain.band) + 10.0)
    across = np.array([0.0, half_width - 0.3, half_width + walk / 2, half_width + walk + 2.0])
    x = px + along * ux - across * uy
    y = py + along * uy + across * ux
    assert terrain.classify(x, y).tolist() == [S.ROAD, S.ROAD, S.SIDEWALK, S.TERRAIN]
    z = terrain.height(x, y, bumps=False) - terrain.smooth(x, y)
    assert z[2] - z[1] == pytest.approx(terrain.curb, abs=1e-6)


def test_urban_poses_register_static_objects_and_move_the_moving(urban: tuple[Path, S.Street]) -> None:
    """Bends, slopes and a tilted sensor: parked things land on themselves through poses.txt, moving ones don't."""
    root, street = urban
    sequence = kitti.KittiSequence(root, "00")
    sensor = np.stack([street.ego.pose(t) for t in np.arange(SCANS) * 0.1])
    assert np.allclose(sequence.poses, np.linalg.inv(sensor[0]) @ sensor, atol=1e-9)
    clouds = [_world(sequence, i) for i in range(SCANS)]
    half = SCANS // 2
    ref, ref_labels = (np.concatenate(parts) for parts in zip(*clouds[:half], strict=True))
    checked = {"static": 0, "moving": 0}
    for points, labels in clouds[half:]:
        for instance in np.unique(kitti.instance_ids(labels)[kitti.instance_ids(labels) > 0]):
            a, b = ref[kitti.instance_ids(ref_labels) == instance], points[kitti.instance_ids(labels) == instance]
            if len(a) < 30 or len(b) < 30:
                continue
            semantic = int(kitti.semantic_ids(labels)[kitti.instance_ids(labels) == instance][0])
            distance = np.median(cKDTree(a).query(b)[0])
            if semantic in S.MOVING_IDS:
                assert distance > 0.15, f"moving {semantic} {instance} stood still"
                checked["moving"] += 1
            else:
                assert distance < 0.08, f"{semantic} {instance} is off by {distance:.2f} m"
                checked["static"] += 1
    assert checked["static"] >= 3 and checked["moving"] >= 1, checked
    # Static ground seen from the last scan lies on the ground seen from the first.
    first, last = clouds[0], clouds[-1]
    static = [kitti.static_mask(labels) & np.isin(kitti.semantic_ids(labels), [S.ROAD, S.SIDEWALK])
              for _, labels in (first, last)]
    a, b = first[0][static[0]], last[0][static[1]]
    distance, index = cKDTree(a[:, :2]).query(b[:, :2])
    close = distance < 0.3
    assert close.sum() > 500 and np.median(np.abs(a[index[close], 2] - b[close, 2])) < 0.03


def test_urban_culled_raycast_matches_exhaustive(urban: tuple[Path, S.Street]) -> None:
    _, street = urban
    t = 0.5
    pose = street.ego.pose(t)
    near = np.linalg.norm(street.primitives.center - pose[:3, 3], axis=1) < 30
    p = street.primitives
    small = S.Street(S.Primitives(p.kind[near], p.center[near], p.axes[near], p.velocity[near], p.semantic[near],
                                  p.instance[near], None if p.window is None else p.window[near]),
                     street.road_half_width, street.ego, street.ground, street.world)
    fast = S.raycast(small, pose, LITE, t)
    exhaustive = S.raycast(small, pose, LITE, t, cull=False)
    np.testing.assert_array_equal(fast.range, exhaustive.range)
    np.testing.assert_array_equal(fast.semantic, exhaustive.semantic)
