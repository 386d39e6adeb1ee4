"""The build a ROS user runs first (issue 28, item 9): ``colcon build`` of the package in a
fresh workspace, ``install/setup.sh`` sourced, and the *installed* ``completion_node`` (what
``ros2 run lidar_completion_ros completion_node`` starts) run with the *installed* parameter
YAML: it starts, warms up, answers one scan over DDS and exits 0 on SIGINT.

colcon comes from PyPI here (``colcon-core``, ``colcon-ros`` for ``package.xml`` packages,
``ros-ament-package``; requirements.txt); the test is skipped where it is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from lidar_completion.children import parameter_args
from ros_helpers import REPO, Proc, make_cloud_msg, parse_summary, ros_env, shell_points

pytestmark = pytest.mark.slow

PACKAGE = REPO / "ros2_ws" / "src" / "lidar_completion_ros"


def _colcon() -> str:
    colcon = shutil.which("colcon")
    if colcon is None:
        pytest.skip("colcon is not installed (pip install colcon-core colcon-ros ros-ament-package)")
    pytest.importorskip("colcon_ros", reason="colcon-ros is not installed: colcon cannot build package.xml packages")
    return colcon


@pytest.mark.parametrize("symlink", [False, True], ids=["install", "symlink-install"])
def test_colcon_built_node_starts_and_answers_a_scan(symlink: bool, tmp_path: Path, domain_id: int, model,
                                                     peer) -> None:
    from sensor_msgs.msg import PointCloud2

    colcon = _colcon()
    workspace = tmp_path / "ws"
    shutil.copytree(PACKAGE, workspace / "src" / PACKAGE.name,
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "install", "log"))
    build = subprocess.run([colcon, "build", *(["--symlink-install"] if symlink else []), "--event-handlers",
                            "console_direct-"], cwd=workspace, capture_output=True, text=True, timeout=600, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    prefix = workspace / "install" / PACKAGE.name
    executable = prefix / "lib" / PACKAGE.name / "completion_node"
    params_file = prefix / "share" / PACKAGE.name / "config" / "completion_node.yaml"
    assert executable.is_file() and params_file.is_file()

    def sourced(command: str) -> list[str]:  # as a user's shell after `source install/setup.sh`
        return ["bash", "-c", f". {workspace / 'install' / 'setup.sh'} && exec {command}"]

    # The package that runs is the workspace's, not the repository's editable install.
    where = subprocess.run(sourced("python -c 'import lidar_completion_ros as p; print(p.__file__)'"),
                           capture_output=True, text=True, timeout=120, env=ros_env(domain_id), check=False)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(workspace)), where.stdout + where.stderr

    completed = peer.subscribe(PointCloud2, "/points_completed")
    pub = peer.publisher(PointCloud2, "/points_raw")
    peer.watch_diagnostics()
    args = ["--ros-args", "--params-file", str(params_file),
            *parameter_args({"checkpoint": str(model.path), **model.overrides, "qos.input.reliability": "reliable"})]
    node = Proc(sourced(" ".join([str(executable), *(f"'{a}'" for a in args)])), ros_env(domain_id), "installed node")
    try:
        node.wait_for_line(r"warm-up inference done", 300)
        node.wait_for_line(r"ready: /points_raw -> /points_completed", 120)
        peer.spin_until(lambda: peer.diagnostics and peer.diagnostics[-1].get("output_subscribers") == "1"
                        and pub.get_subscription_count() == 1, 120, "node and peer to match")
        pub.publish(make_cloud_msg(shell_points(4000, np.random.default_rng(9), 4.0, 9.5), 9_000_000_009))
        peer.spin_until(lambda: completed, 300, "the completed scan")
        assert node.interrupt(60) == 0, node.output
    finally:
        node.kill()
    assert completed[0].header.stamp.sec == 9 and completed[0].header.frame_id == "velodyne"
    summary = parse_summary(node.output)
    assert summary["received"] == 1 and summary["completed"] + summary["out_of_domain"] == 1, summary
    assert "capped" not in node.output and "Traceback" not in node.output, node.output
