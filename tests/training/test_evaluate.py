"""The evaluation CLI: a checkpoint through the pipeline, and files completed elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lidar_completion.checkpoints import save_model
from lidar_completion.config import ScanCut
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.io import write_points
from lidar_completion_training.evaluate import main


def test_evaluate_checkpoint_writes_table_json_csv_and_plot(tiny_dataset, tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = save_model(CompletionModel(ModelConfig(channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0, cut=ScanCut.recorded_before(64, None))), tmp_path / "model")
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
    model_dir = save_model(CompletionModel(ModelConfig(channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0, cut=ScanCut.recorded_before(64, None))), tmp_path / "model")
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
    common = dict(channel_ratio=0.25, cut=ScanCut.recorded_before(32, 20.0), sampler="ve", t0=200, prediction="displacement")
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
    # Each row's key is in rows.json; a run written before rows had keys (no rows.json, merged
    # with --merge) gets the same keys from its rows' text.
    from lidar_completion_training.report import RowKey, legacy_key

    keys = {name: RowKey(**fields) for name, fields in json.loads((out / "rows.json").read_text()).items()}
    assert list(keys) == list(summary)
    assert {name: legacy_key(name) for name in keys} == keys


def test_renaming_a_row_keeps_it_in_the_paired_table(tmp_path):
    """The report pairs rows by their keys, not their display text: rows worded as no version
    ever worded them are all still paired, also when read back from a run's files (--merge)."""
    from lidar_completion_training.report import (COMPLETION, INPUT, SD_STUDENT, STUDENT, TEACHER, RowKey, paired_tables,
                                                  read_keys, report_pairs, summarise, write_outputs)

    keys = {"the bare scan": RowKey(INPUT), "the scan at the student's count": RowKey(INPUT, budget=COMPLETION),
            "big teacher, 50": RowKey(TEACHER, "ve", 50, 200, 1.0), "big teacher, 2 from 100": RowKey(TEACHER, "ve", 2, 100, 1.0),
            "SD": RowKey(SD_STUDENT, steps=2, guidance=1.0), "DPO": RowKey(STUDENT, steps=2, guidance=1.0),
            "DPO refined": RowKey(STUDENT, steps=2, guidance=1.0, refine=True)}
    metrics = ("cd", "jsd_bev", "fscore", "iou_0.5", "iou_0.2", "time_s")
    per_scan = {name: [{m: i + 0.1 * j for m in metrics} for j in range(3)] for i, name in enumerate(keys)}
    expected = ["DPO − SD", "DPO − big teacher, 2 from 100", "SD − big teacher, 2 from 100", "DPO − big teacher, 50",
                "DPO − the scan at the student's count", "DPO refined − the bare scan"]
    pairs = report_pairs(keys, steps=2, teacher_steps=50, teacher_t0=200, student_t0=100)
    table = paired_tables(per_scan, pairs)
    for pair in expected:
        assert f"| {pair} | " in table, pair
    assert table.count(" − ") == 4 * len(expected)
    write_outputs(tmp_path, {name: summarise(rows) for name, rows in per_scan.items()}, per_scan, keys)
    assert read_keys(tmp_path, list(keys)) == keys
    # The teacher from the student's start is paired only when it is not the teacher's own start.
    assert "big teacher, 2 from 100" not in paired_tables(per_scan, report_pairs(
        keys, steps=2, teacher_steps=50, teacher_t0=100, student_t0=100))


def test_paired_differences_cancel_scene_difficulty():
    from lidar_completion_training.report import paired_differences

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


# --- Long runs: per-scan log, resume after a kill, parallel workers --------------------------

SCANS = 5  # of sequence 01 (6 scans)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0, cut=ScanCut.recorded_before(64, None))
    return save_model(CompletionModel(config), tmp_path_factory.mktemp("model") / "model")


