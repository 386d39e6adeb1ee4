"""Ground-truth scenes: the static points of every scan of a sequence, aggregated through the poses.

Why: a single scan is sparse and self-occluded; the union of all scans of a drive, with
moving objects removed, is the dense scene a completion model should produce (LiDiff's
``map_from_scans``). As there, a scan contributes its points that are labelled and not of a
moving class (``kitti.static_mask``) and farther than 3.5 m from its sensor (the car itself
and the flying artifacts next to it). The map lives in the sequence's world frame (velodyne
frame of scan 0, see :mod:`lidar_completion_training.kitti`) at
``ROOT/sequences/NN/map_clean.npy``, an (M, 3) float32 array voxel-averaged at 0.1 m: one
point per voxel, each inside its own voxel.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lidar_completion.points import KEY_BITS, in_range, voxel_keys

from .kitti import KittiSequence, static_mask

__all__ = ["MAP_FILE", "VoxelMean", "build_map", "load_map", "map_path", "voxel_downsample", "main"]

MAP_FILE = "map_clean.npy"
EGO_RANGE = 3.5
"""m: a scan's points this close to its sensor stay out of the map (LiDiff's ``map_from_scans``)."""


class VoxelMean:
    """Running per-voxel mean of points added in batches, so a whole drive never sits in memory at once."""

    def __init__(self, voxel: float, flush_points: int = 8_000_000) -> None:
        self.voxel, self.flush_points = voxel, flush_points
        self._keys: np.ndarray = np.zeros(0, np.int64)
        self._sums: np.ndarray = np.zeros((0, 3))
        self._counts: np.ndarray = np.zeros(0)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add(self, points: np.ndarray) -> None:
        self._pending.append(np.asarray(points, dtype=np.float64)[:, :3])
        self._n_pending += len(points)
        if self._n_pending >= self.flush_points:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        points = np.concatenate(self._pending)
        self._pending, self._n_pending = [], 0
        keys = np.concatenate([self._keys, voxel_keys(points, self.voxel)])
        sums = np.concatenate([self._sums, points])
        counts = np.concatenate([self._counts, np.ones(len(points))])
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._counts = np.bincount(inverse, weights=counts, minlength=len(self._keys))
        self._sums = np.stack([np.bincount(inverse, weights=column, minlength=len(self._keys)) for column in sums.T], 1)

    def result(self) -> np.ndarray:
        """(M, 3) float32 voxel means, each inside its own voxel.

        The means are summed in float64; rounding one to float32 can carry it across its
        voxel's face when it lies within a float32 step of it (0.24 mm 2-4 km from the first
        scan): on a generated 4,500-scan drive reaching 2.6 km, 2,063 of 18.3 million means
        landed in a neighbouring voxel and 1,460 voxels held two points. Such a coordinate is
        moved back by whole float32 steps, so ``voxel_keys`` of the result gives each point its
        own voxel whether it is evaluated in float32 or float64."""
        self._flush()
        means = (self._sums / self._counts[:, None]).astype(np.float32)
        return _into_cells(means, _unpack_cells(self._keys), self.voxel)


def _unpack_cells(keys: np.ndarray) -> np.ndarray:
    """(N, 3) int64 cell indices of ``points.pack_cells`` keys of three axes."""
    half, mask = 1 << (KEY_BITS - 1), (1 << KEY_BITS) - 1
    return np.stack([((keys >> (KEY_BITS * (2 - axis))) & mask) - half for axis in range(3)], axis=1)


def _into_cells(points: np.ndarray, cells: np.ndarray, voxel: float) -> np.ndarray:
    """``points`` (float32) with every coordinate outside its cell (floor(p / voxel) computed
    in float64 or in float32) moved towards the cell's centre a float32 step at a time."""
    points = points.copy()
    centre = ((cells + 0.5) * voxel).astype(np.float32)
    for _ in range(64):  # one or two steps in practice
        outside = (np.floor(points.astype(np.float64) / voxel) != cells) | (np.floor(points / np.float32(voxel)) != cells)
        if not outside.any():
            return points
        points[outside] = np.nextafter(points[outside], centre[outside])
    raise ValueError(f"voxel {voxel} m is too small for float32 coordinates of this size")


def voxel_downsample(points: np.ndarray, voxel: float) -> np.ndarray:
    """Replace the points of each ``voxel``-sized cell by their mean."""
    mean = VoxelMean(voxel)
    mean.add(points)
    return mean.result()


def map_path(sequence: KittiSequence) -> Path:
    return sequence.path / MAP_FILE


def build_map(sequence: KittiSequence, voxel: float = 0.1, progress: bool = False,
              min_range: float = EGO_RANGE) -> np.ndarray:
    """Aggregate the static points of every scan farther than ``min_range`` from its sensor
    (0: all), in world coordinates, voxel-averaged."""
    from tqdm import tqdm

    poses, mean = sequence.poses, VoxelMean(voxel)
    for i in tqdm(range(len(sequence)), desc=f"map {sequence.name}", unit="scan", disable=not progress):
        points = sequence.scan(i)[:, :3].astype(np.float64)
        points = points[static_mask(sequence.labels(i, len(points))) & in_range(points, min_range)]
        mean.add(points @ poses[i][:3, :3].T + poses[i][:3, 3])
    return mean.result()


def load_map(sequence: KittiSequence) -> np.ndarray:
    """The stored map of ``sequence``; tells how to build it when missing."""
    path = map_path(sequence)
    if not path.is_file():
        hint = f"lidar-build-maps --root ROOT --sequences {sequence.name}"
        raise FileNotFoundError(f"{path}: no ground-truth map; build it with `{hint}`")
    points = np.load(path)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{path}: expected an (M, 3) array, got {points.shape}")
    return points


def main(argv: Sequence[str] | None = None) -> int:
    """``lidar-build-maps``: write ``map_clean.npy`` for sequences of a SemanticKITTI-layout root."""
    parser = argparse.ArgumentParser(prog="lidar-build-maps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="dataset root containing sequences/NN")
    parser.add_argument("--sequences", nargs="*", help="names such as 00 08 (default: every labelled sequence)")
    parser.add_argument("--voxel", type=float, default=0.1, help="voxel size in metres")
    parser.add_argument("--min-range", type=float, default=EGO_RANGE,
                        help=f"leave out each scan's points within this many metres of its sensor (default {EGO_RANGE}, "
                        "as LiDiff's maps; 0 keeps them)")
    args = parser.parse_args(argv)
    names = args.sequences or sorted(
        p.name for p in (args.root / "sequences").iterdir() if (p / "labels").is_dir() and (p / "poses.txt").is_file()
    )
    if not names:
        parser.error(f"no labelled sequences with poses.txt under {args.root / 'sequences'}")
    for name in names:
        sequence = KittiSequence(args.root, name)
        points = build_map(sequence, args.voxel, progress=True, min_range=args.min_range)
        tmp = map_path(sequence).with_suffix(".tmp.npy")
        np.save(tmp, points)
        os.replace(tmp, map_path(sequence))
        print(f"{map_path(sequence)}: {len(points)} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
