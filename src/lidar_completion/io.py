"""Point-cloud files in and out: KITTI ``.bin``, ``.ply``, ``.pcd`` and ``.npy``.

Readers return float32 [N, 3] xyz (extra channels such as remission are dropped). Any
problem — unreadable, wrong shape, empty, no finite point — raises :class:`PointFileError`
with a one-line message naming the file, so a directory run can skip it and go on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .points import read_kitti_bin, write_kitti_bin

__all__ = ["PointFileError", "read_points", "write_points", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".bin", ".ply", ".pcd", ".npy")


class PointFileError(ValueError):
    """A point-cloud file that cannot be used; the message names the file."""


def _read_bin(path: Path) -> np.ndarray:
    try:
        return read_kitti_bin(path)[:, :3]
    except ValueError as err:
        raise PointFileError(str(err)) from None


def _read_ply(path: Path) -> np.ndarray:
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    return np.stack([np.asarray(vertex[axis], dtype=np.float32) for axis in "xyz"], axis=1)


def _read_pcd(path: Path) -> np.ndarray:
    from pypcd4 import PointCloud

    cloud = PointCloud.from_path(path)
    return cloud.numpy(("x", "y", "z")).astype(np.float32)


def _read_npy(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.shape[1] < 3:
        raise PointFileError(f"{path}: expected an [N, >=3] array, got shape {array.shape}")
    return array[:, :3].astype(np.float32)


_READERS = {".bin": _read_bin, ".ply": _read_ply, ".pcd": _read_pcd, ".npy": _read_npy}


def read_points(path: str | os.PathLike) -> np.ndarray:
    """Read xyz from a supported file; raises :class:`PointFileError` on any problem."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise PointFileError(f"{path}: unsupported suffix (use {', '.join(SUPPORTED_SUFFIXES)})")
    if not path.is_file():
        raise PointFileError(f"{path}: no such file")
    try:
        points = reader(path)
    except PointFileError:
        raise
    except Exception as err:  # each reader library has its own exception types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PointFileError(f"{path}: unreadable ({reason})") from None
    if len(points) == 0:
        raise PointFileError(f"{path}: contains no points")
    if not np.isfinite(points).all(axis=1).any():
        raise PointFileError(f"{path}: contains no finite point")
    return np.ascontiguousarray(points, dtype=np.float32)


def write_points(path: str | os.PathLike, points: np.ndarray) -> Path:
    """Write xyz to ``.ply`` (binary, float32), ``.npy``, ``.bin`` (remission 0) or ``.pcd``."""
    path = Path(path)
    points = np.ascontiguousarray(points[:, :3], dtype=np.float32)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".ply":
        from plyfile import PlyData, PlyElement

        vertex = np.empty(len(points), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
        vertex["x"], vertex["y"], vertex["z"] = points.T
        PlyData([PlyElement.describe(vertex, "vertex")], byte_order="<").write(str(path))
    elif suffix == ".npy":
        np.save(path, points)
    elif suffix == ".bin":
        write_kitti_bin(path, points)
    elif suffix == ".pcd":
        from pypcd4 import PointCloud

        PointCloud.from_xyz_points(points).save(path)
    else:
        raise PointFileError(f"{path}: unsupported output suffix (use {', '.join(SUPPORTED_SUFFIXES)})")
    return path
