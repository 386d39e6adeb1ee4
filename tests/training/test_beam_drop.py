"""Beam-drop (``lidar-evaluate beam-drop``): rings from elevation bands or a ring field,
dropping one ring in k, the one-sided scores, and one run of the subcommand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lidar_completion_training.beam_drop import (DROPPED_ROW, OUTPUT_ROW, drop_rings, estimate_rings, fov_mask,
                                                 read_scan, rings_from_field, score)


@pytest.fixture(scope="module")
def lite_scan() -> tuple[np.ndarray, np.ndarray]:
    """One generated scan of the 32-beam ``lite`` sensor (N, 4) and each point's beam, 0 = top."""
    from lidar_completion_training import synthetic

    lidar = synthetic.PRESETS["lite"]
    street = synthetic.make_street(np.random.default_rng(1), 1, lidar)
    points, _ = synthetic.simulate_scan(street, lidar, 0.0, np.random.default_rng(2))
    elevation = np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1]))
    beams = np.sort(lidar.elevations)[::-1]  # top first
    beam = np.argmin(np.abs(elevation[:, None] - beams[None, :]), axis=1)
    return points, beam


def test_rings_of_a_generated_scan_are_its_32_beams(lite_scan):
    points, beam = lite_scan
    assert len(np.unique(beam)) == 32
    rings = estimate_rings(points)
    assert rings.rings == 32
    assert abs(rings.origin_height) < 0.01  # the generator's rays start at the origin
    assert (rings.ring == beam).mean() > 0.999
    assert rings.points_per_ring().sum() == len(points)


def test_rings_when_the_beams_leave_above_the_scan_origin(lite_scan):
    """KITTI's beams leave ~0.2 m above the velodyne frame's origin, which smears the near
    rings by more than their spacing; the estimate finds the height and the beams again."""
    points, beam = lite_scan
    raised = points.copy()
    raised[:, 2] += 0.2  # the scan's origin 0.2 m below the beams' origin
    rings = estimate_rings(raised)
    assert rings.origin_height == pytest.approx(0.2, abs=0.01)
    assert rings.rings == 32
    assert (rings.ring == beam).mean() > 0.999


@pytest.mark.parametrize("k", [2, 4])
def test_dropping_keeps_one_ring_in_k(lite_scan, k):
    points, beam = lite_scan
    kept = drop_rings(estimate_rings(points).ring, k)
    assert kept.mean() == pytest.approx(1 / k, abs=0.05)
    assert (beam[kept] % k == 0).all()
    assert sorted(np.unique(beam[kept])) == list(range(0, 32, k))
    assert drop_rings(np.array([-1, 0, 1, 2]), 2).tolist() == [False, True, False, True]  # unassigned: dropped
    with pytest.raises(ValueError):
        drop_rings(beam, 0)


def test_ring_field_is_read_and_renumbered_from_the_top(lite_scan, tmp_path):
    """A nuScenes .pcd.bin carries a ring per point; its ids are ranked by elevation."""
    points, beam = lite_scan
    scrambled = np.random.default_rng(0).permutation(32)[beam]  # laser ids in no elevation order
    path = tmp_path / "scan.pcd.bin"
    np.column_stack([points[:, :3], np.zeros(len(points)), scrambled]).astype("<f4").tofile(path)
    xyz, field = read_scan(path)
    assert np.array_equal(field, scrambled)
    rings = rings_from_field(xyz, field)
    assert rings.source == "field"
    assert np.array_equal(rings.ring, beam)
    np.save(tmp_path / "scan.npy", points[:, :3])
    assert read_scan(tmp_path / "scan.npy")[1] is None  # no ring field: estimated from elevation


def test_field_of_view_crop():
    points = np.array([[1, 0, 0], [1, 0.9, 0], [1, 1.1, 0], [-1, 0, 0], [1, -0.9, 0]], dtype=np.float32)
    assert fov_mask(points, 90).tolist() == [True, True, False, False, True]
    assert fov_mask(points, 360).all() and fov_mask(points, None).all()


def test_scores_on_trivial_cases(lite_scan):
    full = lite_scan[0][:, :3]
    perfect = score(full, full, 3.5, 10.0)
    assert perfect["completeness"] == 0.0
    assert perfect["fscore"] == perfect["precision"] == perfect["recall"] == 1.0
    assert perfect["outliers"] == 0
    assert perfect["points_in_band"] == perfect["full_points_in_band"] > 0
    # A subset: every point is a scan point (precision 1), part of the scan is missed.
    half = score(full[::2], full, 3.5, 10.0)
    assert half["precision"] == 1.0 and half["recall"] < 1.0 and half["completeness"] > 0
    # A point in the band straight above the sensor (the beams look at most 2 deg up) is an
    # outlier; one beyond the band is not scored.
    extra = score(np.vstack([full, [[0, 0, 6.0], [0, 0, 30.0]]]), full, 3.5, 10.0)
    assert extra["points_in_band"] == perfect["points_in_band"] + 1
    assert extra["outliers"] == 1 and extra["recall"] == 1.0


def test_beam_drop_subcommand_scores_a_generated_scan(lite_scan, tmp_path, capsys):
    from lidar_completion.io import write_points

    from lidar_completion_training.evaluate import main

    scan = write_points(tmp_path / "street.ply", lite_scan[0][:, :3])
    out = tmp_path / "out"
    assert main(["beam-drop", str(scan), "--keep-every", "2", "--fov-deg", "360", "90", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "32 rings from elevation" in printed and "| street.ply | 90° | 2 |" in printed
    assert (out / "beam_drop.md").read_text().startswith("| file | FOV |")
    assert (out / "rings_street.png").is_file()
    report = json.loads((out / "beam_drop.json").read_text())
    assert report["rings"][str(scan)]["rings"] == 32
    assert report["min_range"] == 3.5 and report["max_range"] == 10.0
    rows = {(r["fov_deg"], r["row"]): r for r in report["rows"]}
    for fov in (None, 90.0):
        dropped, output = rows[(fov, DROPPED_ROW)], rows[(fov, OUTPUT_ROW)]
        assert dropped["precision"] == 1.0 and dropped["outliers"] == 0  # the dropped scan is part of the scan
        assert dropped["recall"] < 1.0
        assert output["points"] >= dropped["points"]  # the output keeps the measured scan
        assert 0.0 <= output["fscore"] <= 1.0 and np.isfinite(output["completeness"])
    assert rows[(90.0, DROPPED_ROW)]["full_points_in_band"] < rows[(None, DROPPED_ROW)]["full_points_in_band"]
