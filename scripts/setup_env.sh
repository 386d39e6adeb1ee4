#!/usr/bin/env bash
# Source me: creates or refreshes .venv and activates it. Idempotent and quick when
# nothing changed (a stamp of the dependency files decides whether pip runs).
# Sourcing leaves the caller's shell options alone (no set -e leaking into your shell);
# it returns non-zero if the install fails.
_lidar_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_lidar_setup() (
  set -euo pipefail
  repo="$_lidar_repo"
  python_bin="${PYTHON:-python3.11}"
  command -v "$python_bin" >/dev/null || python_bin=python3
  if [ ! -x "$repo/.venv/bin/python" ]; then
    echo "[setup] creating $repo/.venv with $("$python_bin" --version)"
    "$python_bin" -m venv "$repo/.venv"
  fi
  stamp="$repo/.venv/.deps-stamp"
  want="$( { cat "$repo/requirements.txt" "$repo/pyproject.toml" "$repo/training/pyproject.toml" \
    "$repo/ros2_ws/src/lidar_completion_ros/setup.py" 2>/dev/null || true; } | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[setup] installing dependencies (first run takes a few minutes)"
    "$repo/.venv/bin/pip" install --disable-pip-version-check -q -r "$repo/requirements.txt"
    "$repo/.venv/bin/pip" install --disable-pip-version-check -q --no-deps -e "$repo" -e "$repo/training"
    if [ -f "$repo/ros2_ws/src/lidar_completion_ros/setup.py" ]; then
      "$repo/.venv/bin/pip" install --disable-pip-version-check -q --no-deps -e "$repo/ros2_ws/src/lidar_completion_ros"
    fi
    echo "$want" > "$stamp"
  fi
)

if ! _lidar_setup; then
  echo "[setup] failed to set up $_lidar_repo/.venv" >&2
  unset -f _lidar_setup
  return 1 2>/dev/null || exit 1
fi
unset -f _lidar_setup
# shellcheck disable=SC1091
source "$_lidar_repo/.venv/bin/activate"
# ROS 2 from the PyPI wheels (rclpy 9.x, Fast DDS): these are all rclpy needs here; no
# /opt/ros setup.bash, AMENT_PREFIX_PATH or LD_LIBRARY_PATH is required.
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# Keep test traffic on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE is the Jazzy+ name;
# ROS_LOCALHOST_ONLY the older one, kept for older distros).
export ROS_LOCALHOST_ONLY="${ROS_LOCALHOST_ONLY:-1}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# Fast DDS profile with a large shared-memory segment: without it most 2 MB best-effort
# (SensorData QoS) scans are lost between processes; see config/fastdds_large_data.xml.
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$_lidar_repo/config/fastdds_large_data.xml}"
unset _lidar_repo
export MPLBACKEND=Agg
# OpenMP threads that busy-wait make CPU torch up to 100x slower when another process holds
# a core (tests next to ROS nodes, training next to a demo); passive waiting costs nothing.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
