"""The shared point utilities: KITTI .bin files, FPS, packed voxel keys, range filters."""

from __future__ import annotations

import numpy as np
import pytest

from lidar_completion.io import PointFileError, read_points, write_points
from lidar_completion.points import (KEY_BITS, farthest_point_sample, in_range, pack_cells, read_kitti_bin, seen_through, voxel_keys,
                                     write_kitti_bin)


def test_kitti_bin_round_trip_with_and_without_remission(tmp_path):
    xyzr = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    xyzr[:, 3] = np.abs(xyzr[:, 3])  # a remission: read_points refuses negative ones (test_io_layouts.py)
    assert np.array_equal(read_kitti_bin(write_kitti_bin(tmp_path / "a.bin", xyzr)), xyzr)
    back = read_kitti_bin(write_kitti_bin(tmp_path / "b.bin", xyzr[:, :3].astype(np.float64)))
    assert back.dtype == np.float32 and np.array_equal(back[:, :3], xyzr[:, :3]) and not back[:, 3].any()
    # The point files and the bag converter read the same bytes the same way.
    assert np.array_equal(read_points(tmp_path / "a.bin"), xyzr[:, :3])
    write_points(tmp_path / "c.bin", xyzr[:, :3])
    assert (tmp_path / "c.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_bad_kitti_bin_files_name_themselves(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\0" * 18)
    with pytest.raises(ValueError, match="odd.bin: size 18 bytes is not a multiple of 16"):
        read_kitti_bin(tmp_path / "odd.bin")
    with pytest.raises(PointFileError, match="odd.bin: size 18 bytes"):
        read_points(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_kitti_bin(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match=r"expected \(N, 3\) or \(N, 4\)"):
        write_kitti_bin(tmp_path / "x.bin", np.zeros((3, 5)))


def test_farthest_point_sample_from_a_row_or_a_random_start():
    points = np.random.default_rng(1).uniform(-20, 20, (3000, 3)).astype(np.float32)
    assert np.array_equal(farthest_point_sample(points, 100), farthest_point_sample(points, 100, start=0))
    a = farthest_point_sample(points, 100, start=np.random.default_rng(5))
    b = farthest_point_sample(points, 100, start=np.random.default_rng(5))
    assert np.array_equal(a, b) and len(np.unique(a, axis=0)) == 100
    assert np.array_equal(farthest_point_sample(points[:3], 7), points[[0, 1, 2, 0, 1, 2, 0]])


def test_packed_keys_keep_the_earlier_layouts():
    rng = np.random.default_rng(2)
    cells = rng.integers(-(1 << 20), 1 << 20, size=(1000, 3))
    half = 1 << (KEY_BITS - 1)
    shifted = cells + half  # the maps' former 3-axis encoder, bit for bit
    assert np.array_equal(pack_cells(cells), (shifted[:, 0] << 2 * KEY_BITS) | (shifted[:, 1] << KEY_BITS) | shifted[:, 2])
    # The dataset's former x/y cell key ((x << 32) + y) sorted the cells in the same order.
    old = (cells[:, 0] << 32) + cells[:, 1]
    assert np.array_equal(np.argsort(pack_cells(cells[:, :2]), kind="stable"), np.argsort(old, kind="stable"))
    assert np.array_equal(pack_cells(cells) >> KEY_BITS, pack_cells(cells[:, :2]))  # dropping z keys the column
    points = np.array([[0.05, 0.0, -0.01], [0.09, 0.01, -0.09], [0.11, 0.0, 0.0]])
    keys = voxel_keys(points, 0.1)
    assert keys[0] == keys[1] != keys[2]
    with pytest.raises(ValueError, match="points span more than"):
        voxel_keys(np.array([[1e6, 0.0, 0.0]]), 0.1)


def test_in_range_is_exclusive_and_drops_non_finite_rows():
    points = np.array([[3.5, 0, 0], [4, 0, 0], [50, 0, 0], [np.nan, 0, 0], [np.inf, 0, 0], [3e38, 3e38, 0]], np.float32)
    assert in_range(points, 3.5, 50.0).tolist() == [False, True, False, False, False, False]
    assert in_range(points[:3]).all()


def test_seen_through_marks_points_in_front_of_a_return_only():
    """A wall 5 m ahead (x = 5): the rays crossed x < 5, so a point at 3 m is in seen-through
    space; one within the margin, behind the wall (its shadow) or where no ray returned is not."""
    y, z = np.meshgrid(np.linspace(-2, 2, 201), np.linspace(-1, 1, 101))  # 2 cm: every 0.5 deg bin hit
    wall = np.stack([np.full(y.size, 5.0), y.ravel(), z.ravel()], axis=1)
    points = np.array([[3.0, 0.0, 0.0],    # in front of the wall
                       [4.7, 0.3, 0.1],    # 0.3 m in front: beyond the 0.2 m margin
                       [4.9, 0.0, 0.0],    # within the margin (a surface's own thickness)
                       [7.0, 0.5, 0.0],    # behind the wall: its shadow, unobserved
                       [0.0, 3.0, 0.0],    # a direction without any return
                       [-3.0, 0.0, 0.0]])  # behind the sensor
    assert seen_through(points, wall, margin=0.2).tolist() == [True, True, False, False, False, False]
    assert seen_through(points, wall, margin=0.5).tolist() == [True, False, False, False, False, False]
    assert seen_through(points[:0], wall, 0.2).shape == (0,)
    assert not seen_through(points, wall[:0], 0.2).any()


def test_near_measured_and_supported_are_exact_distance_tests() -> None:
    from lidar_completion.points import near_measured, supported

    scan = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]], np.float32)
    points = np.array([[5.05, 0.0, 0.0], [5.25, 0.0, 0.0], [0.0, 5.0, 0.19], [9.0, 9.0, 9.0]], np.float32)
    np.testing.assert_array_equal(near_measured(points, scan, 0.2), [True, False, True, False])
    assert not near_measured(points, scan[:0], 0.2).any() and not near_measured(points, scan, 0.0).any()
    cloud = np.array([[0, 0, 0], [0.3, 0, 0], [0.6, 0, 0], [5, 5, 5]], np.float32)
    np.testing.assert_array_equal(supported(cloud, 0.35, 1), [True, True, True, False])
    np.testing.assert_array_equal(supported(cloud, 0.35, 2), [False, True, False, False])
    assert supported(cloud, 0.35, 0).all()
