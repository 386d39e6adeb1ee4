#!/usr/bin/env bash
# Optional: build MinkowskiEngine 0.5.4 (the library the published checkpoints were trained
# with) into .venv, so `lidar_completion.minkowski` can run the same networks on it and the
# backend comparison tests and benchmark rows switch on. Nothing else needs it.
#
#   ./scripts/install_minkowski.sh          # CPU build, ~10-20 min on 2 cores
#   ME_CUDA=1 ./scripts/install_minkowski.sh  # CUDA build (needs nvcc matching torch)
#
# ME 0.5.4 is unmaintained: its sdist needs setuptools<60 (numpy.distutils-era setup.py),
# no build isolation (it imports torch at build time), BLAS headers and C++17 for current
# torch headers; this script provides those and builds it, changing nothing in this
# repository. Its Python code still imports `collections.Sequence` (gone since Python
# 3.10): `lidar_completion.minkowski` puts the alias back before importing it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
source "$repo/scripts/setup_env.sh"

if python -c "import MinkowskiEngine" 2>/dev/null; then
  echo "[minkowski] already installed: $(python -c 'import MinkowskiEngine as ME; print(ME.__version__)')"
  exit 0
fi

if ! ls /usr/include/*/cblas.h /usr/include/cblas.h >/dev/null 2>&1 \
   && ! ls /usr/include/x86_64-linux-gnu/openblas*/cblas.h >/dev/null 2>&1; then
  echo "[minkowski] installing libopenblas-dev (needs root)"
  apt-get update -qq && apt-get install -y -qq libopenblas-dev
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pip install --disable-pip-version-check -q "setuptools<60" wheel ninja
pip download --disable-pip-version-check -q --no-deps --no-binary :all: --no-build-isolation -d "$work" MinkowskiEngine==0.5.4
tar -xzf "$work"/MinkowskiEngine-0.5.4.tar.gz -C "$work"
src="$work/MinkowskiEngine-0.5.4"

# Current torch headers need C++17 (ME 0.5.4 asks for C++14).
sed -i 's/-std=c++14/-std=c++17/g' "$src/setup.py"

build_args=(--blas=openblas)
if [ "${ME_CUDA:-0}" = "1" ]; then
  build_args+=(--force_cuda)
else
  build_args+=(--cpu_only)
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
( cd "$src" && python setup.py install "${build_args[@]}" )
python -c "import MinkowskiEngine as ME; print('[minkowski] installed', ME.__version__)"