def _run_args(tiny_dataset, model_dir, out, *extra) -> list[str]:
    return ["--root", str(tiny_dataset), "--sequences", "01", "--checkpoint", str(model_dir), "--max-scans", str(SCANS),
            "--no-emd", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def straight_run(tiny_dataset, small_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert main(_run_args(tiny_dataset, small_model, out)) == 0
    return out


def _numbers(out):
    """Every number of the tables but the measured times, and the paired differences."""
    loaded = json.loads((out / "summary.json").read_text())
    per_scan = {name: [{k: v for k, v in row.items() if k != "time_s"} for row in rows] for name, rows in loaded["per_scan"].items()}
    summary = {name: {k: v for k, v in row.items() if not k.startswith("time_s")} for name, row in loaded["summary"].items()}
    table = [line.rsplit("|", 2)[0] for line in (out / "table.md").read_text().splitlines()]  # without the time column
    return per_scan, summary, table, (out / "paired.md").read_text()


def _logged(out) -> list[dict]:
    """The whole lines of the per-scan log (not a last one cut short)."""
    return [json.loads(line) for line in (out / "per_scan.jsonl").read_text().split("\n")[:-1]]


def test_every_scan_is_logged_as_it_comes(straight_run):
    entries = _logged(straight_run)
    assert entries[0]["lidar-evaluate per-scan log"] == 1 and entries[0]["settings"]["steps"] is None
    assert entries[-1] == {"finished": True}
    rows = entries[1:-1]
    assert len(rows) == 4 * SCANS  # input, input at the output's size, output, completion alone
    assert {row["index"] for row in rows} == set(range(SCANS))
    per_scan = json.loads((straight_run / "summary.json").read_text())["per_scan"]
    assert [r["row"] for r in rows if r["setting"] == "model (scan + completion)"] == per_scan["model (scan + completion)"]


def test_killed_run_resumes_where_it_stopped_with_the_same_tables(tiny_dataset, small_model, straight_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the threads of this process (tests/conftest.py): same sums
    proc = subprocess.Popen([sys.executable, "-m", "lidar_completion_training.evaluate", *_run_args(tiny_dataset, small_model, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log, deadline = out / "per_scan.jsonl", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and log.read_text().count("\n") >= 3:  # the settings and two scans
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entries = _logged(out)
    assert {"finished": True} not in entries, "the run finished before it could be killed"
    before = len(entries) - 1
    with open(log, "a") as handle:  # as a kill during a write leaves it
        handle.write('{"setting": "model (scan + completion)", "index": 4, "row": {"cd": 0.')

    # Without --resume the unfinished log is kept and the command says what to do; other settings are refused.
    assert main(_run_args(tiny_dataset, small_model, out)) == 2
    assert main(_run_args(tiny_dataset, small_model, out, "--resume", "--steps", "2")) == 2
    assert main(_run_args(tiny_dataset, small_model, out, "--resume", "--max-range", "7")) == 2
    assert len(_logged(out)) - 1 == before  # each refusal left the log as it was

    scored: list[int] = []
    from lidar_completion_training import evaluate

    original = evaluate.ScanScorer.score
    def counting(self, setting, scoring, index, keep=False):
        scored.append(index)
        return original(self, setting, scoring, index, keep)
    import unittest.mock

    with unittest.mock.patch.object(evaluate.ScanScorer, "score", counting):
        assert main(_run_args(tiny_dataset, small_model, out, "--resume")) == 0
    assert len(scored) == 4 * SCANS - before  # only what was missing
    assert _numbers(out) == _numbers(straight_run)
    assert _logged(out)[-1] == {"finished": True} and len(_logged(out)) == 4 * SCANS + 2


def test_refusals_name_the_reason(tiny_dataset, small_model, straight_run, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(_run_args(tiny_dataset, small_model, out, "--resume")) == 2
    assert "--resume: no per-scan log at" in capsys.readouterr().err
    # A finished run is no reason to refuse: a new one starts over; resuming it rewrites the tables.
    assert main(_run_args(tiny_dataset, small_model, straight_run, "--resume")) == 0
    (out / "per_scan.jsonl").parent.mkdir(parents=True)
    (out / "per_scan.jsonl").write_text(
        (straight_run / "per_scan.jsonl").read_text().split('{"finished": true}')[0])  # unfinished
    assert main(_run_args(tiny_dataset, small_model, out)) == 2
    assert "holds an unfinished evaluation" in capsys.readouterr().err
    assert main(_run_args(tiny_dataset, small_model, out, "--resume", "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed: 0 then, 1 now" in err


def test_ctrl_c_keeps_the_scored_scans_and_exits_130(tiny_dataset, small_model, tmp_path, capsys, monkeypatch):
    from lidar_completion_training import evaluate

    original, calls = evaluate.ScanScorer.score, []
    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)
    monkeypatch.setattr(evaluate.ScanScorer, "score", interrupted)
    out = tmp_path / "stopped"
    assert main(_run_args(tiny_dataset, small_model, out)) == 130
    assert "interrupted: the 2 scans scored so far are in" in capsys.readouterr().err
    assert len(_logged(out)) == 3


def test_workers_give_the_rows_of_one_process(tiny_dataset, small_model, straight_run, tmp_path):
    out = tmp_path / "workers"
    assert main(_run_args(tiny_dataset, small_model, out, "--workers", "2")) == 0
    assert _numbers(out) == _numbers(straight_run)
    with pytest.raises(SystemExit):
        main(_run_args(tiny_dataset, small_model, out, "--workers", "0"))


def test_workers_and_resume_score_completed_files_too(tiny_dataset, tmp_path):
    from lidar_completion_training.dataset import CompletionDataset, PairConfig

    dataset = CompletionDataset(tiny_dataset, ["01"], PairConfig())
    completed = tmp_path / "completed" / "01"
    for i in range(3):
        write_points(completed / f"{i:06d}.npy", dataset.pair(i)[0])
    runs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"eval{workers}"
        assert main(["--root", str(tiny_dataset), "--sequences", "01", "--completed", str(tmp_path / "completed"),
                     "--max-scans", "4", "--no-emd", "--workers", workers, "--out", str(out)]) == 0
        runs[workers] = json.loads((out / "summary.json").read_text())
    assert runs["1"] == runs["2"] and len(next(iter(runs["1"]["per_scan"].values()))) == 3  # the fourth is missing


def test_report_resumes_with_workers_to_the_same_tables(tiny_dataset, tmp_path, monkeypatch):
    """The report (the model-card table) is a long run too: stopped in its third row, resumed
    on two processes, it gives the numbers of one uninterrupted process."""
    from lidar_completion_training import evaluate

    torch.manual_seed(0)
    common = dict(channel_ratio=0.25, cut=ScanCut.recorded_before(32, 20.0), sampler="ve", t0=200, prediction="displacement")
    teacher = save_model(CompletionModel(ModelConfig(**common, default_steps=4, default_guidance=1.0)), tmp_path / "teacher")
    student = save_model(CompletionModel(ModelConfig(**common, kind="student", default_steps=1, default_guidance=1.0)),
                         tmp_path / "student")
    def args(out, *extra):
        return ["report", "--root", str(tiny_dataset), "--sequences", "01", "--max-scans", "3", "--teacher", str(teacher),
                "--student", str(student), "--teacher-steps", "2", "--curve-steps", "1", "--out", str(out), *extra]
    assert main(args(tmp_path / "straight")) == 0
    original, calls = evaluate.ScanScorer.score, []
    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 8:  # the third row's second scan
            raise KeyboardInterrupt
        return original(self, *a, **k)
    monkeypatch.setattr(evaluate.ScanScorer, "score", interrupted)
    assert main(args(tmp_path / "resumed")) == 130
    monkeypatch.setattr(evaluate.ScanScorer, "score", original)
    assert main(args(tmp_path / "resumed", "--resume", "--workers", "2")) == 0
    assert _numbers(tmp_path / "resumed") == _numbers(tmp_path / "straight")
