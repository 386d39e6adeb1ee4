"""Replay a bag through the completion node and look at it in RViz.

    ros2 launch lidar_completion_ros demo.launch.py bag:=/data/kitti_08_bag
    ros2 launch lidar_completion_ros demo.launch.py bag:=in_bag record:=out_bag rviz:=false

Starts ``completion.launch.py`` (same arguments for the node), ``bag_replay`` of ``bag``
(lock-step with the node's output, so a slow CPU model still sees every scan), optionally
``bag_record`` of the completions into ``record``, and RViz with config/completion.rviz.
For the whole job without ROS installed, use ``scripts/demo.sh``.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchContext, LaunchDescription

PACKAGE = "lidar_completion_ros"


def _tools(context: LaunchContext) -> list[Node]:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    share = get_package_share_directory(PACKAGE)
    input_topic, output_topic = arg("input_topic"), arg("output_topic")
    actions = [
        Node(package=PACKAGE, executable="bag_replay", name="bag_replay", output="screen",
             arguments=[arg("bag"), "--output-topic", input_topic, "--wait-for", output_topic,
                        "--rate", arg("rate")]),
    ]
    if arg("record"):
        actions.append(Node(package=PACKAGE, executable="bag_record", name="bag_record", output="screen",
                            arguments=["--topic", output_topic, "--out", arg("record")]))
    if arg("rviz").lower() in ("true", "1", "yes"):
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                            arguments=["-d", os.path.join(share, "config", "completion.rviz")]))
    return actions


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="rosbag2 directory with a PointCloud2 topic"),
        DeclareLaunchArgument("record", default_value="", description="bag directory for the completions; empty: none"),
        DeclareLaunchArgument("rate", default_value="1.0", description="replay speed factor (unused in lock-step)"),
        DeclareLaunchArgument("rviz", default_value="true", description="start RViz"),
        DeclareLaunchArgument("input_topic", default_value="/points_raw", description="scan topic"),
        DeclareLaunchArgument("output_topic", default_value="/points_completed", description="completion topic"),
        DeclareLaunchArgument("checkpoint", default_value="", description="checkpoint; empty: the YAML's"),
        DeclareLaunchArgument("device", default_value="", description="device; empty: the YAML's"),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, "launch", "completion.launch.py")),
            launch_arguments={
                "input_topic": LaunchConfiguration("input_topic"),
                "output_topic": LaunchConfiguration("output_topic"),
                "checkpoint": LaunchConfiguration("checkpoint"),
                "device": LaunchConfiguration("device"),
            }.items(),
        ),
        OpaqueFunction(function=_tools),
    ])
