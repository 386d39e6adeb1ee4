"""Point-cloud files in and out: KITTI ``.bin``, nuScenes ``.pcd.bin``, ``.ply``, ``.pcd``, ``.npy``.

:func:`read_points` returns float32 [N, 3] xyz (extra channels such as remission are dropped);
:func:`read_bin` returns every float32 field of a raw ``.bin`` scan ([N, 4] or [N, 5]). Any
problem — unreadable, wrong shape, empty, no finite point, values implausible for the declared
layout — raises :class:`PointFileError` with a one-line message naming the file, so a directory
run can skip it and go on.

Raw ``.bin`` files carry no header, so their layout is declared, never guessed from the bytes:
``layout="kitti"`` (x, y, z, intensity: 4 float32 per point) or ``layout="nuscenes"`` (x, y, z,
intensity, ring: 5 float32). Without one, the name decides: ``*.pcd.bin`` is nuScenes, any other
``*.bin`` KITTI. The bytes are then checked against that layout (:func:`check_bin`) and a file
that does not fit is refused — a nuScenes sweep read as KITTI would otherwise be 43,360 points
of garbage without a word.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .points import write_kitti_bin

__all__ = ["BIN_LAYOUTS", "LAYOUT_NAMES", "SUPPORTED_SUFFIXES", "BinLayout", "PointFileError", "bin_layout",
           "check_bin", "read_bin", "read_points", "write_points"]

SUPPORTED_SUFFIXES = (".bin", ".ply", ".pcd", ".npy")  # ".pcd.bin" ends in ".bin"


class PointFileError(ValueError):
    """A point-cloud file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class BinLayout:
    """The float32 fields of one point in a raw ``.bin`` scan."""

    name: str
    fields: tuple[str, ...]
    label: str  # what such a file is usually called, for messages

    @property
    def record_bytes(self) -> int:
        return 4 * len(self.fields)

    def describe(self) -> str:
        return f"{self.label} ({', '.join(self.fields)} float32)"


BIN_LAYOUTS = {
    "kitti": BinLayout("kitti", ("x", "y", "z", "intensity"), "KITTI .bin"),
    "nuscenes": BinLayout("nuscenes", ("x", "y", "z", "intensity", "ring"), "nuScenes .pcd.bin"),
}
LAYOUT_NAMES = tuple(BIN_LAYOUTS)

# Plausibility of a raw scan (measured in tests/test_io_layouts.py and issue 22; see docs/cli.md).
MAX_COORD_M = 1000.0  # |x|, |y|, |z| beyond this is not a LiDAR return
MIN_NONZERO = 1e-30  # 0 < |v| < this: integers or other binary data read as float32 (denormals)
MAX_BAD_XYZ = 0.5  # refuse when more than this share of points has non-finite / absurd xyz
MAX_INTENSITY = 65535.0  # 8- and 16-bit sensors; KITTI remission is [0, 1], others [0, 255]
MAX_BAD_INTENSITY = 0.01  # refuse when more than 1 % of intensity values are implausible
MAX_RING = 255  # beam index (nuScenes 0-31, 128-beam sensors 0-127); every ring value must be one
STRIDE_MIN_POINTS = 100  # the stride test needs this many points
STRIDE_FACTOR = 8.0  # another layout's stride this many times more coherent -> refuse
STRIDE_MAX_FLOATS = 1 << 17  # the stride test looks at the first 512 KiB


def bin_layout(path: str | os.PathLike, layout: str | BinLayout | None = None) -> BinLayout:
    """The declared layout: ``layout`` if given (a name in :data:`LAYOUT_NAMES`), else by name."""
    if isinstance(layout, BinLayout):
        return layout
    if layout is None:
        return BIN_LAYOUTS["nuscenes" if str(path).lower().endswith(".pcd.bin") else "kitti"]
    try:
        return BIN_LAYOUTS[str(layout).lower()]
    except KeyError:
        raise ValueError(f"unknown point layout {layout!r} (use {', '.join(LAYOUT_NAMES)})") from None


def _share(mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask)) / max(1, mask.size)


def _amount(mask: np.ndarray) -> str:
    """``"38% of"``, or ``"3 of 62,652"`` when that rounds to 0 %."""
    share = _share(mask)
    return f"{share:.0%} of" if share >= 0.005 else f"{np.count_nonzero(mask):,} of {mask.size:,}"


