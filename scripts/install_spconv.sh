#!/usr/bin/env bash
# Optional: spconv 2.3.8 into .venv, so `lidar_completion.spconv_backend` can run the same
# networks on it and benchmarks/bench_backends.py adds its column. Nothing else needs it.
#
#   ./scripts/install_spconv.sh                    # CPU wheel from PyPI (package `spconv`), ~1 min
#   SPCONV_CUDA=cu120 ./scripts/install_spconv.sh  # CUDA wheel (package `spconv-cu120`; match torch's CUDA)
#
# spconv does not depend on torch (it brings cumm, pccm, ccimport, pybind11, fire); torch is
# pinned to the version already installed anyway, so pip can never swap it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
source "$repo/scripts/setup_env.sh"

package="spconv"
if [ -n "${SPCONV_CUDA:-}" ]; then
  package="spconv-${SPCONV_CUDA}"
fi
if python -c "import spconv.pytorch" 2>/dev/null; then
  echo "[spconv] already installed: $(python -c 'import spconv; print(spconv.__version__)')"
  exit 0
fi
pin="$(mktemp)"
trap 'rm -f "$pin"' EXIT
python -c 'import torch; print("torch==" + torch.__version__)' > "$pin"
pip install --disable-pip-version-check -q --constraint "$pin" "${package}==2.3.8"
python -c "import spconv, spconv.pytorch; print('[spconv] installed', spconv.__version__)"
