#!/usr/bin/env bash
# Source ROS 2 and the workspace, then run the command (default: the completion launch file).
set -e
source /opt/ros/jazzy/setup.bash
source /opt/ros2_ws/install/setup.bash
exec "$@"
