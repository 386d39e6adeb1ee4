"""rosbag2 round trips (mcap and sqlite3) and SemanticKITTI sequence -> bag conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lidar_completion.bags import (
    DEFAULT_START_NS,
    BagError,
    CloudBagWriter,
    iter_cloud_messages,
    kitti_sequence_to_bag,
    main,
    read_clouds,
    write_clouds,
)
from lidar_completion.pointcloud2 import FLOAT32, read_fields

STORAGES = ["mcap", "sqlite3"]


def make_clouds(n: int = 4) -> list[tuple[int, str, np.ndarray]]:
    rng = np.random.default_rng(0)
    clouds = []
    for i in range(n):
        xyz = rng.normal(0, 20, (100 + 37 * i, 3)).astype(np.float32)
        xyz[0] = np.nan  # non-finite points survive the bag untouched
        clouds.append((1_700_000_000_123_456_789 + i * 100_000_000, f"lidar_{i % 2}", xyz))
    return clouds


@pytest.mark.parametrize("storage", STORAGES)
def test_roundtrip_lossless(tmp_path: Path, storage: str) -> None:
    clouds = make_clouds()
    bag = tmp_path / "bag"
    assert write_clouds(bag, clouds, "/points", storage) == len(clouds)
    assert (bag / "metadata.yaml").is_file()
    back = list(read_clouds(bag))
    assert len(back) == len(clouds)
    for (stamp, frame, xyz), got in zip(clouds, back, strict=True):
        assert got.stamp_ns == stamp and got.frame_id == frame
        np.testing.assert_array_equal(got.xyz, xyz)  # NaN == NaN here
        assert got.xyz.dtype == np.float32


@pytest.mark.parametrize("storage", STORAGES)
def test_extra_fields_and_log_time(tmp_path: Path, storage: str) -> None:
    bag = tmp_path / "bag"
    xyz = np.arange(30, dtype=np.float32).reshape(10, 3)
    with CloudBagWriter(bag, "/scan", storage) as writer:
        writer.write(5_000_000_007, "base", xyz, {"intensity": np.linspace(0, 1, 10)})
    (log_time, msg), = list(iter_cloud_messages(bag, "/scan"))
    assert log_time == 5_000_000_007
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (5, 7)
    assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity"]
    intensity = read_fields(msg, ["intensity"])["intensity"]
    np.testing.assert_allclose(intensity, np.linspace(0, 1, 10))


def test_topic_selection_errors(tmp_path: Path) -> None:
    bag = tmp_path / "bag"
    write_clouds(bag, make_clouds(1), "/a")
    with pytest.raises(BagError, match="no topic '/b'"):
        list(read_clouds(bag, "/b"))
    assert len(list(read_clouds(bag, "/a"))) == 1


def test_refuses_existing_path_and_bad_storage(tmp_path: Path) -> None:
    with pytest.raises(BagError, match="already exists"):
        write_clouds(tmp_path, make_clouds(1))
    with pytest.raises(BagError, match="storage"):
        write_clouds(tmp_path / "x", make_clouds(1), storage="bag")  # type: ignore[arg-type]


def test_reads_bag_with_other_topics(tmp_path: Path) -> None:
    """A recorded bag has more than clouds; the reader picks the PointCloud2 topic."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from lidar_completion.pointcloud2 import build_cloud

    ts = get_typestore(Stores.ROS2_HUMBLE)
    bag = tmp_path / "bag"
    xyz = np.ones((5, 3), np.float32)
    with Writer(bag, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        s = writer.add_connection("/status", "std_msgs/msg/String", typestore=ts)
        c = writer.add_connection("/os/points", "sensor_msgs/msg/PointCloud2", typestore=ts)
        writer.write(s, 1, ts.serialize_cdr(ts.types["std_msgs/msg/String"](data="hi"),
                                            "std_msgs/msg/String"))
        header = ts.types["std_msgs/msg/Header"](
            stamp=ts.types["builtin_interfaces/msg/Time"](sec=3, nanosec=0), frame_id="os")
        msg = build_cloud(xyz, header, ts.types["sensor_msgs/msg/PointCloud2"],
                          ts.types["sensor_msgs/msg/PointField"], data_as="numpy")
        writer.write(c, 2, ts.serialize_cdr(msg, "sensor_msgs/msg/PointCloud2"))
    (got,) = list(read_clouds(bag))
    assert got.stamp_ns == 3_000_000_000 and got.frame_id == "os"
    np.testing.assert_array_equal(got.xyz, xyz)
    with pytest.raises(BagError, match="not sensor_msgs/msg/PointCloud2"):
        list(read_clouds(bag, "/status"))


# --- SemanticKITTI ---------------------------------------------------------------------


def make_sequence(root: Path, n: int = 3, times: bool = True) -> list[np.ndarray]:
    velodyne = root / "velodyne"
    velodyne.mkdir(parents=True)
    rng = np.random.default_rng(1)
    scans = []
    for i in range(n):
        scan = rng.uniform(-30, 30, (50 + 10 * i, 4)).astype(np.float32)
        scan[:, 3] = rng.uniform(0, 1, len(scan))
        scan.tofile(velodyne / f"{i:06d}.bin")
        scans.append(scan)
    (velodyne / "README.txt").write_text("not a scan")
    if times:
        (root / "times.txt").write_text("".join(f"{t:e}\n" for t in 0.5 + 0.1037 * np.arange(n)))
    return scans


@pytest.mark.parametrize("storage", STORAGES)
def test_kitti_sequence_to_bag(tmp_path: Path, storage: str) -> None:
    scans = make_sequence(tmp_path / "08")
    bag = tmp_path / "bag"
    assert kitti_sequence_to_bag(tmp_path / "08", bag, storage=storage) == 3
    msgs = list(iter_cloud_messages(bag, "/points_raw"))
    assert len(msgs) == 3
    for i, ((log_time, msg), scan) in enumerate(zip(msgs, scans, strict=True)):
        assert msg.header.frame_id == "velodyne"
        assert [(f.name, f.datatype) for f in msg.fields] == [
            ("x", FLOAT32), ("y", FLOAT32), ("z", FLOAT32), ("intensity", FLOAT32)]
        assert log_time == DEFAULT_START_NS + round(0.1037 * i * 1e9)  # times.txt, from 0
        got = read_fields(msg, ["x", "y", "z", "intensity"])
        np.testing.assert_array_equal(np.stack([got[k] for k in "xyz"], 1), scan[:, :3])
        np.testing.assert_array_equal(got["intensity"], scan[:, 3])


def test_kitti_rate_without_times(tmp_path: Path) -> None:
    make_sequence(tmp_path / "seq", n=3, times=False)
    kitti_sequence_to_bag(tmp_path / "seq", tmp_path / "bag", frame_id="lidar", start_ns=0)
    clouds = list(read_clouds(tmp_path / "bag"))
    assert [c.stamp_ns for c in clouds] == [0, 100_000_000, 200_000_000]  # 10 Hz default
    assert {c.frame_id for c in clouds} == {"lidar"}


def test_kitti_errors(tmp_path: Path) -> None:
    with pytest.raises(BagError, match="no velodyne"):
        kitti_sequence_to_bag(tmp_path, tmp_path / "bag")
    (tmp_path / "velodyne").mkdir()
    with pytest.raises(BagError, match=r"no NNNNNN\.bin"):
        kitti_sequence_to_bag(tmp_path, tmp_path / "bag")
    (tmp_path / "velodyne" / "000000.bin").write_bytes(b"\0" * 20)
    with pytest.raises(BagError, match=r"000000\.bin"):
        kitti_sequence_to_bag(tmp_path, tmp_path / "bag")
    assert not (tmp_path / "bag").exists()  # nothing half-written


def test_kitti_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_sequence(tmp_path / "seq", n=2)
    bag = tmp_path / "out"
    rc = main(["--sequence", str(tmp_path / "seq"), "--out", str(bag), "--storage", "sqlite3",
               "--topic", "/velodyne_points", "--rate-hz", "20", "--start-sec", "2"])
    assert rc == 0 and "wrote 2 scans" in capsys.readouterr().out
    clouds = list(read_clouds(bag, "/velodyne_points"))
    assert [c.stamp_ns for c in clouds] == [2_000_000_000, 2_050_000_000]
    assert main(["--sequence", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "no velodyne" in capsys.readouterr().err
