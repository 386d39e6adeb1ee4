"""scripts/gpu_check.sh and benchmarks/gpu_check.py on a machine without a GPU: one line,
exit status 2, nothing set up (the GPU path itself needs a GPU and is never run by CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("smi", ["missing", "failing"])
def test_script_without_gpu_says_so_in_one_line_and_sets_nothing_up(tmp_path, smi):
    probe = "nvidia-smi-that-does-not-exist"
    if smi == "failing":  # a driver tool that is there but finds no GPU
        probe = str(tmp_path / "nvidia-smi")
        Path(probe).write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        os.chmod(probe, 0o755)
    venv = tmp_path / "venv"
    done = _run(["bash", str(REPO / "scripts" / "gpu_check.sh")], GPU_CHECK_NVIDIA_SMI=probe, GPU_CHECK_VENV=str(venv))
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU"), lines
    assert not venv.exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi is present")
def test_script_default_probe_without_driver():
    done = _run(["bash", str(REPO / "scripts" / "gpu_check.sh")])
    assert done.returncode == 2 and len((done.stdout + done.stderr).strip().splitlines()) == 1


def test_benchmark_without_cuda_says_so_in_one_line():
    done = _run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")])
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
