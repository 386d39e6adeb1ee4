#!/usr/bin/env bash
# Optional: build MinkowskiEngine 0.5.4 (the library the published checkpoints were trained
# with) into .venv, so `lidar_completion.minkowski` can run the same networks on it and the
# backend comparison tests and benchmark rows switch on. Nothing else needs it.
#
#   ./scripts/install_minkowski.sh          # CPU build, ~10-20 min on 2 cores
#   ME_CUDA=1 ./scripts/install_minkowski.sh  # CUDA build (needs nvcc matching torch)
#
# ME 0.5.4 is unmaintained: its sdist needs setuptools<60 (numpy.distutils-era setup.py),
# no build isolation (it imports torch at build time), BLAS headers, C++17 for current
# torch headers, and `collections.abc` on Python >= 3.10. This script applies exactly those
# patches to an unpacked sdist and builds it; it changes nothing in this repository.
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

# Python >= 3.10 removed the ABC aliases from `collections`.
grep -rl --include='*.py' -E 'collections\.(Sequence|Iterable|Mapping)|from collections import (Sequence|Iterable|Mapping)' "$src/MinkowskiEngine" \
  | xargs -r sed -i -E \
      -e 's/from collections import (Sequence|Iterable|Mapping)/from collections.abc import \1/' \
      -e 's/collections\.(Sequence|Iterable|Mapping)/collections.abc.\1/g'
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