def _stride_spread(flat: np.ndarray, stride: int) -> float:
    """Median |f[i + stride] - f[i]| over the float stream: small at the true record length,
    where it compares one field of neighbouring points, large where it compares two fields."""
    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.abs(flat[stride:].astype(np.float64) - flat[:-stride])
    diff = diff[np.isfinite(diff)]
    return float(np.median(diff)) if diff.size else float("nan")


def _other_layout_hint(flat: np.ndarray, declared: BinLayout) -> str:
    """``"; its values line up as 5 floats per point (nuScenes ...)"`` when another known layout
    is far more coherent than the declared one, else ``""``."""
    if flat.size < STRIDE_MIN_POINTS * declared.record_bytes // 4:
        return ""
    flat = flat[:STRIDE_MAX_FLOATS]
    own = _stride_spread(flat, len(declared.fields))
    for other in BIN_LAYOUTS.values():
        if len(other.fields) == len(declared.fields):
            continue
        spread = _stride_spread(flat, len(other.fields))
        if spread * STRIDE_FACTOR < own:  # NaN compares False: no hint
            return (f"; its values line up as {len(other.fields)} floats per point "
                    f"({other.label}: --layout {other.name})")
    return ""


def check_bin(values: np.ndarray, layout: BinLayout, path: str | os.PathLike) -> None:
    """Raise :class:`PointFileError` when [N, F] ``values`` do not look like ``layout``.

    Refused: more than half the points with non-finite xyz, a coordinate beyond 1 km or a
    denormal one (binary data that is not float32 xyz); more than 1 % of intensity values
    non-finite, negative or above 65535 (coordinates in the intensity column); any ring value
    that is not an integer in 0-255; and a float stream whose values line up far
    better at another known layout's record length than at the declared one."""
    what = f"{path}: not a {layout.describe()}"
    xyz = values[:, :3]
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.any():
        raise PointFileError(f"{path}: contains no finite point")
    with np.errstate(invalid="ignore"):
        size = np.abs(xyz)
        absurd = ~finite | (size.max(axis=1) > MAX_COORD_M) | ((size < MIN_NONZERO) & (size > 0)).any(axis=1)
    problems = []
    if _share(absurd) > MAX_BAD_XYZ:
        problems.append(f"{_amount(absurd)} points have a non-finite, denormal or "
                        f"beyond-{MAX_COORD_M:g} m coordinate")
    if "intensity" in layout.fields:
        intensity = values[:, layout.fields.index("intensity")]
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(intensity) | (intensity < 0) | (intensity > MAX_INTENSITY)
        if _share(bad) > MAX_BAD_INTENSITY:
            problems.append(f"{_amount(bad)} intensity values are negative, non-finite or "
                            f"above {MAX_INTENSITY:g}")
    if "ring" in layout.fields:
        ring = values[:, layout.fields.index("ring")]
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(ring) | (ring < 0) | (ring > MAX_RING) | (ring != np.round(ring))
        if bad.any():
            problems.append(f"{_amount(bad)} ring values are not integers 0-{MAX_RING}")
    hint = _other_layout_hint(values.reshape(-1), layout)
    if problems:
        raise PointFileError(f"{what}: {'; '.join(problems)}{hint}")
    if hint:
        raise PointFileError(f"{what}{hint}")


def read_bin(path: str | os.PathLike, layout: str | BinLayout | None = None) -> np.ndarray:
    """Every field of a raw float32 ``.bin`` scan as [N, F] float32 (fields in
    ``bin_layout(path, layout).fields``), checked with :func:`check_bin`."""
    path = Path(path)
    declared = bin_layout(path, layout)
    if not path.is_file():
        raise PointFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size % declared.record_bytes:
        raise PointFileError(f"{path}: size {size} bytes is not a multiple of {declared.record_bytes} "
                             f"({', '.join(declared.fields)} float32)")
    if size == 0:
        raise PointFileError(f"{path}: contains no points")
    try:
        values = np.fromfile(path, dtype="<f4").reshape(-1, len(declared.fields))
    except (OSError, ValueError) as err:
        raise PointFileError(f"{path}: unreadable ({err})") from None
    check_bin(values, declared, path)
    return values.astype(np.float32, copy=False)


# Names other tools give the intensity field, the first one present is read.
INTENSITY_NAMES = ("intensity", "remission", "reflectance", "reflectivity")


def _read_ply(path: Path) -> np.ndarray:
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    names = vertex.data.dtype.names or ()
    columns = [np.asarray(vertex[axis], dtype=np.float32) for axis in "xyz"]
    columns += [np.asarray(vertex[n], dtype=np.float32) for n in INTENSITY_NAMES if n in names][:1]
    return np.stack(columns, axis=1)


