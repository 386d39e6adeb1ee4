"""``lidar-complete`` end to end on generated files and on the real SemanticKITTI scan.

The CLI runs in-process (``main(argv)``) with a tiny random model saved to a temporary
checkpoint; only ``--version`` runs in a subprocess, to check it stays cheap.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lidar_completion import cli
from lidar_completion.checkpoints import save_model
from lidar_completion.config import ScanCut
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.io import read_points, write_points

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """See tests/test_completer.py: one thread is steadier for tiny models on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25, refine_channel_ratio=0.25))
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(CompletionModel(ModelConfig(channel_ratio=0.25)), tmp_path_factory.mktemp("models") / "plain")


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    # compose_support 0: the random model's few completed points are sparse, not stray
    path.write_text("completion:\n  data:\n    n_part: 128\n    compose_support: 0\n"
                    "  sampling:\n    steps: 1\n    guidance: 0\n")
    return path


def ring_scan(n: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, phi = rng.uniform(5, 40, n), rng.uniform(-np.pi, np.pi, n)
    return np.stack([r * np.cos(phi), r * np.sin(phi), rng.uniform(-2, 1, n)], axis=1).astype(np.float32)


@pytest.fixture
def scan_dir(tmp_path) -> Path:
    """Four good scans (one per input format) and four bad ones."""
    folder = tmp_path / "scans"
    for i, suffix in enumerate(("bin", "ply", "pcd", "npy")):
        write_points(folder / f"good_{suffix}.{suffix}", ring_scan(seed=i))
    (folder / "bad_size.bin").write_bytes(np.arange(10, dtype=np.float32).tobytes())  # 40 bytes
    np.save(folder / "bad_nan.npy", np.full((50, 3), np.nan, np.float32))
    np.save(folder / "bad_far.npy", np.full((50, 3), 300.0, np.float32))
    (folder / "bad_text.ply").write_text("this is not a ply file\n")
    (folder / "notes.txt").write_text("ignored: not a point-cloud suffix\n")
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300


def test_version_is_cheap():
    code = "import sys; from lidar_completion import cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    done = subprocess.run([sys.executable, "-m", "lidar_completion.cli", "--version"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"lidar-complete {cli.__version__}"


def test_directory_run_skips_bad_files_and_completes_the_rest(capsys, tmp_path, scan_dir, checkpoint, small_config):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, scan_dir, "--out", out_dir, "--checkpoint", checkpoint,
                             "--config", small_config, "--render", tmp_path / "pictures")
    assert code == 1
    for name in ("bad_size.bin", "bad_nan.npy", "bad_far.npy", "bad_text.ply"):
        lines = [line for line in err.splitlines() if "skipped:" in line and name in line]
        assert len(lines) == 1, err
    assert "not a multiple of 16" in err and "no finite point" in err
    assert "notes.txt" not in out + err
    written = sorted(p.name for p in out_dir.glob("*.ply"))
    assert written == ["good_bin.ply", "good_npy.ply", "good_pcd.ply", "good_ply.ply"]
    for path in out_dir.glob("*.ply"):
        points = read_points(path)
        assert points.shape[1] == 3 and len(points) > 128 and np.isfinite(points).all()
    assert "completed 4 of 8 scan(s)" in out
    assert "median per scan (ms): preprocess" in out and "| total" in out
    used = yaml.safe_load((out_dir / cli.CONFIG_NAME).read_text())
    assert used["completion"]["data"]["n_part"] == 128 and used["completion"]["sampling"]["steps"] == 1
    pictures = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert pictures == ["good_bin.png", "good_npy.png", "good_pcd.png", "good_ply.png"]
    assert_png(tmp_path / "pictures" / "good_bin.png")


def test_single_file_to_npy_with_flags(capsys, tmp_path, checkpoint, small_config):
    source = write_points(tmp_path / "scan.pcd", ring_scan(1500))
    target = tmp_path / "dense.npy"
    code, out, err = run_cli(capsys, source, "--out", target, "--checkpoint", checkpoint, "--config", small_config,
                             "--steps", "2", "--guidance", "3", "--no-refine", "--seed", "7", "--device", "cpu",
                             "--render", tmp_path / "scan.png")
    assert code == 0, err
    points = np.load(target)  # x, y, z, intensity, measured: the scan, then what completion adds
    assert points.dtype == np.float32 and points.shape[1] == 5
    measured = points[:, 4] == 1
    np.testing.assert_allclose(points[measured, :3], ring_scan(1500), atol=1e-5)
    assert 0 < np.count_nonzero(~measured) <= 1280 and not points[~measured, 3].any()
    assert "steps=2 guidance=3 refine=off n_part=128 device=cpu" in out
    assert_png(tmp_path / "scan.png")
    assert not (tmp_path / cli.CONFIG_NAME).exists()  # a file output gets no config beside it


