"""Launch the LiDAR scene-completion node.

    ros2 launch lidar_completion_ros completion.launch.py
    ros2 launch lidar_completion_ros completion.launch.py input_topic:=/velodyne_points \
        checkpoint:=/models/student device:=cuda namespace:=perception

Arguments (``ros2 launch ... --show-args``):

* ``input_topic`` / ``output_topic``: remap the node's ``points_raw`` / ``points_completed``;
* ``params_file``: the parameter YAML (default: the package's config/completion_node.yaml);
* ``checkpoint`` / ``device``: override those parameters (empty = keep the YAML's);
* ``namespace``: ROS namespace of the node (debug topics follow it);
* ``use_sim_time``: use /clock, e.g. when replaying a bag with ``--clock``;
* ``autostart``: configure + activate the (lifecycle) node at start; ``false``: it waits
  for ``ros2 lifecycle set /completion_node configure`` / ``activate``;
* ``respawn`` / ``respawn_delay``: restart the node when it exits (e.g. status 3 after
  ``max_consecutive_failures`` failed inferences), after that many seconds.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchContext, LaunchDescription

PACKAGE = "lidar_completion_ros"


def _node(context: LaunchContext) -> list[Node]:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    def flag(name: str) -> bool:
        return arg(name).lower() in ("true", "1", "yes")

    overrides: dict[str, object] = {"use_sim_time": flag("use_sim_time"), "autostart": flag("autostart")}
    for name in ("checkpoint", "device"):
        if arg(name):  # empty: the value in params_file stands
            overrides[name] = arg(name)
    return [
        Node(
            package=PACKAGE,
            executable="completion_node",
            name="completion_node",
            namespace=arg("namespace"),
            parameters=[arg("params_file"), overrides],
            remappings=[("points_raw", arg("input_topic")), ("points_completed", arg("output_topic"))],
            output="screen",
            emulate_tty=True,
            respawn=flag("respawn"),
            respawn_delay=float(arg("respawn_delay")),
        )
    ]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "completion_node.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("input_topic", default_value="points_raw",
                              description="PointCloud2 topic to complete (the LiDAR driver's output)"),
        DeclareLaunchArgument("output_topic", default_value="points_completed",
                              description="topic for the completed PointCloud2 (same frame and stamp)"),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="node parameter YAML (see docs/ros.md for every key)"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="checkpoint path or shipped model name; empty: the params_file's"),
        DeclareLaunchArgument("device", default_value="",
                              description="auto, cpu, cuda or cuda:N; empty: the params_file's"),
        DeclareLaunchArgument("namespace", default_value="", description="ROS namespace of the node"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (bag replay with simulated time)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate the lifecycle node at start"),
        DeclareLaunchArgument("respawn", default_value="false",
                              description="restart the node when it exits (e.g. after repeated inference failures)"),
        DeclareLaunchArgument("respawn_delay", default_value="2.0",
                              description="seconds before a respawn"),
        OpaqueFunction(function=_node),
    ])