def _read_pcd(path: Path) -> np.ndarray:
    from pypcd4 import PointCloud

    cloud = PointCloud.from_path(path)
    names = ["x", "y", "z"] + [n for n in INTENSITY_NAMES if n in cloud.fields][:1]
    return cloud.numpy(names).astype(np.float32)


def _read_npy(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.shape[1] < 3:
        raise PointFileError(f"{path}: expected an [N, >=3] array, got shape {array.shape}")
    return array[:, :4].astype(np.float32)


_READERS = {".ply": _read_ply, ".pcd": _read_pcd, ".npy": _read_npy}


def read_points(path: str | os.PathLike, layout: str | BinLayout | None = None,
                with_intensity: bool = False) -> np.ndarray:
    """Read xyz [N, 3] from a supported file, or xyz + intensity [N, 4] with ``with_intensity``
    (0 where the file has none); raises :class:`PointFileError` on any problem.

    ``layout`` (``"kitti"`` / ``"nuscenes"``) declares the fields of a raw ``.bin`` file; by
    default ``*.pcd.bin`` is nuScenes and any other ``.bin`` KITTI. Other formats describe
    themselves and ignore it."""
    path = Path(path)
    suffix = path.suffix.lower()
    reader: Callable[[Path], np.ndarray] | None
    if suffix == ".bin":
        declared = bin_layout(path, layout)  # an unknown name is the caller's ValueError
        reader = lambda p: read_bin(p, declared)[:, :4]  # noqa: E731
    else:
        reader = _READERS.get(suffix)
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
    if not np.isfinite(points[:, :3]).all(axis=1).any():
        raise PointFileError(f"{path}: contains no finite point")
    if not with_intensity:
        return np.ascontiguousarray(points[:, :3], dtype=np.float32)
    if points.shape[1] < 4:
        points = np.hstack([points[:, :3], np.zeros((len(points), 1), np.float32)])
    return np.ascontiguousarray(points[:, :4], dtype=np.float32)


def write_points(path: str | os.PathLike, points: np.ndarray, intensity: np.ndarray | None = None,
                 measured: np.ndarray | None = None) -> Path:
    """Write xyz to ``.ply`` (binary, float32), ``.npy``, ``.bin`` or ``.pcd``, with the
    per-point ``intensity`` (float32) and ``measured`` (uint8: 1 = a scan point, 0 = completed)
    when given: as fields of ``.ply`` and ``.pcd``, as columns 4 and 5 of ``.npy``; a ``.bin``
    holds x, y, z, intensity (0 when not given) and no ``measured``.

    A ``.pcd.bin`` name is refused: it reads back as nuScenes x, y, z, intensity, ring, and
    there is no ring to write."""
    path = Path(path)
    points = np.ascontiguousarray(points[:, :3], dtype=np.float32)
    extra = {name: np.asarray(values) for name, values in (("intensity", intensity), ("measured", measured))
             if values is not None}
    for name, values in extra.items():
        if values.shape != (len(points),):
            raise ValueError(f"{name}: expected {len(points)} values, got shape {values.shape}")
    types = {"intensity": np.float32, "measured": np.uint8}
    suffix = path.suffix.lower()
    if path.name.lower().endswith(".pcd.bin"):
        raise PointFileError(f"{path}: cannot write a nuScenes .pcd.bin (no intensity or ring); "
                             f"use .bin, .ply, .pcd or .npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".ply":
        from plyfile import PlyData, PlyElement

        vertex = np.empty(len(points), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")]
                          + [(name, types[name]) for name in extra])
        vertex["x"], vertex["y"], vertex["z"] = points.T
        for name, values in extra.items():
            vertex[name] = values
        PlyData([PlyElement.describe(vertex, "vertex")], byte_order="<").write(str(path))
    elif suffix == ".npy":
        np.save(path, np.column_stack([points, *[v.astype(np.float32) for v in extra.values()]]).astype(np.float32))
    elif suffix == ".bin":
        write_kitti_bin(path, points if intensity is None else np.column_stack([points, intensity]))
    elif suffix == ".pcd":
        from pypcd4 import PointCloud

        if extra:
            columns = [*points.T, *extra.values()]
            PointCloud.from_points(columns, ["x", "y", "z", *extra], [np.float32] * 3 + [types[n] for n in extra]).save(path)
        else:
            PointCloud.from_xyz_points(points).save(path)
    else:
        raise PointFileError(f"{path}: unsupported output suffix (use {', '.join(SUPPORTED_SUFFIXES)})")
    return path