def test_directory_render_png_is_the_first_completed_scan(capsys, tmp_path, checkpoint, small_config):
    folder = tmp_path / "scans"
    folder.mkdir()
    np.save(folder / "a_bad.npy", np.full((4, 3), np.nan, np.float32))
    write_points(folder / "b.bin", ring_scan(seed=1))
    write_points(folder / "c.bin", ring_scan(seed=2))
    code, out, err = run_cli(capsys, folder, "--out", tmp_path / "out", "--format", "npy", "--checkpoint",
                             checkpoint, "--config", small_config, "--render", tmp_path / "first.png")
    assert code == 1 and "a_bad.npy" in err
    assert "picture" in next(line for line in out.splitlines() if line.startswith(str(folder / "b.bin")))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npy")) == ["b.npy", "c.npy"]
    assert_png(tmp_path / "first.png")


def test_same_stem_in_two_formats_gets_two_outputs(capsys, tmp_path, checkpoint, small_config):
    folder = tmp_path / "scans"
    write_points(folder / "scan.bin", ring_scan(seed=1))
    write_points(folder / "scan.npy", ring_scan(seed=2))
    code, _, err = run_cli(capsys, folder, "--out", tmp_path / "out", "--checkpoint", checkpoint, "--config", small_config)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.ply")) == ["scan_bin.ply", "scan_npy.ply"]


def test_nothing_completed_exits_2(capsys, tmp_path, checkpoint, small_config):
    folder = tmp_path / "scans"
    folder.mkdir()
    np.save(folder / "nan.npy", np.full((4, 3), np.nan, np.float32))
    (folder / "short.bin").write_bytes(b"\0" * 20)
    code, out, err = run_cli(capsys, folder, "--out", tmp_path / "out", "--checkpoint", checkpoint,
                             "--config", small_config)
    assert code == 2 and "completed 0 of 2" in out and err.count("skipped:") == 2

    code, _, err = run_cli(capsys, folder / "nan.npy", "--checkpoint", checkpoint, "--config", small_config,
                           "--out", tmp_path / "one.ply")
    assert code == 2 and err.splitlines() == [f"lidar-complete: error: {folder / 'nan.npy'}: contains no finite point"]


def test_checkpoint_errors_exit_2(capsys, tmp_path, monkeypatch, small_config):
    source = write_points(tmp_path / "scan.npy", ring_scan())
    monkeypatch.setattr(cli, "default_checkpoint", lambda: tmp_path / "models" / "student_lite")
    code, _, err = run_cli(capsys, source, "--config", small_config)
    assert code == 2 and "pass --checkpoint" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, source, "--checkpoint", tmp_path / "missing", "--config", small_config)
    assert code == 2 and "checkpoint not found" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"garbage")
    (broken / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, source, "--checkpoint", broken, "--config", small_config)
    assert code == 2 and "cannot read weights" in err and len(err.splitlines()) == 1


def test_checkpoint_without_refiner(capsys, tmp_path, plain_checkpoint, small_config):
    source = write_points(tmp_path / "scan.npy", ring_scan())
    code, out, err = run_cli(capsys, source, "--checkpoint", plain_checkpoint, "--config", small_config,
                             "--out", tmp_path / "a.ply")
    assert code == 0 and "refine=off" in out  # refinement is off by default
    code, _, err = run_cli(capsys, source, "--checkpoint", plain_checkpoint, "--config", small_config,
                           "--out", tmp_path / "b.ply", "--refine")
    assert code == 2 and "has no refinement net" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "x.npy", "--format", "ply"], "does not match --format"),
        (["--steps", "0"], "sampling.steps"),
        (["--guidance", "99"], "sampling.guidance"),
        (["--config", "missing.yaml"], "no such file"),
    ],
)
def test_usage_errors_exit_2(capsys, tmp_path, monkeypatch, checkpoint, small_config, extra, message):
    monkeypatch.chdir(tmp_path)
    source = write_points(tmp_path / "scan.npy", ring_scan())
    argv = [source, "--checkpoint", checkpoint, "--config", small_config, *extra]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.startswith("lidar-complete: error:")


