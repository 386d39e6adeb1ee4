"""``bag_replay``: publish a rosbag2 bag's PointCloud2 topic into the live ROS graph.

    ros2 run lidar_completion_ros bag_replay input_bag                 # recorded rate, on points_raw
    bag_replay input_bag --rate 0.5 --topic /points_raw --output-topic /velodyne_points
    bag_replay input_bag --wait-for points_completed                 # lock-step with a slow node

Reads the bag with ``rosbags`` (no rosbag2 install needed) through the core library's
``bags.iter_cloud_messages`` and publishes each message unchanged (header, fields, bytes).
Timing follows the bag's log times divided by ``--rate``; ``--wait-for TOPIC`` instead
publishes the next scan only after a cloud with the same stamp came back on TOPIC (or
``--wait-timeout`` passed), so a model slower than the sensor sees every scan.
Exit status: 0 all published, 1 no subscriber appeared, 2 usage or bag error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2

from lidar_completion.bags import BagError, iter_cloud_messages

from .messages import add_qos_arguments, qos_profile, stamp_ns, to_rclpy_cloud
from .runtime import spin_until

__all__ = ["main", "build_parser"]

PROG = "bag_replay"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("bag", type=Path, help="rosbag2 directory (mcap or sqlite3)")
    parser.add_argument("--topic", help="PointCloud2 topic in the bag (default: its only one)")
    parser.add_argument("--output-topic", default="points_raw",
                        help="topic to publish on (default: points_raw, relative so remappable)")
    parser.add_argument("--rate", type=float, default=1.0, help="speed factor vs the recorded rate (default 1)")
    add_qos_arguments(parser, "publisher", 10, "it matches every subscriber")
    parser.add_argument("--limit", type=int, default=0, help="publish at most this many clouds (0 = all)")
    parser.add_argument("--wait-subscribers", type=int, default=1, metavar="N",
                        help="wait until N subscribers matched before publishing (default 1; 0 = don't)")
    parser.add_argument("--discovery-timeout", type=float, default=20.0,
                        help="seconds to wait for those subscribers (default 20)")
    parser.add_argument("--wait-for", metavar="TOPIC",
                        help="lock-step: after each cloud, wait for a cloud with the same stamp on TOPIC")
    parser.add_argument("--wait-timeout", type=float, default=60.0,
                        help="seconds to wait for each answer in --wait-for mode (default 60)")
    parser.add_argument("--quiet", action="store_true", help="no line per published cloud")
    return parser


class _Replayer(Node):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__("bag_replay")
        self.args = args
        self.pub = self.create_publisher(PointCloud2, args.output_topic, qos_profile(args.qos, args.depth))
        self.answered: set[int] = set()
        if args.wait_for:
            self.create_subscription(PointCloud2, args.wait_for, self._on_answer, qos_profile("reliable", 10))

    def _on_answer(self, msg: PointCloud2) -> None:
        self.answered.add(stamp_ns(msg.header))


def _spin_until(node: Node, predicate, timeout: float) -> bool:
    return spin_until(node, predicate, timeout, step=0.02)


def replay(node: _Replayer, args: argparse.Namespace) -> int:
    topic = node.pub.topic_name
    if args.wait_subscribers > 0:
        ok = _spin_until(node, lambda: node.pub.get_subscription_count() >= args.wait_subscribers,
                         args.discovery_timeout)
        if not ok:
            print(f"{PROG}: no {args.wait_subscribers} subscriber(s) on {topic} "
                  f"after {args.discovery_timeout:g} s", file=sys.stderr)
            return 1
    if args.wait_for:
        answer_topic = args.wait_for
        if not _spin_until(node, lambda: node.count_publishers(answer_topic) > 0, args.discovery_timeout):
            print(f"{PROG}: warning: nothing publishes {answer_topic} yet", file=sys.stderr)
        _spin_until(node, lambda: False, 0.3)  # let the answering node match our publisher as well

    start_wall = time.monotonic()
    first_log: int | None = None
    published = unanswered = 0
    for log_time, raw in iter_cloud_messages(args.bag, args.topic):
        if args.limit and published >= args.limit:
            break
        if first_log is None:
            first_log = log_time
        if not args.wait_for:
            due = start_wall + (log_time - first_log) / 1e9 / args.rate
            _spin_until(node, lambda due=due: time.monotonic() >= due, max(0.0, due - time.monotonic()) + 1.0)
        if not rclpy.ok():
            break
        msg = to_rclpy_cloud(raw)
        stamp = stamp_ns(msg.header)
        node.pub.publish(msg)
        published += 1
        if not args.quiet:
            print(f"{PROG}: published {stamp / 1e9:.6f} ({msg.width * msg.height} points) on {topic}", flush=True)
        if args.wait_for:
            if not _spin_until(node, lambda stamp=stamp: stamp in node.answered, args.wait_timeout):
                unanswered += 1
                print(f"{PROG}: warning: no answer for {stamp / 1e9:.6f} on {args.wait_for} "
                      f"after {args.wait_timeout:g} s", file=sys.stderr)
    if args.qos == "reliable":  # don't exit while the last samples are still in flight
        node.pub.wait_for_all_acked(Duration(seconds=10))
    _spin_until(node, lambda: False, 0.2)
    elapsed = time.monotonic() - start_wall
    extra = f", {unanswered} unanswered" if args.wait_for else ""
    print(f"{PROG}: published {published} clouds from {args.bag} on {topic} in {elapsed:.1f} s{extra}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args = rclpy.utilities.remove_ros_args(["x", *argv])[1:]  # our own options; --ros-args go to rclpy
    args = build_parser().parse_args(ros_args)
    if not args.bag.exists():
        print(f"{PROG}: error: {args.bag}: no such bag", file=sys.stderr)
        return 2
    if args.rate <= 0:
        print(f"{PROG}: error: --rate must be > 0", file=sys.stderr)
        return 2
    rclpy.init(args=["bag_replay", *argv])
    node = _Replayer(args)
    status = 0
    try:
        status = replay(node, args)
    except BagError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        status = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        status = 0
    finally:
        try:
            node.destroy_node()
        except Exception:  # the context may already be shut down by a signal
            pass
        rclpy.try_shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
