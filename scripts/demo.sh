#!/usr/bin/env bash
# The main job in one command, on a fresh machine:
#   ./scripts/demo.sh            (outputs under ./out/demo/)
# 1. sets up .venv (scripts/setup_env.sh installs everything the first time);
# 2. generates a short synthetic SemanticKITTI-layout sequence (lidar-synth, 64-beam sensor)
#    and its ground-truth map (lidar-build-maps);
# 3. converts it to a rosbag2 bag (lidar-kitti-to-bag);
# 4. runs the ROS 2 completion node with the shipped student (a random tiny model with a
#    loud warning if it is missing), replays the bag through it over DDS, records the
#    completions to a bag, renders input vs completion vs ground truth to a PNG and prints
#    per-frame latency and completion metrics against the ground truth.
# Environment: DEMO_SCANS (default 20: the ground truth is the map accumulated over the whole
# sequence, and over only a few scans it is little more than those scans, leaving nothing to
# complete: 5 scans give an input CD of 0.09 m, 20 scans 0.19 m), DEMO_SEED (default 0), DEMO_OUT (default out/demo),
# DEMO_SENSOR (default hdl64: the 64-beam sensor the shipped models were trained on; lite: fewer beams).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# shellcheck disable=SC1091
source scripts/setup_env.sh
set -euo pipefail  # (setup_env.sh leaves shell options alone)

out="${DEMO_OUT:-out/demo}"
scans="${DEMO_SCANS:-20}"
seed="${DEMO_SEED:-0}"
sensor="${DEMO_SENSOR:-hdl64}"
rm -rf "$out"
mkdir -p "$out"

echo "[demo] 1/3 synthetic sequence: $scans scans ($sensor sensor, seed $seed) and its ground-truth map"
lidar-synth --out "$out/data" --sequences 1 --scans "$scans" --seed "$seed" --preset "$sensor" 2>&1 | tail -n 1
lidar-build-maps --root "$out/data" --sequences 00 2>&1 | tail -n 1

echo "[demo] 2/3 rosbag2 of the sequence"
lidar-kitti-to-bag --sequence "$out/data/sequences/00" --out "$out/input_bag"

echo "[demo] 3/3 node + replay + record over DDS, then metrics and picture"
python -m lidar_completion_ros.demo --root "$out/data" --sequence 00 --bag "$out/input_bag" --out "$out"

echo "[demo] done in $(( $(date +%s) - start )) s; outputs in $out/"