def test_directory_input_needs_directory_output(capsys, tmp_path, scan_dir, checkpoint):
    code, _, err = run_cli(capsys, scan_dir, "--out", tmp_path / "x.ply", "--checkpoint", checkpoint)
    assert code == 2 and "must be a directory" in err
    code, _, err = run_cli(capsys, tmp_path / "nothing_here", "--checkpoint", checkpoint)
    assert code == 2 and "no such file or directory" in err


def test_real_scan_lite_preset_with_render(capsys, tmp_path, real_scan_path, checkpoint):
    target, picture = tmp_path / "real.ply", tmp_path / "real.png"
    code, out, err = run_cli(capsys, real_scan_path, "--checkpoint", checkpoint, "--preset", "lite", "--steps", "1",
                             "--guidance", "0", "--device", "cpu", "--out", target, "--render", picture)
    assert code == 0, err
    assert "125,773 ->" in out and "n_part=2000" in out
    points, scan = read_points(target), read_points(real_scan_path)
    np.testing.assert_array_equal(points[: len(scan)], scan)  # every measured point, whole range
    added = points[len(scan):]
    assert len(added) <= 20_000 and np.isfinite(added).all()
    assert (np.linalg.norm(added, axis=1) < 50).all()  # completion only inside the radius
    assert_png(picture)


def test_shipped_model_by_name_and_as_default(capsys, tmp_path, monkeypatch, checkpoint, small_config):
    shipped = tmp_path / "models"
    for name in ("student_lite", "teacher_lite"):
        (shipped / name).mkdir(parents=True)
        for item in checkpoint.iterdir():
            (shipped / name / item.name).write_bytes(item.read_bytes())
    monkeypatch.setattr("lidar_completion.checkpoints.SHIPPED_MODELS", shipped)
    monkeypatch.chdir(tmp_path)
    source = write_points(tmp_path / "scan.npy", ring_scan())
    for extra in ([], ["--checkpoint", "teacher_lite"]):
        code, _, err = run_cli(capsys, source, "--config", small_config, "--out", tmp_path / "out.ply", *extra)
        assert code == 0, err
    code, _, err = run_cli(capsys, source, "--config", small_config, "--checkpoint", "student_full")
    assert code == 2 and "checkpoint not found: student_full" in err
    code, _, err = run_cli(capsys, source, "--config", small_config)  # default --out: ./completed/
    assert code == 0 and (tmp_path / "completed" / "scan.ply").is_file()
    used = yaml.safe_load((tmp_path / "completed" / cli.CONFIG_NAME).read_text())
    assert used["checkpoint"] == str(shipped / "student_lite")


def test_empty_completion_is_reported_outside_the_domain(capsys, tmp_path, monkeypatch, checkpoint, small_config):
    """Nothing completed: the scan is still written (it passes through), with a warning, and
    it is not counted as completed (exit 2: none completed)."""
    from lidar_completion.completer import SceneCompleter

    monkeypatch.setattr(SceneCompleter, "postprocess", lambda self, completed, partial: completed[:0])
    source = write_points(tmp_path / "scan.npy", ring_scan())
    code, out, err = run_cli(capsys, source, "--checkpoint", checkpoint, "--config", small_config,
                             "--out", tmp_path / "scan.ply")
    assert code == 2 and "outside the model's domain (no completed point was added)" in err, err
    assert "completed 0 of 1 scan(s)" in out and "1 outside the model's domain" in out
    np.testing.assert_array_equal(read_points(tmp_path / "scan.ply"), ring_scan())


def test_render_handles_empty_and_non_finite_clouds(tmp_path):
    from lidar_completion.render import render_comparison

    dirty = ring_scan(500)
    dirty[::10] = np.nan
    path = render_comparison([("scan", dirty), ("empty", np.zeros((0, 3), np.float32))], tmp_path / "x.png")
    assert_png(path)


