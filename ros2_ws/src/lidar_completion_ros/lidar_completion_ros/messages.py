"""Small rclpy helpers shared by the node, the bag tools, the demo and the tests."""

from __future__ import annotations

import array
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

__all__ = ["add_qos_arguments", "describe_qos", "qos_profile", "stamp_ns", "time_from_ns", "to_rclpy_cloud"]

RELIABILITIES = ("reliable", "best_effort")


def qos_profile(reliability: str, depth: int) -> QoSProfile:
    """Keep-last, volatile QoS with the given reliability (``reliable`` / ``best_effort``)."""
    if reliability not in RELIABILITIES:
        raise ValueError(f"reliability must be reliable or best_effort, got {reliability!r}")
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=int(depth),
        reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.VOLATILE,
    )


def describe_qos(profile: QoSProfile) -> str:
    """``reliable/5``: reliability and depth of a profile as it is in effect (after any
    ``qos_overrides`` parameter, which rclpy applies to the profile it was given)."""
    names = {ReliabilityPolicy.RELIABLE: "reliable", ReliabilityPolicy.BEST_EFFORT: "best_effort"}
    return f"{names.get(profile.reliability, str(profile.reliability).lower())}/{profile.depth}"


def add_qos_arguments(parser: Any, role: str, depth: int, why: str) -> None:
    """``--qos`` (reliability, default reliable) and ``--depth`` options of a bag tool's ``role``
    ("subscription" or "publisher"); ``why`` says what the default matches."""
    parser.add_argument("--qos", choices=RELIABILITIES, default="reliable", help=f"{role} reliability (default reliable; {why})")
    parser.add_argument("--depth", type=int, default=depth, help=f"{role} history depth (default {depth})")


def stamp_ns(header: Any) -> int:
    """Header stamp in nanoseconds (rclpy or rosbags header)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def time_from_ns(ns: int) -> Time:
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def _bytes_to_array(data: Any) -> array.array:
    out = array.array("B")
    out.frombytes(np.ascontiguousarray(np.asarray(data, dtype=np.uint8)).data)
    return out


def to_rclpy_cloud(msg: Any) -> PointCloud2:
    """Copy a PointCloud2 read by ``rosbags`` (or any look-alike) into an rclpy message.

    Header, fields, layout and data bytes are copied as they are, so the live message is
    byte for byte the recorded one.
    """
    out = PointCloud2(
        header=Header(stamp=Time(sec=int(msg.header.stamp.sec), nanosec=int(msg.header.stamp.nanosec)),
                      frame_id=str(msg.header.frame_id)),
        height=int(msg.height),
        width=int(msg.width),
        fields=[PointField(name=str(f.name), offset=int(f.offset), datatype=int(f.datatype), count=int(f.count))
                for f in msg.fields],
        is_bigendian=bool(msg.is_bigendian),
        point_step=int(msg.point_step),
        row_step=int(msg.row_step),
        is_dense=bool(msg.is_dense),
    )
    out.data = _bytes_to_array(msg.data)  # assigned after construction: no per-byte check
    return out
