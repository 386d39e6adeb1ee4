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


def test_training_bursts_time_the_shipped_configs_and_write_no_checkpoint(tmp_path):
    """The training rows' bursts on CPU: the full-scale teacher and DPO configs with their point
    counts, widths and device scaled down, stopped by time; steps/s with data loading never
    exceed compute-only steps/s."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check
    from lidar_completion_training import maps, synthetic

    root = tmp_path / "data"
    assert synthetic.main(["--out", str(root), "--sequences", "1", "--scans", "4", "--seed", "3", "--preset", "lite"]) == 0
    assert maps.main(["--root", str(root)]) == 0
    small = {"trainer.accelerator": "cpu", "data.num_workers": 0, "data.n_part": 64, "data.n_full": 640,
             "model.channel_ratio": 0.25}
    config = gpu_check.burst_config("teacher", root, tmp_path / "run", overrides=small)
    assert config.model.sampler == "ve" and config.trainer.batch_size == 2 and config.trainer.devices == 1
    result = gpu_check.training_burst(config, seconds=2.0, warmup=1)
    assert result["steps"] >= 1 and 0 < result["steps_per_s"] <= result["compute_steps_per_s"]
    assert result["peak_mib"] is None and result["seconds"] >= 2.0
    assert not (tmp_path / "run" / "checkpoints").exists()
    # The student's burst distils from a random teacher of the teacher config's shape.
    teacher = gpu_check.random_teacher(root, tmp_path / "teacher", overrides=small)
    config = gpu_check.burst_config("distill_dpo", root, tmp_path / "student", teacher, overrides=small)
    assert config.distill.mode == "dpo" and config.trainer.batch_size == 1
    result = gpu_check.training_burst(config, seconds=1.0, warmup=1)
    assert result["steps"] >= 1 and not (tmp_path / "student" / "checkpoints").exists()
