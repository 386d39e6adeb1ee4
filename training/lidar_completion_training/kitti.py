"""Read and write the SemanticKITTI directory layout, for real and synthetic data alike.

Layout (one directory per sequence)::

    ROOT/sequences/NN/velodyne/NNNNNN.bin    float32 x, y, z, remission, in the velodyne frame
    ROOT/sequences/NN/labels/NNNNNN.label    uint32: semantic id in the low 16 bits, instance in the high 16
    ROOT/sequences/NN/poses.txt              one 3x4 row-major pose per scan (12 numbers a line)
    ROOT/sequences/NN/calib.txt              "P0: ...", ..., "Tr: ..." (12 numbers each)
    ROOT/sequences/NN/times.txt              one timestamp in seconds per scan

Frames follow KITTI odometry: the velodyne frame is x forward, y left, z up; the camera
frame is x right, y down, z forward; ``Tr`` maps velodyne to camera coordinates and line
``i`` of ``poses.txt`` is the camera pose of scan ``i`` in the camera frame of scan 0. So
velodyne points of scan ``i`` reach the common "world" frame (the *velodyne* frame of scan
0) through ``inv(Tr) @ pose_i @ Tr`` -- what :func:`read_poses` returns, as the
semantic-kitti-api and LiDiff do.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np

from lidar_completion.points import read_kitti_bin as read_scan
from lidar_completion.points import write_kitti_bin as write_scan

__all__ = [
    "KittiSequence",
    "read_calib",
    "read_labels",
    "read_poses",
    "read_scan",
    "read_times",
    "semantic_ids",
    "instance_ids",
    "static_mask",
    "write_calib",
    "write_labels",
    "write_poses",
    "write_scan",
    "write_times",
]

PathLike = str | os.PathLike

MOVING_MIN = 252
"""SemanticKITTI ids >= 252 are the moving variants of car, person, ... ."""
UNLABELED = (0, 1)
"""``unlabeled`` and ``outlier``."""


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def read_labels(path: PathLike, n_points: int | None = None) -> np.ndarray:
    """Read a ``.label`` file as (N,) uint32; ``n_points`` checks it matches its scan."""
    path = _existing(path)
    if path.stat().st_size % 4:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is not a whole number of uint32 labels")
    labels = np.fromfile(path, dtype=np.uint32)
    if n_points is not None and labels.size != n_points:
        raise ValueError(f"{path}: {labels.size} labels for a scan of {n_points} points")
    return labels


def semantic_ids(labels: np.ndarray) -> np.ndarray:
    """Semantic class ids (low 16 bits)."""
    return (labels & 0xFFFF).astype(np.uint16)


def instance_ids(labels: np.ndarray) -> np.ndarray:
    """Instance ids (high 16 bits)."""
    return (labels >> 16).astype(np.uint16)


def static_mask(labels: np.ndarray) -> np.ndarray:
    """Points that belong in a static map: labelled, and not a moving class (LiDiff's filter)."""
    semantic = semantic_ids(labels)
    return (semantic > max(UNLABELED)) & (semantic < MOVING_MIN)


def _read_rows(path: Path, numbers: int) -> list[tuple[str, np.ndarray]]:
    """Lines of ``[KEY:] n1 n2 ...`` as (key, values); a clear error for any malformed line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, _, values = line.rpartition(":")
        try:
            array = np.array(values.split(), dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a list of numbers: {line[:60]!r}") from None
        if numbers and array.size != numbers:
            raise ValueError(f"{path}:{number}: expected {numbers} numbers, found {array.size}")
        rows.append((key.strip(), array))
    return rows


def _homogeneous(rows: np.ndarray) -> np.ndarray:
    """(M, 12) row-major 3x4 matrices -> (M, 4, 4)."""
    out = np.zeros((len(rows), 4, 4))
    out[:, :3, :] = rows.reshape(-1, 3, 4)
    out[:, 3, 3] = 1.0
    return out


def read_calib(path: PathLike) -> dict[str, np.ndarray]:
    """Read ``calib.txt``: ``Tr`` as a 4x4 velodyne-to-camera transform, others (P0..P3) as 3x4."""
    path = _existing(path)
    calib = {key: values.reshape(3, 4) for key, values in _read_rows(path, 12)}
    if "Tr" not in calib:
        raise ValueError(f"{path}: no 'Tr:' (velodyne-to-camera) line")
    calib["Tr"] = _homogeneous(calib["Tr"].reshape(1, 12))[0]
    return calib


def read_poses(path: PathLike, tr: np.ndarray | None = None) -> np.ndarray:
    """Read ``poses.txt`` as (M, 4, 4) velodyne-to-world transforms ``inv(Tr) @ pose @ Tr``.

    ``tr`` is the 4x4 ``Tr`` of ``calib.txt``; ``None`` returns the camera poses unchanged.
    """
    path = _existing(path)
    rows = _read_rows(path, 12)
    if any(key for key, _ in rows):
        raise ValueError(f"{path}: poses lines are 12 bare numbers, found a 'KEY:' prefix")
    poses = _homogeneous(np.stack([values for _, values in rows]) if rows else np.zeros((0, 12)))
    if tr is None:
        return poses
    tr = np.asarray(tr, dtype=np.float64)
    return np.linalg.inv(tr) @ poses @ tr


def read_times(path: PathLike) -> np.ndarray:
    """Read ``times.txt`` as (M,) float64 seconds."""
    path = _existing(path)
    return np.array([values[0] for _, values in _read_rows(path, 1)], dtype=np.float64)


def write_labels(path: PathLike, labels: np.ndarray) -> None:
    """Write (N,) uint32 labels."""
    np.ascontiguousarray(labels, dtype=np.uint32).tofile(path)


def _format(values: np.ndarray) -> str:
    return " ".join(f"{v:.12e}" for v in np.ravel(values))


def write_calib(path: PathLike, calib: dict[str, np.ndarray]) -> None:
    """Write ``calib.txt`` from 3x4 (or 4x4, whose last row is dropped) matrices, in the given order."""
    lines = [f"{key}: {_format(np.asarray(matrix)[:3, :4])}" for key, matrix in calib.items()]
    Path(path).write_text("\n".join(lines) + "\n")


def write_poses(path: PathLike, camera_poses: np.ndarray) -> None:
    """Write (M, 4, 4) *camera-frame* poses as KITTI ``poses.txt``."""
    Path(path).write_text("".join(_format(pose[:3, :4]) + "\n" for pose in camera_poses))


def write_times(path: PathLike, times: np.ndarray) -> None:
    """Write (M,) timestamps in seconds."""
    Path(path).write_text("".join(f"{t:.6e}\n" for t in times))


class KittiSequence:
    """One ``ROOT/sequences/NN`` directory: scans, labels and velodyne-to-world poses by index."""

    def __init__(self, root: PathLike, name: str) -> None:
        self.name = name
        self.path = Path(root) / "sequences" / name
        self.scan_paths = sorted((self.path / "velodyne").glob("*.bin"))
        if not self.scan_paths:
            raise FileNotFoundError(f"{self.path / 'velodyne'}: no .bin scans")

    def __len__(self) -> int:
        return len(self.scan_paths)

    def __repr__(self) -> str:
        return f"KittiSequence({str(self.path)!r}, scans={len(self)})"

    def label_path(self, index: int) -> Path:
        return self.path / "labels" / (self.scan_paths[index].stem + ".label")

    def scan(self, index: int) -> np.ndarray:
        """(N, 4) x, y, z, remission of scan ``index`` in its velodyne frame."""
        return read_scan(self.scan_paths[index])

    def labels(self, index: int, n_points: int | None = None) -> np.ndarray:
        """(N,) uint32 labels of scan ``index``."""
        return read_labels(self.label_path(index), n_points)

    @cached_property
    def calib(self) -> dict[str, np.ndarray]:
        return read_calib(self.path / "calib.txt")

    @cached_property
    def poses(self) -> np.ndarray:
        """(M, 4, 4) velodyne-to-world transforms, one per scan."""
        poses = read_poses(self.path / "poses.txt", self.calib["Tr"])
        if len(poses) != len(self):
            raise ValueError(f"{self.path / 'poses.txt'}: {len(poses)} poses for {len(self)} scans")
        return poses
