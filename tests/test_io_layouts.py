"""Raw ``.bin`` layouts (issue 22): KITTI x, y, z, intensity (4 float32) and nuScenes ``.pcd.bin``
x, y, z, intensity, ring (5 float32) are read as declared — by name, or by ``layout`` /
``--layout`` — and a file whose values do not fit the declared layout is refused in one line.

The files are written from the real SemanticKITTI scan: as a KITTI ``.bin`` (remission in
[0, 1]) and as a nuScenes-like sweep (every other ring of the 64: 32 rings, intensity 0-255
integers, ring 0-31, in firing order), 34,688 points like a nuScenes sweep, whose 693,760 bytes
are a multiple of 16 as well: read as KITTI they would be 43,360 points of garbage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lidar_completion import bags, cli
from lidar_completion.bags import BagError, kitti_sequence_to_bag, read_clouds
from lidar_completion.io import (BIN_LAYOUTS, LAYOUT_NAMES, PointFileError, bin_layout, read_bin, read_points,
                                 write_points)
from lidar_completion.pointcloud2 import read_fields

NUSCENES_POINTS = 34_688


@pytest.fixture(scope="module")
def real(real_scan_path) -> dict[str, np.ndarray]:
    """The real scan as KITTI [N, 4] and as a nuScenes-like sweep [34688, 5] (float32)."""
    xyz = read_points(real_scan_path)
    rng = np.random.default_rng(0)
    smooth = np.convolve(rng.uniform(0, 0.6, len(xyz)), np.ones(15) / 15, mode="same")
    remission = np.clip(np.round(smooth + rng.normal(0, 0.05, len(xyz)), 2), 0, 1)
    kitti = np.column_stack([xyz, remission]).astype("<f4")
    elevation = np.arctan2(xyz[:, 2], np.linalg.norm(xyz[:, :2], axis=1))
    span = elevation.max() - elevation.min()
    ring64 = np.minimum(((elevation - elevation.min()) / span * 64).astype(int), 63)
    keep = ring64 % 2 == 0
    sweep = np.column_stack([xyz[keep], np.round(remission[keep] * 255), ring64[keep] // 2]).astype("<f4")
    azimuth_bin = np.round(np.arctan2(sweep[:, 1], sweep[:, 0]) / np.radians(0.2))
    sweep = sweep[np.lexsort((sweep[:, 4], azimuth_bin))][:NUSCENES_POINTS]  # firing order
    return {"kitti": kitti[: len(kitti) // 20 * 20], "nuscenes": sweep}  # sizes fit both records


def one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


# --- reading as declared -----------------------------------------------------------------------


def test_layouts_and_names():
    assert LAYOUT_NAMES == ("kitti", "nuscenes") == cli.LAYOUTS
    assert bin_layout("a/000123.bin").fields == ("x", "y", "z", "intensity")
    assert bin_layout("a/n015__LIDAR_TOP__1532402927647951.PCD.BIN").fields == ("x", "y", "z", "intensity", "ring")
    assert bin_layout("sweep.pcd.bin", "kitti") is BIN_LAYOUTS["kitti"]  # the declaration wins over the name
    assert bin_layout("000123.bin", "nuscenes").record_bytes == 20
    with pytest.raises(ValueError, match="unknown point layout 'velodyne'"):
        bin_layout("000123.bin", "velodyne")


def test_nuscenes_pcd_bin_is_read_by_name(tmp_path, real):
    sweep = real["nuscenes"]
    path = tmp_path / "n015__LIDAR_TOP__1532402927647951.pcd.bin"
    sweep.tofile(path)
    assert path.stat().st_size % 16 == 0 and path.stat().st_size // 16 == 43_360
    np.testing.assert_array_equal(read_points(path), sweep[:, :3])
    values = read_bin(path)
    assert values.shape == (NUSCENES_POINTS, 5) and values.dtype == np.float32
    np.testing.assert_array_equal(values, sweep)  # intensity and ring kept


def test_kitti_bin_stays_four_floats(tmp_path, real):
    kitti = real["kitti"]
    kitti.tofile(tmp_path / "000123.bin")
    np.testing.assert_array_equal(read_points(tmp_path / "000123.bin"), kitti[:, :3])
    np.testing.assert_array_equal(read_bin(tmp_path / "000123.bin"), kitti)
    np.testing.assert_array_equal(read_points(tmp_path / "000123.bin", layout="kitti"), kitti[:, :3])


def test_nuscenes_bytes_named_bin_are_refused_or_read_as_declared(tmp_path, real):
    path = tmp_path / "sweep.bin"
    real["nuscenes"].tofile(path)
    with pytest.raises(PointFileError) as err:
        read_points(path)
    message = one_line(err, path)
    assert "not a KITTI .bin (x, y, z, intensity float32)" in message
    assert "of intensity values are negative" in message
    assert "line up as 5 floats per point (nuScenes .pcd.bin: --layout nuscenes)" in message
    np.testing.assert_array_equal(read_points(path, layout="nuscenes"), real["nuscenes"][:, :3])


def test_kitti_bytes_declared_nuscenes_are_refused(tmp_path, real):
    path = tmp_path / "000123.pcd.bin"
    real["kitti"].tofile(path)
    with pytest.raises(PointFileError) as err:
        read_points(path)
    message = one_line(err, path)
    assert "not a nuScenes .pcd.bin" in message and "100% of ring values are not integers 0-255" in message
    assert "line up as 4 floats per point (KITTI .bin: --layout kitti)" in message
    np.testing.assert_array_equal(read_points(path, layout="kitti"), real["kitti"][:, :3])


def test_stride_alone_refuses_a_sweep_whose_columns_all_look_plausible(tmp_path, real):
    """A nuScenes sweep in a frame where every coordinate is positive: read as KITTI, every
    'intensity' is >= 0 and every coordinate < 1 km, but the floats line up at 5, not 4."""
    sweep = real["nuscenes"].copy()
    sweep[:, :3] += (200.0, 200.0, 50.0)
    path = tmp_path / "shifted.bin"
    sweep.tofile(path)
    with pytest.raises(PointFileError) as err:
        read_points(path)
    assert one_line(err, path).endswith(
        "not a KITTI .bin (x, y, z, intensity float32); its values line up as 5 floats per point "
        "(nuScenes .pcd.bin: --layout nuscenes)")
    assert read_points(path, layout="nuscenes").shape == (NUSCENES_POINTS, 3)


# --- legitimate scans are kept -------------------------------------------------------------------


def _legitimate(real: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    kitti = real["kitti"]
    shuffled = kitti[rng.permutation(len(kitti))][:2000].copy()  # e.g. farthest-point sampled
    shuffled[:, 3] = 0  # write_points' remission
    other = kitti.copy()
    other[:, 3] = np.round(other[:, 3] * 255)  # another sensor's intensity 0-255
    holes = kitti.copy()
    holes[::3, :3] = np.nan  # organised cloud with no-return points
    uniform = rng.uniform(-30, 30, (60, 4)).astype(np.float32)  # the bag tests' scans
    uniform[:, 3] = rng.uniform(0, 1, 60)
    tiny = kitti[:7]
    return {"shuffled": shuffled, "intensity_255": other, "third_nan": holes, "uniform": uniform, "seven": tiny}


@pytest.mark.parametrize("case", ["shuffled", "intensity_255", "third_nan", "uniform", "seven"])
def test_legitimate_kitti_scans_are_read(tmp_path, real, case):
    values = _legitimate(real)[case].astype("<f4")
    values.tofile(tmp_path / "scan.bin")
    np.testing.assert_array_equal(read_bin(tmp_path / "scan.bin"), values)


def test_write_points_bin_reads_back_and_refuses_pcd_bin(tmp_path, real):
    xyz = real["kitti"][:, :3]
    np.testing.assert_array_equal(read_points(write_points(tmp_path / "a.bin", xyz)), xyz)
    with pytest.raises(PointFileError, match=r"cannot write a nuScenes \.pcd\.bin"):
        write_points(tmp_path / "a.pcd.bin", xyz)
    assert not (tmp_path / "a.pcd.bin").exists()


# --- implausible values are refused --------------------------------------------------------------


def _implausible(real: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray | bytes, str | None, str]]:
    """name -> (file name, content, layout, expected part of the message)."""
    kitti, sweep = real["kitti"][:4000], real["nuscenes"][:4000]
    far = kitti.copy()
    far[:3000, 0] += 5000.0
    nan = kitti.copy()
    nan[:3000, 1] = np.inf
    negative = kitti.copy()
    negative[::50, 3] = -0.5  # 2 %
    ring_frac, ring_big, ring_neg = sweep.copy(), sweep.copy(), sweep.copy()
    ring_frac[5, 4] = 3.5
    ring_big[:, 4] += 300
    ring_neg[7, 4] = -1
    labels = np.arange(len(kitti) * 4, dtype="<u4")  # a SemanticKITTI .label renamed .bin
    as_float64 = kitti.astype("<f8")
    return {
        "size": ("sweep.pcd.bin", sweep.tobytes()[:-4], None, "is not a multiple of 20 (x, y, z, intensity, ring"),
        "beyond_1km": ("far.bin", far, None, "75% of points have a non-finite, denormal or beyond-1000 m coordinate"),
        "non_finite": ("inf.bin", nan, None, "75% of points have a non-finite"),
        "integers": ("labels.bin", labels, None, "100% of points have a non-finite, denormal"),
        "float64": ("f64.bin", as_float64, None, "of intensity values are negative"),
        "negative_intensity": ("neg.bin", negative, None, "2% of intensity values are negative"),
        "fractional_ring": ("a.pcd.bin", ring_frac, None, "1 of 4,000 ring values are not integers 0-255"),
        "ring_above_255": ("b.bin", ring_big, "nuscenes", "100% of ring values are not integers 0-255"),
        "negative_ring": ("c.pcd.bin", ring_neg, None, "1 of 4,000 ring values"),
    }


@pytest.mark.parametrize("case", ["size", "beyond_1km", "non_finite", "integers", "float64", "negative_intensity",
                                  "fractional_ring", "ring_above_255", "negative_ring"])
def test_implausible_files_are_refused_in_one_line(tmp_path, real, case):
    name, content, layout, expected = _implausible(real)[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.tobytes())
    with pytest.raises(PointFileError) as err:
        read_points(path, layout=layout)
    assert expected in one_line(err, path)


def test_a_few_bad_intensities_are_tolerated(tmp_path, real):
    kitti = real["kitti"].copy()
    kitti[::200, 3] = -1.0  # 0.5 % (<= 1 %)
    kitti.tofile(tmp_path / "scan.bin")
    assert read_points(tmp_path / "scan.bin").shape == (len(kitti), 3)


# --- lidar-complete --layout ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    from lidar_completion.checkpoints import save_model
    from lidar_completion.model import CompletionModel, ModelConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    checkpoint = save_model(CompletionModel(ModelConfig(channel_ratio=0.25)), folder / "tiny")
    config = folder / "small.yaml"
    # compose_support 0: the random model's few completed points are sparse, not stray
    config.write_text("completion:\n  data:\n    n_part: 128\n    compose_support: 0\n"
                      "  sampling:\n    steps: 1\n    guidance: 0\n")
    return checkpoint, config


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    try:
        code = cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_refuses_a_misdeclared_file_in_one_line_and_reads_it_with_layout(capsys, tmp_path, real, tiny_model):
    checkpoint, config = tiny_model
    path = tmp_path / "sweep.bin"
    real["nuscenes"].tofile(path)
    common = ("--checkpoint", checkpoint, "--config", config, "--threads", "1", "--no-refine")
    code, out, err = run_cli(capsys, path, "--out", tmp_path / "a.ply", *common)
    assert code == 2 and not (tmp_path / "a.ply").exists()
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("lidar-complete: error: ")]
    assert len(err.splitlines()) == 1, err
    assert f"lidar-complete: error: {path}: not a KITTI .bin" in err and "--layout nuscenes" in err

    code, out, err = run_cli(capsys, path, "--layout", "nuscenes", "--out", tmp_path / "b.ply", *common)
    assert code == 0, err
    assert f"{path} -> {tmp_path / 'b.ply'}: {NUSCENES_POINTS:,} -> " in out
    assert len(read_points(tmp_path / "b.ply")) > 0


def test_cli_reads_pcd_bin_by_name_and_skips_bad_files_in_a_directory(capsys, tmp_path, real, tiny_model):
    checkpoint, config = tiny_model
    folder = tmp_path / "scans"
    folder.mkdir()
    real["nuscenes"].tofile(folder / "a.pcd.bin")
    real["kitti"].tofile(folder / "b.pcd.bin")  # KITTI bytes under a nuScenes name
    code, out, err = run_cli(capsys, folder, "--out", tmp_path / "out", "--checkpoint", checkpoint,
                             "--config", config, "--threads", "1", "--no-refine")
    assert code == 1
    skipped = [line for line in err.splitlines() if line.startswith("lidar-complete: skipped: ")]
    assert len(skipped) == 1 and f"{folder / 'b.pcd.bin'}: not a nuScenes .pcd.bin" in skipped[0]
    assert "--layout kitti" in skipped[0]
    assert "completed 1 of 2 scan(s)" in out and (tmp_path / "out" / "a.pcd.ply").is_file()


def test_cli_layout_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["scan.bin", "--layout", "velodyne"])
    assert exit_.value.code == 2 and "invalid choice: 'velodyne'" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["scan.bin", "--layout", "nuscenes"]).layout == "nuscenes"
    assert cli.build_parser().parse_args(["scan.bin"]).layout is None


# --- lidar-kitti-to-bag --layout -----------------------------------------------------------------


def make_sequence(root: Path, scans: list[np.ndarray], suffix: str = ".bin") -> Path:
    velodyne = root / "velodyne"
    velodyne.mkdir(parents=True)
    for i, scan in enumerate(scans):
        scan.astype("<f4").tofile(velodyne / f"{i:06d}{suffix}")
    return root


def test_bag_tool_refuses_nuscenes_scans_named_bin_in_one_line(capsys, tmp_path, real):
    sweep = real["nuscenes"][:8000]
    seq = make_sequence(tmp_path / "seq", [sweep, sweep])
    assert bags.main(["--sequence", str(seq), "--out", str(tmp_path / "bag")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lidar-kitti-to-bag: error: {seq / 'velodyne' / '000000.bin'}: not a KITTI .bin")
    assert "--layout nuscenes" in err
    assert not (tmp_path / "bag").exists()

    assert bags.main(["--sequence", str(seq), "--out", str(tmp_path / "bag"), "--layout", "nuscenes"]) == 0
    assert "wrote 2 scans" in capsys.readouterr().out
    clouds = list(read_clouds(tmp_path / "bag"))
    assert len(clouds) == 2
    np.testing.assert_array_equal(clouds[0].xyz, sweep[:, :3])


def test_bag_tool_reads_pcd_bin_by_name_and_keeps_the_ring(tmp_path, real):
    from lidar_completion.bags import iter_cloud_messages

    sweep = real["nuscenes"][:6000]
    seq = make_sequence(tmp_path / "seq", [sweep, sweep[:5000]], suffix=".pcd.bin")
    assert kitti_sequence_to_bag(seq, tmp_path / "bag", storage="sqlite3") == 2
    (_, msg), _ = list(iter_cloud_messages(tmp_path / "bag"))
    assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity", "ring"]
    got = read_fields(msg, ["x", "y", "z", "intensity", "ring"])
    assert got["ring"].dtype == np.uint16
    np.testing.assert_array_equal(got["ring"], sweep[:, 4].astype(np.uint16))
    np.testing.assert_array_equal(got["intensity"], sweep[:, 3])
    np.testing.assert_array_equal(np.stack([got[k] for k in "xyz"], 1), sweep[:, :3])


def test_bag_tool_layout_errors(capsys, tmp_path, real):
    kitti, sweep = real["kitti"][:4000], real["nuscenes"][:4000]
    # a bad scan after a good first one: found while writing, the partial bag is removed
    seq = make_sequence(tmp_path / "late", [kitti, kitti, sweep])
    with pytest.raises(BagError, match=r"000002\.bin: not a KITTI \.bin .*\(no bag written\)$"):
        kitti_sequence_to_bag(seq, tmp_path / "bag1")
    assert not (tmp_path / "bag1").exists()
    # KITTI scans declared nuScenes: record size first (4000 x 16 bytes is a multiple of 20 too)
    seq = make_sequence(tmp_path / "declared", [kitti[:3999], kitti])
    with pytest.raises(BagError, match=r"not N x \(x, y, z, intensity, ring\) float32: \['000000\.bin'\]"):
        kitti_sequence_to_bag(seq, tmp_path / "bag2", layout="nuscenes")
    assert bags.main(["--sequence", str(seq), "--out", str(tmp_path / "bag2"), "--layout", "nuscenes"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    # both kinds of names in one sequence
    seq = make_sequence(tmp_path / "mixed", [kitti])
    sweep.tofile(seq / "velodyne" / "000001.pcd.bin")
    with pytest.raises(BagError, match=r"both NNNNNN\.bin \(KITTI\) and NNNNNN\.pcd\.bin"):
        kitti_sequence_to_bag(seq, tmp_path / "bag3")
    assert not (tmp_path / "bag3").exists()