# ----------------------------------------------------------------------------- issue 15
def test_unwritable_outputs_fail_before_any_work(capsys, tmp_path, scan_dir, small_config):
    """Output and picture locations are checked first: one line, exit 2, nothing loaded or
    written (the checkpoint given does not even exist, and that is not what is reported)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    single = write_points(tmp_path / "scan.npy", ring_scan())
    missing = tmp_path / "no_model"
    cases = [
        ([scan_dir, "--out", blocker / "out"], f"--out {blocker / 'out'}: cannot write to"),
        ([single, "--out", blocker / "x.ply"], f"--out {blocker / 'x.ply'}: cannot write to"),
        ([single, "--out", tmp_path / "ok.ply", "--render", blocker / "pic.png"], "--render"),
        ([scan_dir, "--out", tmp_path / "ok_dir", "--render", blocker / "pictures"], "--render"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv, "--checkpoint", missing, "--config", small_config)
        assert code == 2, (argv, err)
        assert err.splitlines() == [err.strip()] and message in err and "Traceback" not in err, err
        assert "checkpoint" not in err
    assert not (tmp_path / "ok.ply").exists() and not (tmp_path / "ok_dir" / "good_bin.ply").exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only directories; the blocked-path cases above cover it")
def test_read_only_output_directory(capsys, tmp_path, scan_dir, checkpoint, small_config):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, scan_dir, "--out", locked, "--checkpoint", checkpoint, "--config", small_config)
        assert code == 2 and f"--out {locked}: cannot write to {locked}" in err and len(err.splitlines()) == 1
        code, _, err = run_cli(capsys, scan_dir / "good_bin.bin", "--out", tmp_path / "x.ply", "--render",
                               locked / "x.png", "--checkpoint", checkpoint, "--config", small_config)
        assert code == 2 and "--render" in err and not (tmp_path / "x.ply").exists()
    finally:
        locked.chmod(0o755)


@pytest.fixture(scope="module")
def radius_20_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25, cut=ScanCut.recorded_before(None, 20.0)))
    return save_model(model, tmp_path_factory.mktemp("models") / "radius20")


def test_range_band_is_checked_against_the_models_radius(capsys, tmp_path, radius_20_checkpoint, small_config):
    source = write_points(tmp_path / "scan.npy", ring_scan())
    code, out, err = run_cli(capsys, source, "--checkpoint", radius_20_checkpoint, "--config", small_config,
                             "--out", tmp_path / "a.ply")
    assert code == 0, err
    assert "range=3.5-20 m" in out  # the effective range, not data.max_range (50)
    config = tmp_path / "far.yaml"
    config.write_text("data:\n  min_range: 30.0\n  n_part: 128\nsampling:\n  steps: 1\n  guidance: 0\n")
    code, _, err = run_cli(capsys, source, "--checkpoint", radius_20_checkpoint, "--config", config,
                           "--out", tmp_path / "b.ply")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "data.min_range: 30 m leaves no range band: the model completes up to 20 m" in err
    assert not (tmp_path / "b.ply").exists()


def test_separate_refinement_checkpoint(capsys, tmp_path, checkpoint, plain_checkpoint, small_config):
    from lidar_completion.checkpoints import load_model

    source = write_points(tmp_path / "scan.npy", ring_scan())
    refiner = load_model(checkpoint).refiner
    published = tmp_path / "refine_net.ckpt"  # the published file's layout
    torch.save({"state_dict": {f"model_refine.{k}": v for k, v in refiner.state_dict().items()}}, published)
    code, out, err = run_cli(capsys, source, "--checkpoint", plain_checkpoint, "--config", small_config,
                             "--out", tmp_path / "plain.npy")
    assert code == 0 and "refine=off" in out, err
    for given in (published, checkpoint):  # published, or one of our models with a refiner
        code, out, err = run_cli(capsys, source, "--checkpoint", plain_checkpoint, "--config", small_config,
                                 "--refine-checkpoint", given, "--out", tmp_path / "refined.npy")
        assert code == 0 and "refine=on" in out, err
        assert len(np.load(tmp_path / "refined.npy")) > len(np.load(tmp_path / "plain.npy"))
    code, out, err = run_cli(capsys, source, "--checkpoint", plain_checkpoint, "--config", small_config,
                             "--refine-checkpoint", published, "--no-refine", "--out", tmp_path / "off.npy")
    assert code == 0 and "refine=off" in out, err
    for bad, message in ((tmp_path / "nope.ckpt", "refinement checkpoint not found"),
                         (plain_checkpoint, "has no refinement net")):
        code, _, err = run_cli(capsys, source, "--checkpoint", plain_checkpoint, "--config", small_config,
                               "--refine-checkpoint", bad, "--out", tmp_path / "bad.npy")
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
