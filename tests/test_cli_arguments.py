"""``lidar-complete`` small input checks (issue 28, item 7): ``--threads`` below 1, dangling
symbolic links in an input directory, and the shipped-model list of "checkpoint not found"."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import checkpoint, one_thread, run_cli, small_config  # noqa: F401  (shared fixtures)
from test_cli import ring_scan as scan

from lidar_completion.io import write_points


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_below_one_is_one_usage_line_and_exit_2(capsys, tmp_path, checkpoint, small_config, threads):
    source = write_points(tmp_path / "scan.npy", scan())
    code, out, err = run_cli(capsys, source, "--checkpoint", checkpoint, "--config", small_config,
                             "--out", tmp_path / "out.ply", "--threads", threads)
    assert code == 2 and err == f"lidar-complete: error: --threads {threads}: must be 1 or more\n", err
    assert out == "" and not (tmp_path / "out.ply").exists()


def test_dangling_symlink_in_an_input_directory_is_listed_as_skipped(capsys, tmp_path, checkpoint, small_config):
    folder = tmp_path / "scans"
    write_points(folder / "good.npy", scan())
    (folder / "gone.bin").symlink_to(tmp_path / "deleted.bin")
    (folder / "gone.txt").symlink_to(tmp_path / "deleted.txt")  # not a scan suffix: ignored, as files are
    code, out, err = run_cli(capsys, folder, "--checkpoint", checkpoint, "--config", small_config,
                             "--out", tmp_path / "out")
    assert code == 1, err
    assert "completed 1 of 2 scan(s)" in out
    listed = err[err.index("skipped 1 scan(s):"):].splitlines()[1:]
    assert len(listed) == 1 and str(folder / "gone.bin") in listed[0], err
    assert "gone.txt" not in out + err


@pytest.fixture
def shipped(tmp_path, monkeypatch, checkpoint) -> Path:
    """A models directory as shipped: two models and the model card beside them."""
    models = tmp_path / "models"
    for name in ("student_lite", "teacher_lite"):
        (models / name).mkdir(parents=True)
        for item in checkpoint.iterdir():
            (models / name / item.name).write_bytes(item.read_bytes())
    (models / "MODEL_CARD.md").write_text("# Models\n")
    monkeypatch.setattr("lidar_completion.checkpoints.SHIPPED_MODELS", models)
    return models


def test_checkpoint_not_found_lists_the_shipped_models_only(capsys, tmp_path, shipped, small_config):
    from lidar_completion.checkpoints import find_checkpoint, shipped_models

    assert shipped_models() == ["student_lite", "teacher_lite"]
    assert find_checkpoint("MODEL_CARD.md") is None and find_checkpoint("teacher_lite") == shipped / "teacher_lite"
    source = write_points(tmp_path / "scan.npy", scan())
    for name in ("student_full", "MODEL_CARD.md"):
        code, _, err = run_cli(capsys, source, "--checkpoint", name, "--config", small_config)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"lidar-complete: error: checkpoint not found: {name} ")
        assert err.rstrip().endswith("shipped models: student_lite, teacher_lite)"), err


def test_node_checkpoint_not_found_lists_the_shipped_models_only(shipped):
    startup = pytest.importorskip("lidar_completion_ros.startup")
    with pytest.raises(FileNotFoundError) as info:
        startup.resolve_checkpoint("student_full")
    assert str(info.value).endswith("(shipped models: student_lite, teacher_lite)"), info.value
