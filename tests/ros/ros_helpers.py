"""Helpers for the ROS tests: real node / tool processes and an in-process rclpy peer.

Every test gets its own ROS_DOMAIN_ID (see conftest.py), so parallel runs on one machine
do not see each other's topics.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidar_completion.children import ChildProcess, parameter_args
from lidar_completion_ros.runtime import PrivateNode

REPO = Path(__file__).resolve().parents[2]
NODE_YAML = REPO / "config" / "completion_node.yaml"
FASTDDS_PROFILE = REPO / "config" / "fastdds_large_data.xml"
SHIPPED_STUDENT = REPO / "src" / "lidar_completion" / "models" / "student_lite"

#: Keeps the tiny random model's CPU time small (used when the shipped student is absent).
# The tiny random model's predictions are noise: unclipped (noise_clip 0) and without the
# stray-point filter (compose_support 0), so its scans count as completed, not out of domain.
TINY_OVERRIDES = {"sampling.steps": 1, "sampling.guidance": 1.0, "data.n_part": 256, "refine": False,
                  "sampling.noise_clip": 0.0, "data.compose_support": 0}


def ros_env(domain_id: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ROS_DOMAIN_ID=str(domain_id),
        RMW_IMPLEMENTATION=env.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp"),
        ROS_LOCALHOST_ONLY=env.get("ROS_LOCALHOST_ONLY", "1"),
        ROS_AUTOMATIC_DISCOVERY_RANGE=env.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST"),
        FASTDDS_DEFAULT_PROFILES_FILE=env.get("FASTDDS_DEFAULT_PROFILES_FILE", str(FASTDDS_PROFILE)),
        PYTHONUNBUFFERED="1",
        RCUTILS_LOGGING_BUFFERED_STREAM="0",
        RCUTILS_COLORIZED_OUTPUT="0",
        OMP_WAIT_POLICY=env.get("OMP_WAIT_POLICY", "PASSIVE"),  # see node.py: spinning OpenMP vs busy CPUs
    )
    return env


class Proc(ChildProcess):
    """A :class:`ChildProcess` (run from the repository root) whose waits fail the test,
    with its last output lines, instead of returning None or a kill status."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], name: str) -> None:
        super().__init__(cmd, env, name, cwd=REPO)

    def _fail(self, what: str) -> AssertionError:
        return AssertionError(f"{self.name}: {what}:\n{self.tail()}")

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        """First output line matching ``pattern``; fails with the output so far on timeout or exit."""
        match = self.wait_for(pattern, timeout)
        if match is None and not self.output_ended:
            raise self._fail(f"no /{pattern}/ within {timeout} s")
        if match is None:
            raise self._fail(f"exited ({self.wait(10)}) before /{pattern}/")
        return match

    def wait(self, timeout: float | None = None) -> int:
        try:
            return super().wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._fail(f"did not exit within {timeout} s") from None

    def interrupt(self, timeout: float = 30.0, sig: int = signal.SIGINT) -> int:
        """Send SIGINT (or ``sig``) and wait for a clean exit; fails if it had to be killed."""
        code = super().interrupt(timeout, sig)
        if self.killed:
            raise self._fail(f"did not exit within {timeout} s of signal {sig}")
        return code


def start_node(domain_id: int, params: dict[str, Any], *, params_file: Path | None = NODE_YAML,
               ros_args: Sequence[str] = ()) -> Proc:
    cmd = [sys.executable, "-m", "lidar_completion_ros.node", "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    cmd += parameter_args(params) + list(ros_args)
    return Proc(cmd, ros_env(domain_id), "completion_node")


def parse_summary(output: str) -> dict[str, int]:
    """Counters from the node's final ``summary: key=value ...`` line."""
    match = re.search(r"summary: (.*)", output)
    assert match, f"no summary line in node output:\n{output[-3000:]}"
    return {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}


class Peer(PrivateNode):
    """In-process rclpy node on its own context and domain: publish clouds, collect topics."""

    def __init__(self, domain_id: int, name: str = "test_peer") -> None:
        super().__init__(name, domain_id)
        self.diagnostics: list[dict[str, str]] = []  # all tasks' values of our node, one dict per message
        self.tasks: dict[str, list[tuple[int, str, dict[str, str]]]] = {}  # task -> (level, message, values)
        self.received: dict[str, list[Any]] = {}

    def subscribe(self, msg_type: Any, topic: str, reliability: str = "reliable", depth: int = 50) -> list[Any]:
        from lidar_completion_ros.messages import qos_profile

        bucket = self.received.setdefault(topic, [])
        self.node.create_subscription(msg_type, topic, bucket.append, qos_profile(reliability, depth))
        return bucket

    def watch_diagnostics(self, node: str = "completion_node") -> None:
        """Collect the node's diagnostics tasks (statuses named ``"<node>: <task>"``)."""
        from diagnostic_msgs.msg import DiagnosticArray

        prefix = f"{node}: "

        def on_diag(msg: DiagnosticArray) -> None:
            merged: dict[str, str] = {}
            for status in msg.status:
                if status.name.startswith(prefix):
                    values = {kv.key: kv.value for kv in status.values}
                    level = int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else int(status.level)
                    self.tasks.setdefault(status.name[len(prefix):], []).append((level, status.message, values))
                    merged.update(values)
            if merged:
                self.diagnostics.append(merged)

        self.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 50)

    def publisher(self, msg_type: Any, topic: str, reliability: str = "reliable", depth: int = 50) -> Any:
        from lidar_completion_ros.messages import qos_profile

        return self.node.create_publisher(msg_type, topic, qos_profile(reliability, depth))

    def spin_until(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        if not super().spin_until(predicate, timeout):
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def spin_for(self, seconds: float) -> None:
        super().spin_until(lambda: False, seconds)

    def counters(self) -> dict[str, int]:
        """Latest diagnostics counters of the node (ints only)."""
        if not self.diagnostics:
            return {}
        return {k: int(v) for k, v in self.diagnostics[-1].items() if re.fullmatch(r"-?\d+", v or "")}


def make_cloud_msg(xyz: np.ndarray, stamp_ns: int, frame_id: str = "velodyne",
                   extra: dict[str, np.ndarray] | None = None) -> Any:
    from lidar_completion_ros.messages import time_from_ns
    from sensor_msgs.msg import PointCloud2, PointField
    from std_msgs.msg import Header

    from lidar_completion.pointcloud2 import build_cloud

    header = Header(frame_id=frame_id, stamp=time_from_ns(stamp_ns))
    return build_cloud(xyz, header, PointCloud2, PointField, extra=extra)


def shell_points(n: int, rng: np.random.Generator, r_min: float = 5.0, r_max: float = 30.0) -> np.ndarray:
    """Points on the ground and on walls between ``r_min`` and ``r_max`` metres."""
    r = rng.uniform(r_min, r_max, n)
    angle = rng.uniform(-np.pi, np.pi, n)
    z = np.where(rng.random(n) < 0.5, -1.7, rng.uniform(-1.5, 2.0, n))
    return np.column_stack([r * np.cos(angle), r * np.sin(angle), z]).astype(np.float32)
