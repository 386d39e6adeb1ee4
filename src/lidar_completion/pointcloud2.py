"""sensor_msgs/PointCloud2 <-> numpy without importing ROS.

The functions work on field descriptors and raw bytes only (duck typing), so the same
code converts rclpy messages, messages deserialised by ``rosbags`` and hand-built test
objects. Semantics follow ``sensor_msgs_py.point_cloud2`` (``read_points`` /
``create_cloud``), which is not installable from PyPI.

A message is read through a zero-copy structured numpy view of ``msg.data``; only the
final ``(N, 3)`` float32 array handed to the model is a copy.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol

import numpy as np

__all__ = [
    "DATATYPES",
    "FLOAT32",
    "FLOAT64",
    "INT8",
    "INT16",
    "INT32",
    "UINT8",
    "UINT16",
    "UINT32",
    "CloudData",
    "CloudError",
    "CloudMessage",
    "Field",
    "PointCloud2Like",
    "build_cloud",
    "cloud_dtype",
    "cloud_to_xyz",
    "finite_points",
    "finite_points_with",
    "read_fields",
    "read_points",
    "xyz_to_cloud_fields",
]

# Datatype codes of sensor_msgs/msg/PointField.
INT8 = 1
UINT8 = 2
INT16 = 3
UINT16 = 4
INT32 = 5
UINT32 = 6
FLOAT32 = 7
FLOAT64 = 8

#: PointField datatype code -> little-endian numpy dtype.
DATATYPES: dict[int, np.dtype] = {
    INT8: np.dtype("<i1"),
    UINT8: np.dtype("<u1"),
    INT16: np.dtype("<i2"),
    UINT16: np.dtype("<u2"),
    INT32: np.dtype("<i4"),
    UINT32: np.dtype("<u4"),
    FLOAT32: np.dtype("<f4"),
    FLOAT64: np.dtype("<f8"),
}
_CODE_OF_KIND: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in DATATYPES.items()
}

_XYZ = ("x", "y", "z")


class CloudError(ValueError):
    """A PointCloud2 message that cannot be converted; the text is a one-line reason."""


class PointCloud2Like(Protocol):
    """What we need from sensor_msgs/PointCloud2 (rclpy, rosbags or a test double)."""

    height: int
    width: int
    fields: Sequence[Any]
    is_bigendian: bool
    point_step: int
    row_step: int
    data: Any
    is_dense: bool


@dataclass(frozen=True)
class Field:
    """Plain PointField descriptor, so the core library never needs the ROS class."""

    name: str
    offset: int
    datatype: int
    count: int = 1


FieldKey = tuple[tuple[str, int, int, int], ...]


def _field_key(fields: Sequence[Any]) -> FieldKey:
    """Hashable copy of the descriptors (makes the dtype cacheable per layout)."""
    try:
        return tuple((str(f.name), int(f.offset), int(f.datatype), int(f.count)) for f in fields)
    except AttributeError as exc:
        raise CloudError(f"field descriptor lacks name/offset/datatype/count: {exc}") from None


@lru_cache(maxsize=64)
def _dtype_cached(key: FieldKey, point_step: int, is_bigendian: bool) -> np.dtype:
    names: list[str] = []
    formats: list[Any] = []
    offsets: list[int] = []
    end = 0
    for name, offset, datatype, count in key:
        if datatype not in DATATYPES:
            raise CloudError(f"field '{name}' has unsupported datatype code {datatype}")
        if offset < 0:
            raise CloudError(f"field '{name}' has negative offset {offset}")
        if name in names:
            raise CloudError(f"duplicate field name '{name}'")
        base = DATATYPES[datatype].newbyteorder(">" if is_bigendian else "<")
        # As in sensor_msgs_py: count 0 or 1 is a scalar, count > 1 a sub-array.
        fmt: Any = (base, (count,)) if count > 1 else base
        names.append(name)
        formats.append(fmt)
        offsets.append(offset)
        end = max(end, offset + base.itemsize * max(count, 1))
    if end > point_step:
        raise CloudError(f"point_step {point_step} is smaller than the fields ({end} bytes)")
    try:
        return np.dtype(
            {"names": names, "formats": formats, "offsets": offsets, "itemsize": point_step}
        )
    except (ValueError, TypeError) as exc:
        raise CloudError(f"fields do not form a valid point layout: {exc}") from None


def cloud_dtype(fields: Sequence[Any], point_step: int, is_bigendian: bool = False) -> np.dtype:
    """Structured dtype of one point, padding included (itemsize == point_step)."""
    if point_step <= 0:
        raise CloudError(f"point_step must be positive, got {point_step}")
    return _dtype_cached(_field_key(fields), int(point_step), bool(is_bigendian))


def _as_uint8(data: Any) -> np.ndarray:
    """Zero-copy uint8 view of bytes, bytearray, array.array('B'), memoryview or ndarray."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError):
        # A plain list of ints (e.g. a hand-built message); copying is unavoidable.
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _structured_view(msg: PointCloud2Like, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(height, width) structured view onto msg.data, and the raw uint8 buffer."""
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    if height * width == 0:
        raise CloudError(f"empty cloud (height={height}, width={width})")
    if row_step < width * point_step:
        raise CloudError(
            f"row_step {row_step} is smaller than width*point_step = {width}*{point_step}"
        )
    buf = _as_uint8(msg.data)
    if buf.size != height * row_step:
        raise CloudError(
            f"data has {buf.size} bytes, expected height*row_step = {height}*{row_step}"
            f" (width*point_step = {width}*{point_step})"
        )
    view = np.ndarray(
        shape=(height, width), dtype=dtype, buffer=buf, offset=0, strides=(row_step, point_step)
    )
    return view, buf


def read_points(
    msg: PointCloud2Like,
    field_names: Sequence[str] | None = None,
    reshape_organized: bool = False,
) -> np.ndarray:
    """Structured array of the points, like ``sensor_msgs_py.point_cloud2.read_points``.

    A view onto ``msg.data`` (read-only when the data is immutable), except that an
    organised cloud with row padding is copied when flattened. Shape ``(N,)``, or
    ``(height, width)`` when ``reshape_organized``. ``field_names`` selects fields.
    """
    dtype = cloud_dtype(msg.fields, msg.point_step, msg.is_bigendian)
    points, _ = _structured_view(msg, dtype)
    if field_names is not None:
        names = list(field_names)
        have = list(dtype.names or ())
        missing = [n for n in names if n not in have]
        if missing:
            raise CloudError(f"cloud has no field(s) {missing}; fields are {have}")
        points = points[names]
    return points if reshape_organized else points.reshape(-1)


def read_fields(msg: PointCloud2Like, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Owned, native-endian arrays of the named fields, shape (N,) or (N, count)."""
    points = read_points(msg, names)
    return {n: np.array(points[n], dtype=points.dtype[n].base.newbyteorder("=")) for n in names}


def cloud_to_xyz(msg: PointCloud2Like) -> np.ndarray:
    """(N, 3) float32 copy of x, y, z; organised clouds are flattened row-major.

    Non-finite points are kept (see :func:`finite_points`) so callers can count them.
    """
    dtype = cloud_dtype(msg.fields, msg.point_step, msg.is_bigendian)
    names = dtype.names or ()
    missing = [n for n in _XYZ if n not in names]
    if missing:
        raise CloudError(f"cloud has no field(s) {missing}; fields are {list(names)}")
    for n in _XYZ:
        if dtype[n].shape:
            raise CloudError(f"field '{n}' has count {dtype[n].shape[0]}, expected 1")
    view, _ = _structured_view(msg, dtype)
    height, width = view.shape
    out = np.empty((height, width, 3), dtype=np.float32)
    # One 1-D strided copy per axis: ~6x faster than one (N, 3) strided copy, and it
    # casts any integer/float type and byte order to native float32 on the way.
    for i, n in enumerate(_XYZ):
        out[:, :, i] = view[n]
    return out.reshape(-1, 3)


def _finite_rows(xyz: np.ndarray) -> tuple[np.ndarray, int]:
    """Mask of the rows without NaN/inf, and how many rows it drops."""
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"expected (N, 3) points, got shape {xyz.shape}")
    # Per-column tests: ~20x faster than ``isfinite(xyz).all(axis=1)`` on (N, 3) arrays.
    mask = np.isfinite(xyz[:, 0]) & np.isfinite(xyz[:, 1]) & np.isfinite(xyz[:, 2])
    return mask, int(mask.size - np.count_nonzero(mask))


