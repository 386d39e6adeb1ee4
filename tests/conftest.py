"""Shared fixtures: where the reference data lives, and small deterministic helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run by default, so CI cannot turn red on a
# new draw; `HYPOTHESIS_PROFILE=explore ./scripts/test.sh tests/test_fuzz_files.py` draws fresh
# ones (run it when touching parsers or loaders, and pin what it finds as a regression test).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# One intra-op thread: the suite runs next to ROS node subprocesses, and OpenMP threads that
# spin against each other on 2 busy cores make small models up to 10x slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIDAR_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data not found at {SHARED} (set LIDAR_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def real_scan_path(shared_dir: Path) -> Path:
    return shared_dir / "data" / "semantickitti_08_000123.ply"
