"""The evaluation CLI: a checkpoint through the pipeline, and files completed elsewhere."""

from __future__ import annotations

import json

import numpy as np
import torch

from lidar_completion.checkpoints import CompletionModel, ModelConfig, save_model
from lidar_completion.io import write_points
from lidar_completion_training.evaluate import main


def test_evaluate_checkpoint_writes_table_json_csv_and_plot(tiny_dataset, tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = save_model(CompletionModel(ModelConfig(channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0, n_part=64)), tmp_path / "model")
    out = tmp_path / "eval"
    code = main(["--root", str(tiny_dataset), "--sequences", "01", "--checkpoint", str(model_dir), "--max-scans", "2", "--out", str(out)])
    assert code == 0
    assert "| CD (m)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())["summary"]["model"]
    assert summary["nfe"] == 1 and summary["cd"] > 0 and 0 <= summary["fscore"] <= 1
    assert (out / "summary.csv").read_text().startswith("setting,")
    assert (out / "metrics.png").stat().st_size > 0


def test_evaluate_completed_files_scores_the_input_itself_best(tiny_dataset, tmp_path, capsys):
    from lidar_completion_training.dataset import CompletionDataset, PairConfig

    dataset = CompletionDataset(tiny_dataset, ["01"], PairConfig())
    completed = tmp_path / "completed" / "01"
    write_points(completed / "000000.npy", dataset.pair(0)[1])  # the ground truth itself
    (completed / "000001.bin").write_bytes(b"\x00" * 10)  # corrupt: skipped with a message
    out = tmp_path / "eval"
    code = main(["--root", str(tiny_dataset), "--sequences", "01", "--completed", str(tmp_path / "completed"), "--max-scans", "3", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "000001.bin" in err and "skipped" in err
    summary = next(iter(json.loads((out / "summary.json").read_text())["summary"].values()))
    assert np.isclose(summary["cd"], 0.0) and np.isclose(summary["iou_0.2"], 1.0)


def test_report_has_every_row_with_standard_errors_and_the_steps_curve(tiny_dataset, tmp_path, capsys):
    torch.manual_seed(0)
    common = dict(channel_ratio=0.25, n_part=32, max_range=20.0, sampler="ve", t0=200, prediction="displacement")
    teacher = save_model(CompletionModel(ModelConfig(**common, default_steps=4, default_guidance=1.0)), tmp_path / "teacher")
    student = save_model(CompletionModel(ModelConfig(**common, refine_channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0)), tmp_path / "student")
    out = tmp_path / "report"
    code = main(["report", "--root", str(tiny_dataset), "--sequences", "01", "--max-scans", "2", "--teacher", str(teacher),
                 "--student", str(student), "--sd-student", str(student), "--teacher-steps", "2", "--curve-steps", "1", "--out", str(out)])
    assert code == 0
    table = (out / "table.md").read_text()
    for row in ("input scan (all points in range)", "FPS to 320 points (the completion's budget)", "FPS to 32 points (what the model sees)",
                "teacher, 1 steps, VE sampler (t0 200)", "teacher, 2 steps, VE sampler", "teacher, 2 steps, published DPM-Solver++",
                "plain distillation student, 1 step(s)", "Distillation-DPO student, 1 step(s) + refinement"):
        assert row in table, row
    assert table.count(" ± ") >= 5 * 9
    summary = json.loads((out / "summary.json").read_text())["summary"]
    budget = next(v for k, v in summary.items() if "budget" in k)
    assert budget["points"] == 320 and budget["cd_se"] > 0
    assert (out / "cd_vs_steps.png").stat().st_size > 0 and (out / "completions.png").stat().st_size > 0