def _gather_rows(xyz: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``xyz[mask]`` as a row-as-void-bytes gather (several times faster on (N, 3) arrays)."""
    rows = np.ascontiguousarray(xyz)
    kept = rows.view(np.dtype((np.void, 3 * rows.itemsize))).reshape(-1)[mask]
    return kept.view(rows.dtype).reshape(-1, 3)


def finite_points(xyz: np.ndarray) -> tuple[np.ndarray, int]:
    """Drop rows with NaN/inf; returns (points, number dropped). No copy if none dropped."""
    mask, n_bad = _finite_rows(xyz)
    return (xyz, 0) if n_bad == 0 else (_gather_rows(xyz, mask), n_bad)


def finite_points_with(xyz: np.ndarray, values: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """:func:`finite_points` keeping a per-point array (e.g. intensity, [N]) in step with the
    points: (points, their values, number dropped); ``values`` None stays None. No copy if
    none dropped."""
    mask, n_bad = _finite_rows(xyz)
    if n_bad == 0:
        return xyz, values, 0
    return _gather_rows(xyz, mask), None if values is None else values[mask], n_bad


@dataclass(frozen=True)
class CloudData:
    """Field layout and little-endian bytes of a cloud, ready to put in a message."""

    fields: list[Field]
    point_step: int
    height: int
    width: int
    data: np.ndarray  # uint8, size height * width * point_step
    is_dense: bool

    @property
    def row_step(self) -> int:
        return self.width * self.point_step

    def data_as(self, kind: Literal["array", "numpy", "bytes"]) -> Any:
        """``array.array('B')`` for rclpy, uint8 ndarray for rosbags, or bytes."""
        if kind == "numpy":
            return self.data
        if kind == "bytes":
            return self.data.tobytes()
        if kind == "array":
            # rclpy's setter accepts array.array without a per-byte Python loop.
            out = array.array("B")
            out.frombytes(self.data.data)  # the ndarray's buffer, no intermediate copy
            return out
        raise ValueError(f"unknown data kind {kind!r}")


@dataclass
class CloudMessage:
    """A plain PointCloud2 with the message's attributes, for code and tests that run
    without the ROS message packages (``build_cloud(xyz, None, CloudMessage, Field)``)."""

    header: Any = None
    height: int = 0
    width: int = 0
    fields: Any = None
    is_bigendian: bool = False
    point_step: int = 0
    row_step: int = 0
    data: Any = None
    is_dense: bool = False


def _code_of(dt: np.dtype, name: str) -> int:
    code = _CODE_OF_KIND.get((dt.kind, dt.itemsize))
    if code is None:
        raise CloudError(f"field '{name}' has dtype {dt}, which PointField cannot express")
    return code


def xyz_to_cloud_fields(
    points: np.ndarray,
    extra: Mapping[str, np.ndarray] | None = None,
) -> CloudData:
    """Pack x, y, z (float32) plus optional extra fields into PointCloud2 bytes.

    ``points`` is (N, 3) or organised (H, W, 3). Each ``extra`` array has the same
    leading shape, plus an optional trailing count axis; its dtype is kept (int8..float64).
    Fields are naturally aligned so C++ consumers can read them directly.
    """
    points = np.asarray(points)
    if points.ndim not in (2, 3) or points.shape[-1] != 3:
        raise CloudError(f"points must be (N, 3) or (H, W, 3), got shape {points.shape}")
    lead = points.shape[:-1]
    height, width = (1, lead[0]) if points.ndim == 2 else lead
    n = height * width
    extra = dict(extra or {})
    for name in extra:
        if name in _XYZ:
            raise CloudError(f"extra field '{name}' clashes with x/y/z")

    fields = [Field("x", 0, FLOAT32), Field("y", 4, FLOAT32), Field("z", 8, FLOAT32)]
    columns: list[tuple[np.ndarray, Field]] = []
    offset, align = 12, 4
    for name, values in extra.items():
        values = np.asarray(values)
        if values.shape[: len(lead)] != lead or values.ndim > len(lead) + 1:
            raise CloudError(
                f"extra field '{name}' has shape {values.shape}, points {points.shape}"
            )
        count = values.shape[-1] if values.ndim == len(lead) + 1 else 1
        kind = np.dtype("u1") if values.dtype.kind == "b" else values.dtype
        code = _code_of(kind, name)
        size = DATATYPES[code].itemsize
        offset = -(-offset // size) * size
        field = Field(name, offset, code, count)
        fields.append(field)
        columns.append((values.reshape(n, count), field))
        offset += size * count
        align = max(align, size)
    point_step = -(-offset // align) * align

    xyz = points.reshape(n, 3)
    is_dense = bool(np.isfinite(xyz).all())
    data = np.zeros(n * point_step, dtype=np.uint8)  # zeros: deterministic padding bytes
    if n == 0:
        return CloudData(fields, point_step, int(height), int(width), data, is_dense)
    # Strided views into the output buffer; each field is one vectorised copy.
    # 1-D strided copies (one per axis / component) are several times faster than one
    # 2-D strided copy.
    if point_step == 12:
        data.view("<f4").reshape(n, 3)[...] = xyz
    else:
        for i in range(3):
            np.ndarray((n,), "<f4", data, 4 * i, (point_step,))[...] = xyz[:, i]
    for values, f in columns:
        dt = DATATYPES[f.datatype]
        for k in range(f.count):
            dst = np.ndarray((n,), dt, data, f.offset + k * dt.itemsize, (point_step,))
            dst[...] = values[:, k]
    return CloudData(fields, point_step, int(height), int(width), data, is_dense)


def build_cloud(
    points: np.ndarray,
    header: Any,
    msg_factory: Callable[..., Any],
    field_factory: Callable[..., Any],
    *,
    extra: Mapping[str, np.ndarray] | None = None,
    data_as: Literal["array", "numpy", "bytes"] = "array",
) -> Any:
    """Make a PointCloud2 with the given message classes; the caller owns the ROS import.

    rclpy: ``build_cloud(pts, hdr, PointCloud2, PointField)`` (``data_as='array'``;
    the data is assigned after construction, which skips a copy in rclpy's constructor).
    rosbags: pass the typestore classes and ``data_as='numpy'``.
    """
    cloud = xyz_to_cloud_fields(points, extra)
    kwargs: dict[str, Any] = dict(
        header=header,
        height=cloud.height,
        width=cloud.width,
        fields=[field_factory(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
                for f in cloud.fields],
        is_bigendian=False,
        point_step=cloud.point_step,
        row_step=cloud.row_step,
        is_dense=cloud.is_dense,
    )
    if data_as == "array":
        msg = msg_factory(**kwargs)
        msg.data = cloud.data_as("array")
        return msg
    return msg_factory(data=cloud.data_as(data_as), **kwargs)

