"""``bag_record``: record a PointCloud2 topic into a new rosbag2 bag.

    ros2 run lidar_completion_ros bag_record --topic points_completed --out completed_bag
    bag_record --topic /points_completed --out out_bag --count 5 --timeout 60

Writes with the core library's ``bags.CloudBagWriter`` (``rosbags``, no rosbag2 install):
x, y, z as float32 plus every other field of the message (intensity, ring, ...), with the
original header stamp and frame. Stops after ``--count`` clouds, after ``--timeout``
seconds, or on SIGINT/SIGTERM; the bag is closed properly in every case.
Exit status: 0 done (count reached, or no count given), 1 timed out before ``--count``,
2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2

from lidar_completion.bags import BagError, CloudBagWriter
from lidar_completion.pointcloud2 import CloudError, cloud_to_xyz, read_fields

from .messages import add_qos_arguments, qos_profile, stamp_ns

__all__ = ["main", "build_parser"]

PROG = "bag_record"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--topic", default="points_completed", help="topic to record (default points_completed)")
    parser.add_argument("--out", type=Path, required=True, help="bag directory to create")
    parser.add_argument("--bag-topic", help="topic name inside the bag (default: the resolved --topic)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many clouds (0 = no limit)")
    parser.add_argument("--timeout", type=float, default=0.0, help="stop after this many seconds (0 = none)")
    add_qos_arguments(parser, "subscription", 50, "best_effort matches every publisher")
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    parser.add_argument("--quiet", action="store_true", help="no line per recorded cloud")
    return parser


class _Recorder(Node):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__("bag_record")
        self.args = args
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.count = self.skipped = 0
        self.sub = self.create_subscription(PointCloud2, args.topic, self._on_cloud,
                                            qos_profile(args.qos, args.depth))
        self.writer = CloudBagWriter(args.out, args.bag_topic or self.sub.topic_name, args.storage)
        self._announced = False
        self.create_timer(0.1, self._announce)

    def _announce(self) -> None:
        if not self._announced and self.sub.get_publisher_count() > 0:
            self._announced = True
            print(f"{PROG}: recording {self.sub.topic_name} ({self.sub.get_publisher_count()} publisher(s)) "
                  f"to {self.args.out}", flush=True)

    def _on_cloud(self, msg: PointCloud2) -> None:
        if self.done.is_set():
            return
        try:
            xyz = cloud_to_xyz(msg)
            others = [f.name for f in msg.fields if f.name not in ("x", "y", "z")]
            extra = read_fields(msg, others) if others else None
        except CloudError as err:
            self.skipped += 1
            self.get_logger().warn(f"skipped a cloud that cannot be read: {err}")
            return
        with self.lock:
            if self.done.is_set():
                return
            self.writer.write(stamp_ns(msg.header), msg.header.frame_id, xyz, extra)
            self.count += 1
            if not self.args.quiet:
                print(f"{PROG}: recorded {stamp_ns(msg.header) / 1e9:.6f} ({len(xyz)} points)", flush=True)
            if self.args.count and self.count >= self.args.count:
                self.done.set()

    def close(self) -> None:
        with self.lock:
            self.done.set()
            self.writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rclpy.utilities.remove_ros_args(["x", *argv])[1:])
    if args.out.exists():
        print(f"{PROG}: error: {args.out} already exists", file=sys.stderr)
        return 2
    rclpy.init(args=["bag_record", *argv])
    try:
        node = _Recorder(args)
    except BagError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    start = time.monotonic()
    status = 0
    try:
        while rclpy.ok() and not node.done.is_set():
            rclpy.spin_once(node, timeout_sec=0.1)
            if args.timeout and time.monotonic() - start > args.timeout:
                if args.count:
                    print(f"{PROG}: timeout after {args.timeout:g} s: recorded {node.count} of {args.count}",
                          file=sys.stderr)
                    status = 1
                break
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        print(f"{PROG}: recorded {node.count} clouds to {args.out}", flush=True)
        try:
            node.destroy_node()
        except Exception:
            pass
        rclpy.try_shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
