"""Lint and types are part of the suite (so `.ci/run` checks them through the README's test
command): ruff over every Python file, mypy over the three packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["src/lidar_completion", "training/lidar_completion_training", "ros2_ws/src/lidar_completion_ros/lidar_completion_ros"]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_ruff_is_clean():
    pytest.importorskip("ruff", reason="ruff is not installed (requirements.txt has it)")
    result = _run("ruff", "check", "--no-cache", "src", "training", "ros2_ws/src", "benchmarks", "tests", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    pytest.importorskip("mypy", reason="mypy is not installed (requirements.txt has it)")
    result = _run("mypy", "--no-incremental", *PACKAGES)
    assert result.returncode == 0, result.stdout + result.stderr
