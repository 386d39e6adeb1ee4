"""The evaluation CLI: a checkpoint through the pipeline, and files completed elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lidar_completion.checkpoints import save_model
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.io import write_points
from lidar_completion_training.evaluate import main


def test_evaluate_checkpoint_writes_table_json_csv_and_plot(tiny_dataset, tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = save_model(CompletionModel(ModelConfig(channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0, n_part=64)), tmp_path / "model")
    out = tmp_path / "eval"
    code = main(["--root", str(tiny_dataset), "--sequences", "01", "--checkpoint", str(model_dir), "--max-scans", "2", "--out", str(out)])
    assert code == 0
    assert "| CD (m)" in capsys.readouterr().out
    # What users get against what they had: input, input at the output's size, output, completion alone.
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert list(summary) == ["input scan (all points in range)", "input scan, FPS to the output's point count",
                             "model (scan + completion)", "model, completion only"]
    output, alone, scan = summary["model (scan + completion)"], summary["model, completion only"], \
        summary["input scan (all points in range)"]
    assert output["nfe"] == alone["nfe"] == 1 and output["cd"] > 0 and 0 <= output["fscore"] <= 1
    assert output["points"] >= scan["points"] > alone["points"]  # the scan is all in the output
    assert (out / "summary.csv").read_text().startswith("setting,")
    assert (out / "metrics.png").stat().st_size > 0 and "input scan" in (out / "paired.md").read_text()
    assert main(["--root", str(tiny_dataset), "--sequences", "01", "--checkpoint", str(model_dir), "--max-scans", "2",
                 "--no-emd", "--completion-only", "--out", str(out / "alone")]) == 0
    assert list(json.loads((out / "alone" / "summary.json").read_text())["summary"]) == ["model, completion only"]


def test_free_space_margin_flag_reaches_the_pipeline(tiny_dataset, tmp_path, capsys):
    """--free-space-margin -1 turns the stage off (more points kept); a margin keeps fewer."""
    torch.manual_seed(0)
    model_dir = save_model(CompletionModel(ModelConfig(channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0, n_part=64)), tmp_path / "model")
    points = {}
    for margin in ("-1", "0"):
        out = tmp_path / f"eval{margin}"
        assert main(["--root", str(tiny_dataset), "--sequences", "01", "--checkpoint", str(model_dir), "--max-scans", "2",
                     "--no-emd", "--free-space-margin", margin, "--completion-only", "--out", str(out)]) == 0
        points[margin] = json.loads((out / "summary.json").read_text())["summary"]["model, completion only"]["points"]
    assert points["0"] < points["-1"]


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
    for row in ("input scan (all points in range)", "FPS to 320 points (the nominal budget)", "FPS to 32 points (what the model sees)",
                "input scan, FPS to the completion's point count",
                "teacher, 1 steps, VE sampler (t0 200)", "teacher, 2 steps, VE sampler", "teacher, 2 steps, published DPM-Solver++",
                "plain distillation student, 1 step(s)", "Distillation-DPO student, 1 step(s) + refinement"):
        assert row in table, row
    assert table.count(" ± ") >= 5 * 9
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["input scan, FPS to 320 points (the nominal budget)"]["points"] == 320
    # The line to beat: the scan at the DPO student's own point count, scan by scan.
    per_scan = json.loads((out / "summary.json").read_text())["per_scan"]
    matched = [row["points"] for row in per_scan["input scan, FPS to the completion's point count"]]
    assert matched == [row["points"] for row in per_scan["Distillation-DPO student, 1 step(s)"]]
    assert summary["input scan, FPS to the completion's point count"]["cd_se"] > 0
    assert (out / "cd_vs_steps.png").stat().st_size > 0 and (out / "completions.png").stat().st_size > 0
    paired = (out / "paired.md").read_text()
    # The same checkpoint as both students: the paired difference is exactly zero.
    assert "| Distillation-DPO student, 1 step(s) − plain distillation student, 1 step(s) | +0.0000 ± 0.0000 | 0/2 |" in paired
    assert "+ refinement − input scan (all points in range)" in paired
    for key in ("cd", "jsd_bev", "fscore", "iou_0.5"):
        assert f"| {key}: a - b (paired, same scans) |" in paired, key


def test_paired_differences_cancel_scene_difficulty():
    from lidar_completion_training.evaluate import paired_differences

    # b is worse than a by 0.01 on every scan while the scans themselves differ by 1 m:
    # unpaired standard errors would hide the gap, the paired one is zero.
    per_scan = {"a": [{"cd": c} for c in (1.0, 2.0, 3.0)], "b": [{"cd": c + 0.01} for c in (1.0, 2.0, 3.0)], "c": [{"cd": 1.0}]}
    table = paired_differences(per_scan, [("a", "b"), ("a", "c"), ("a", "missing")])
    assert "| a − b | -0.0100 ± 0.0000 | 3/3 |" in table
    assert "a − c" not in table and "missing" not in table


def _bags(tiny_dataset, tmp_path):
    """The bag of sequence 01 and a 'completed' bag: scan 0 completed by its ground truth,
    scan 2 by its own static points, and a cloud at a stamp that is no scan."""
    from lidar_completion.bags import kitti_sequence_to_bag, read_clouds, write_clouds
    from lidar_completion_training.dataset import CompletionDataset, PairConfig

    in_bag = tmp_path / "in_bag"
    kitti_sequence_to_bag(tiny_dataset / "sequences" / "01", in_bag)
    stamps = [c.stamp_ns for c in read_clouds(in_bag)]
    dataset = CompletionDataset(tiny_dataset, ["01"], PairConfig())
    completed = tmp_path / "completed_bag"
    write_clouds(completed, [(stamps[0], "velodyne", dataset.pair(0)[1]), (stamps[2], "velodyne", dataset.pair(2)[0]),
                             (stamps[-1] + 7, "velodyne", dataset.pair(1)[1])], topic="points_completed")
    return in_bag, completed, stamps


def test_evaluate_completed_bag_scores_each_frame_against_the_input(tiny_dataset, tmp_path, capsys):
    in_bag, completed, stamps = _bags(tiny_dataset, tmp_path)
    out = tmp_path / "eval"
    code = main(["--root", str(tiny_dataset), "--sequences", "01", "--completed-bag", str(completed), "--input-bag", str(in_bag),
                 "--no-emd", "--out", str(out), "--picture", str(tmp_path / "comparison.png"), "--picture-note", "[TEST]"])
    assert code == 0
    captured = capsys.readouterr()
    assert "no scan of" in captured.err and "| input scan (all points in range) |" in captured.out
    frames = json.loads((out / "frames.json").read_text())
    assert [f["frame"] for f in frames] == [0, 2]
    assert round(frames[1]["stamp"] * 1e9) == stamps[2]
    assert np.isclose(frames[0]["completion_cd"], 0.0) and frames[0]["input_cd"] > 0
    assert np.isclose(frames[1]["completion_cd"], frames[1]["input_cd"])  # the input scan itself
    assert "completion_emd" not in frames[0] and frames[0]["output_points"] == frames[0]["gt_points"]
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert list(summary) == ["input scan (all points in range)", "input scan, FPS to the completion's point count",
                             "completion (completed_bag)"]
    # The budget line: the input itself when the completion has at least as many points.
    assert frames[1]["budget_points"] == frames[1]["input_points"] and np.isclose(frames[1]["budget_cd"], frames[1]["input_cd"])
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_evaluate_completed_bag_needs_the_input_bag(tiny_dataset, tmp_path):
    with pytest.raises(SystemExit):
        main(["--root", str(tiny_dataset), "--sequences", "01", "--completed-bag", str(tmp_path / "x")])


def test_demo_scores_through_the_command_and_prints_the_table(tiny_dataset, tmp_path, monkeypatch, capsys):
    """The ROS demo runs ``lidar-evaluate --completed-bag`` as a command (never importing this
    package), merges the node's timings and prints its table; without the command it says so."""
    import argparse

    pytest.importorskip("lidar_completion_ros")
    from lidar_completion.bags import read_clouds
    from lidar_completion_ros import demo

    in_bag, completed, stamps = _bags(tiny_dataset, tmp_path)
    args = argparse.Namespace(root=tiny_dataset, sequence="01", bag=in_bag, out=tmp_path / "demo")
    args.out.mkdir()
    outputs = list(read_clouds(completed))
    timings = {s: {"input_points": 1000.0, "processing_ms": 50.0, "model_ms": 40.0, "overhead_ms": 1.5} for s in stamps}
    assert demo.evaluate_command() is not None
    scored = demo.score(args, completed, 50.0, "[TEST]")
    assert scored is not None and (args.out / "comparison.png").stat().st_size > 0
    rows = demo.frame_rows(outputs, stamps, timings, scored)
    assert [r["frame"] for r in rows] == [0, 2] and rows[0]["processing_ms"] == 50.0
    text, mean = demo.table(rows)
    assert "CD out" in text and "in@out" in text and "IoU.5 in" in text and text.splitlines()[-1].lstrip().startswith("mean")
    assert np.isclose(mean["budget_cd"], np.mean([r["budget_cd"] for r in rows]))
    assert np.isclose(mean["completion_cd"], np.mean([r["completion_cd"] for r in rows]))

    monkeypatch.setattr(demo.shutil, "which", lambda *a, **k: None)
    assert demo.score(args, completed, 50.0, "") is None
    assert "not installed" in capsys.readouterr().out
    text, _ = demo.table(demo.frame_rows(outputs, stamps, timings, None))
    assert "node ms" in text and "CD" not in text and len(text.splitlines()) == 2 + 2 + 2  # the cloud at no scan's stamp is left out
