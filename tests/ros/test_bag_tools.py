"""bag_replay -> DDS -> bag_record, as three real processes' worth of tools: nothing is lost."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from ros_helpers import Proc, ros_env

from lidar_completion.bags import iter_cloud_messages, read_clouds, write_clouds
from lidar_completion.pointcloud2 import read_fields


def _clouds(n: int) -> list:
    rng = np.random.default_rng(7)
    clouds = []
    for i in range(n):
        xyz = rng.uniform(-40, 40, (30_000 + 1000 * i, 3)).astype(np.float32)
        xyz[::97] = np.nan  # non-finite points travel untouched
        intensity = rng.random(len(xyz), dtype=np.float32)
        ring = (np.arange(len(xyz)) % 32).astype(np.uint16)
        clouds.append((1_000_000_000 + i * 100_000_000, "velodyne", xyz, {"intensity": intensity, "ring": ring}))
    return clouds


def test_rosbags_message_converts_to_rclpy_unchanged(tmp_path: Path) -> None:
    from lidar_completion_ros.messages import to_rclpy_cloud

    bag = tmp_path / "bag"
    write_clouds(bag, _clouds(1))
    (_, raw), = list(iter_cloud_messages(bag))
    msg = to_rclpy_cloud(raw)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (1, 0, "velodyne")
    assert bytes(msg.data) == raw.data.tobytes()
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == \
        [(f.name, f.offset, f.datatype, f.count) for f in raw.fields]
    assert (msg.height, msg.width, msg.point_step, msg.row_step, msg.is_dense) == \
        (raw.height, raw.width, raw.point_step, raw.row_step, raw.is_dense)


def test_replay_record_loses_nothing(domain_id: int, tmp_path: Path) -> None:
    clouds = _clouds(6)
    source, recorded = tmp_path / "source_bag", tmp_path / "recorded_bag"
    write_clouds(source, clouds, topic="/points_raw")
    env = ros_env(domain_id)
    recorder = Proc([sys.executable, "-m", "lidar_completion_ros.bag_record", "--topic", "/replayed",
                     "--out", str(recorded), "--qos", "reliable", "--timeout", "600"], env, "bag_record")
    try:
        replay = Proc([sys.executable, "-m", "lidar_completion_ros.bag_replay", str(source),
                       "--output-topic", "/replayed", "--rate", "4", "--qos", "reliable",
                       "--discovery-timeout", "300"], env, "bag_replay")  # the recorder may start slowly
        assert replay.wait(300) == 0, replay.output
        assert "published 6 clouds" in replay.output
        recorder.wait_for_line(r"recorded 1\.500000 ", 120)  # the last stamp
        assert recorder.interrupt(30) == 0, recorder.output  # SIGINT closes the bag properly
    finally:
        recorder.kill()
    assert "recorded 6 clouds" in recorder.output

    got = list(read_clouds(recorded))
    assert [c.stamp_ns for c in got] == [c[0] for c in clouds]
    for (_, frame, xyz, _), cloud in zip(clouds, got, strict=True):
        assert cloud.frame_id == frame
        np.testing.assert_array_equal(cloud.xyz, xyz)  # NaN == NaN here
    fields = [read_fields(msg, ["intensity", "ring"]) for _, msg in iter_cloud_messages(recorded)]
    for (_, _, _, extra), values in zip(clouds, fields, strict=True):
        np.testing.assert_array_equal(values["intensity"], extra["intensity"])
        np.testing.assert_array_equal(values["ring"], extra["ring"])
