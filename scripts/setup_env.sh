#!/usr/bin/env bash
# Source me: creates or refreshes .venv and activates it. Idempotent and quick when
# nothing changed (a stamp of the dependency files decides whether pip runs).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
if [ ! -x "$repo/.venv/bin/python" ]; then
  echo "[setup] creating $repo/.venv with $("$python_bin" --version)"
  "$python_bin" -m venv "$repo/.venv"
fi
stamp="$repo/.venv/.deps-stamp"
want="$(cat "$repo/requirements.txt" "$repo/pyproject.toml" "$repo/training/pyproject.toml" \
  "$repo/ros2_ws/src/lidar_completion_ros/setup.py" 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies (first run takes a few minutes)"
  "$repo/.venv/bin/pip" install --disable-pip-version-check -q -r "$repo/requirements.txt"
  "$repo/.venv/bin/pip" install --disable-pip-version-check -q --no-deps -e "$repo" -e "$repo/training"
  if [ -f "$repo/ros2_ws/src/lidar_completion_ros/setup.py" ]; then
    "$repo/.venv/bin/pip" install --disable-pip-version-check -q --no-deps -e "$repo/ros2_ws/src/lidar_completion_ros"
  fi
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$repo/.venv/bin/activate"
# Fast DDS from the PyPI wheels; keep test traffic on this machine.
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export ROS_LOCALHOST_ONLY="${ROS_LOCALHOST_ONLY:-1}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export MPLBACKEND=Agg
