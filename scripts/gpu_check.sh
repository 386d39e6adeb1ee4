#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU and only this repository (issue 14, item 4):
#   ./scripts/gpu_check.sh
# 1. sets up its own venv (.venv-gpu; GPU_CHECK_VENV to change) with a CUDA build of torch
#    2.13.0 and the project (requirements.txt, the three packages) — a few minutes the first
#    time, seconds after;
# 2. runs the CUDA parity tests (tests/test_networks.py, the cuda-parametrised fixtures);
# 3. prints the table of benchmarks/gpu_check.py: full-scale denoiser forward (180k points,
#    channel ratio 1) fp32 / bf16 / fp16 autocast / the torch-bf16 backend with peak GPU memory, the 1-step student
#    end to end per frame at full scale and at the shipped preset, the node's overhead, and two
#    one-minute training bursts at full scale (issue 27: config/training/teacher_semantickitti.yaml
#    and distill_dpo_semantickitti.yaml on one GPU, generated HDL-64 scans): ms per step,
#    steps/s with data loading and compute only, peak GPU memory, and the configured run's
#    length at that rate (GPU_CHECK_TRAIN_SECONDS: each burst's length, default 60; 0: none).
# Under 15 minutes on a GPU machine with a fast network. Without a GPU it prints one line
# and exits 2, having done nothing. CI never runs it.
#
# Which torch: PyPI's Linux x86_64 wheel `torch==2.13.0` is a CUDA build; where a pip
# configuration or a wheel cache pins the CPU build (as on the project's CPU machines), or the
# driver needs an older CUDA, name the PyTorch wheel index of a CUDA version the driver
# supports (`nvidia-smi` shows the highest), e.g.
#   GPU_CHECK_TORCH_INDEX=https://download.pytorch.org/whl/cu126 ./scripts/gpu_check.sh
# Other knobs: GPU_CHECK_TORCH (pip spec, default torch==2.13.0), GPU_CHECK_NVIDIA_SMI (the
# nvidia-smi to probe), PYTHON (interpreter for the venv, default python3.11 else python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
fail() { echo "gpu_check: $*" >&2; exit 2; }

smi="${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}"
command -v "$smi" >/dev/null 2>&1 || fail "no NVIDIA GPU: '$smi' not found (install the NVIDIA driver); nothing done"
gpus="$("$smi" -L 2>/dev/null)" && [ -n "$gpus" ] || fail "no NVIDIA GPU: '$smi -L' lists none or fails; nothing done"
echo "[gpu_check] $gpus"
start=$SECONDS

venv="${GPU_CHECK_VENV:-$repo/.venv-gpu}"
torch_spec="${GPU_CHECK_TORCH:-torch==2.13.0}"
index="${GPU_CHECK_TORCH_INDEX:-}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "[gpu_check] creating $venv with $("$python_bin" --version)"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
has_cuda_torch() { "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; }
if ! has_cuda_torch; then
  echo "[gpu_check] installing $torch_spec (CUDA build${index:+ from $index}; a few GB)"
  if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "${pip[@]}" --force-reinstall ${index:+--index-url "$index"} "$torch_spec"
  else
    "${pip[@]}" ${index:+--index-url "$index"} "$torch_spec"
  fi
  has_cuda_torch || fail "the torch installed in $venv is a CPU build ($("$venv/bin/python" -c 'import torch; print(torch.__version__)')); set GPU_CHECK_TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ (a CUDA version the driver supports) and rerun"
fi
stamp="$venv/.deps-stamp"
want="$(cat requirements.txt pyproject.toml training/pyproject.toml ros2_ws/src/lidar_completion_ros/setup.py | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[gpu_check] installing the project's dependencies"
  "${pip[@]}" -r requirements.txt  # torch==2.13.0 is already satisfied by the CUDA build
  "${pip[@]}" --no-deps -e . -e training -e ros2_ws/src/lidar_completion_ros
  echo "$want" > "$stamp"
fi
has_cuda_torch || fail "installing the requirements replaced the CUDA torch in $venv; rerun with GPU_CHECK_TORCH_INDEX set"
echo "[gpu_check] set up in $((SECONDS - start)) s"

# The environment scripts/setup_env.sh gives the tests and the node.
# shellcheck disable=SC1091
source "$venv/bin/activate"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}" ROS_LOCALHOST_ONLY="${ROS_LOCALHOST_ONLY:-1}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$repo/config/fastdds_large_data.xml}"
export MPLBACKEND=Agg OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA device (driver too old for its CUDA $(python -c 'import torch; print(torch.version.cuda)')? set GPU_CHECK_TORCH_INDEX)"

echo "[gpu_check] CUDA parity tests (tests/test_networks.py, cuda fixtures)"
parity=passed
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_networks.py -k cuda -rs || parity=FAILED
echo "[gpu_check] benchmarks"
train_seconds="${GPU_CHECK_TRAIN_SECONDS:-60}"
timeout $((420 + 2 * (${train_seconds%.*} + 150))) python benchmarks/gpu_check.py --train-seconds "$train_seconds"
echo "[gpu_check] CUDA parity tests: $parity; total $((SECONDS - start)) s"
[ "$parity" = passed ]
