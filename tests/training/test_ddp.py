"""Multi-process training (issue 15, item 9): Lightning DDP with 2 CPU processes over gloo,
through the same ``lidar-train`` command a GPU cluster would run (``trainer.devices: 2``,
``trainer.strategy: ddp``). The teacher and the distillation each train a few steps; both
ranks must see different data, rank 0 alone writes checkpoints and logs, and a resumed DDP
run continues at the step its checkpoint holds."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lidar_completion.checkpoints import load_model

from .test_training import run_config

DDP = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


def lidar_train(*args: str | Path, timeout: float = 900) -> subprocess.CompletedProcess:
    command = shutil.which("lidar-train", path=str(Path(sys.executable).parent)) or shutil.which("lidar-train")
    if command is None:
        pytest.skip("the lidar-train command is not installed (pip install -e training)")
    # One thread per rank on a 2-core machine; gloo over the loopback interface.
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
                        "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([command, *map(str, args), "--no-progress"], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, f"lidar-train {args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def check_run(out: Path, steps: int, loss_key: str) -> list[dict[str, str]]:
    """Every step logged once, by rank 0, with both ranks' batch fingerprints; one checkpoint."""
    rows = [r for r in metrics(out) if r.get(loss_key)]
    assert [int(r["step"]) for r in rows] == list(range(steps)), [r["step"] for r in rows]
    for row in rows:
        sums = (float(row["data/rank0_sum"]), float(row["data/rank1_sum"]))
        assert sums[0] != sums[1], f"both ranks trained on the same batch at step {row['step']}"
    # Rank 0 alone writes: the checkpoint directory holds the one renamed-into-place file.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["data_step"] == steps
    return rows


def test_ddp_teacher_then_distillation_on_two_cpu_processes(tiny_dataset, tmp_path):
    # Teacher: 4 steps, 2 processes.
    teacher_out = tmp_path / "teacher"
    config = tmp_path / "teacher.yaml"
    config.write_text(run_config(tiny_dataset, teacher_out, trainer={"max_steps": 4, "checkpoint_every": 2, **DDP}).to_yaml())
    done = lidar_train(config)
    assert "exported teacher model" in done.stdout
    first = check_run(teacher_out, 4, "train/loss")
    assert state_step(teacher_out) == 4

    # Resumed with a longer budget: continues at step 4, keeps the log, ends at 6.
    lidar_train(config, "--resume", "--set", "trainer.max_steps=6")
    resumed = check_run(teacher_out, 6, "train/loss")
    assert resumed[:4] == first
    assert state_step(teacher_out) == 6
    teacher = load_model(teacher_out / "export")
    assert teacher.config.kind == "teacher"

    # Distillation-DPO from that teacher: 2 iterations, 2 processes.
    student_out = tmp_path / "student"
    config = tmp_path / "student.yaml"
    config.write_text(run_config(
        tiny_dataset, student_out, kind="distill",
        trainer={"max_steps": 2, "checkpoint_every": 1, "optimizer": "sgd", "lr": 1e-3, "grad_clip": 0.05, **DDP},
        distill={"teacher": str(teacher_out / "export")},
    ).to_yaml())
    done = lidar_train(config)
    assert "exported distill model" in done.stdout
    rows = [r for r in metrics(student_out) if any(k.startswith("train/") and v for k, v in r.items())]
    loss_key = next(k for k in rows[0] if k.startswith("train/") and rows[0][k])
    check_run(student_out, 2, loss_key)
    student = load_model(student_out / "export")
    assert student.config.kind == "student"
    for key, value in teacher.encoder.state_dict().items():
        assert torch.equal(student.encoder.state_dict()[key], value)
    moved = [k for k, v in teacher.denoiser.state_dict().items() if not torch.equal(student.denoiser.state_dict()[k], v)]
    assert moved, "the student did not move away from the teacher"


def state_step(out: Path) -> int:
    """Optimizer steps Lightning recorded in the checkpoint (teacher: one per batch)."""
    return int(torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"])
