"""rosbag2 files of point clouds, read and written with ``rosbags`` (pure Python, no rclpy).

Used to replay recorded or converted LiDAR data through the node, and to turn a
SemanticKITTI-layout sequence into a bag that ``ros2 bag play`` publishes as
``sensor_msgs/msg/PointCloud2``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

import numpy as np

from lidar_completion.pointcloud2 import build_cloud, cloud_to_xyz
from lidar_completion.io import LAYOUT_NAMES, PointFileError, bin_layout, read_bin

__all__ = [
    "DEFAULT_START_NS",
    "DEFAULT_TOPIC",
    "POINTCLOUD2",
    "BagCloud",
    "BagError",
    "CloudBagWriter",
    "iter_cloud_messages",
    "kitti_sequence_to_bag",
    "main",
    "read_clouds",
    "write_clouds",
]

POINTCLOUD2 = "sensor_msgs/msg/PointCloud2"
DEFAULT_TOPIC = "/points_raw"
#: Converted sequences start 1 s after the epoch: stamp 0 means "latest" to tf2 and
#: is rejected as unset by some message filters, and a fixed start keeps output reproducible.
DEFAULT_START_NS = 1_000_000_000
Storage = Literal["mcap", "sqlite3"]


class BagError(ValueError):
    """A bag or input sequence that cannot be read or written as asked."""


class BagCloud(NamedTuple):
    """One cloud read from a bag; unpacks as ``stamp_ns, frame_id, xyz``."""

    stamp_ns: int  # header stamp
    frame_id: str
    xyz: np.ndarray  # (N, 3) float32, non-finite points kept


def _typestore(store: Any = None) -> Any:
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE if store is None else store)


class CloudBagWriter:
    """Streams clouds into a new rosbag2 bag on one PointCloud2 topic.

    ``with CloudBagWriter(path) as w: w.write(stamp_ns, "velodyne", xyz, {"intensity": i})``.
    The bag log time of each message is its header stamp, so ``ros2 bag play`` replays
    at the recorded rate.
    """

    def __init__(
        self,
        path: str | Path,
        topic: str = DEFAULT_TOPIC,
        storage: Storage = "mcap",
        *,
        store: Any = None,
        version: Literal[8, 9] = 8,
    ) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
        if storage not in plugins:
            raise BagError(f"storage must be one of {sorted(plugins)}, got {storage!r}")
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"{self.path} already exists; rosbag2 writes a new directory")
        self._ts = _typestore(store)
        self._msg = self._ts.types[POINTCLOUD2]
        self._field = self._ts.types["sensor_msgs/msg/PointField"]
        self._header = self._ts.types["std_msgs/msg/Header"]
        self._time = self._ts.types["builtin_interfaces/msg/Time"]
        self._writer = Writer(self.path, version=version, storage_plugin=plugins[storage])
        self._writer.open()
        self._conn = self._writer.add_connection(topic, POINTCLOUD2, typestore=self._ts)
        self.count = 0

    def write(
        self,
        stamp_ns: int,
        frame_id: str,
        xyz: np.ndarray,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append one cloud; ``extra`` adds per-point fields such as intensity."""
        stamp_ns = int(stamp_ns)
        if stamp_ns < 0:
            raise BagError(f"stamp must be >= 0 ns, got {stamp_ns}")
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        header = self._header(stamp=self._time(sec=sec, nanosec=nanosec), frame_id=frame_id)
        msg = build_cloud(xyz, header, self._msg, self._field, extra=extra, data_as="numpy")
        self._writer.write(self._conn, stamp_ns, self._ts.serialize_cdr(msg, POINTCLOUD2))
        self.count += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> CloudBagWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_clouds(
    path: str | Path,
    clouds: Iterable[Sequence[Any]],
    topic: str = DEFAULT_TOPIC,
    storage: Storage = "mcap",
    *,
    store: Any = None,
) -> int:
    """Write ``(stamp_ns, frame_id, xyz[, extra])`` items into a new bag; returns the count."""
    with CloudBagWriter(path, topic, storage, store=store) as writer:
        for item in clouds:
            writer.write(*item)
        return writer.count


def _pick_topic(topics: Mapping[str, str], topic: str | None, path: Path) -> str:
    clouds = sorted(t for t, typ in topics.items() if typ == POINTCLOUD2)
    if topic is None:
        if len(clouds) != 1:
            raise BagError(f"{path}: pass a topic; PointCloud2 topics in the bag: {clouds}")
        return clouds[0]
    if topic not in topics:
        raise BagError(f"{path}: no topic {topic!r}; PointCloud2 topics in the bag: {clouds}")
    if topics[topic] != POINTCLOUD2:
        raise BagError(f"{path}: topic {topic!r} has type {topics[topic]}, not {POINTCLOUD2}")
    return topic


def iter_cloud_messages(
    path: str | Path, topic: str | None = None, *, store: Any = None
) -> Iterator[tuple[int, Any]]:
    """Yield ``(log_time_ns, message)`` for a PointCloud2 topic, in log-time order.

    ``topic=None`` picks the bag's only PointCloud2 topic. Messages are rosbags
    dataclasses, which :mod:`lidar_completion.pointcloud2` reads directly.
    """
    from rosbags.rosbag2 import Reader

    path = Path(path)
    ts = _typestore(store)
    try:
        with Reader(path) as reader:
            topics = {c.topic: c.msgtype for c in reader.connections}
            name = _pick_topic(topics, topic, path)
            conns = [c for c in reader.connections if c.topic == name]
            for conn, log_time, raw in reader.messages(connections=conns):
                try:
                    msg = ts.deserialize_cdr(raw, conn.msgtype)
                except Exception as err:  # a damaged message: say which and where
                    raise BagError(f"{path}: message at {log_time} ns on {name} cannot be decoded as "
                                   f"{conn.msgtype} ({_reason(err)})") from None
                yield log_time, msg
    except BagError:
        raise
    except Exception as err:  # rosbags, mcap, sqlite3 and yaml each raise their own types
        raise BagError(f"{path}: cannot read bag ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def read_clouds(
    path: str | Path, topic: str | None = None, *, store: Any = None
) -> Iterator[BagCloud]:
    """Yield ``BagCloud(stamp_ns, frame_id, xyz)`` for each message of a PointCloud2 topic.

    Any problem (missing, truncated or damaged bag, wrong topic type, unreadable cloud)
    raises :class:`BagError` naming the bag."""
    from lidar_completion.pointcloud2 import CloudError

    for log_time, msg in iter_cloud_messages(path, topic, store=store):
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        try:
            xyz = cloud_to_xyz(msg)
        except CloudError as err:
            raise BagError(f"{path}: cloud at {log_time} ns cannot be read: {err}") from None
        yield BagCloud(int(stamp), str(msg.header.frame_id), xyz)


# --- SemanticKITTI layout -------------------------------------------------------------

_SCAN_NAME = re.compile(r"^(\d+)(\.pcd)?\.bin$")  # NNNNNN.bin (KITTI), NNNNNN.pcd.bin (nuScenes)


def _kitti_stamps(sequence: Path, n: int, rate_hz: float | None, start_ns: int) -> np.ndarray:
    times_file = sequence / "times.txt"
    if rate_hz is None and times_file.is_file():
        seconds = np.loadtxt(times_file, dtype=np.float64, ndmin=1)
        if seconds.size < n:
            raise BagError(f"{times_file} has {seconds.size} lines for {n} scans")
        offsets = np.round(seconds[:n] * 1e9).astype(np.int64)
        offsets -= offsets[0] if n else 0
    else:
        rate = 10.0 if rate_hz is None else float(rate_hz)
        if not rate > 0:
            raise BagError(f"rate_hz must be > 0, got {rate_hz}")
        offsets = np.round(np.arange(n) * (1e9 / rate)).astype(np.int64)
    return start_ns + offsets


def kitti_sequence_to_bag(
    sequence: str | Path,
    out: str | Path,
    *,
    storage: Storage = "mcap",
    topic: str = DEFAULT_TOPIC,
    frame_id: str = "velodyne",
    rate_hz: float | None = None,
    start_ns: int = DEFAULT_START_NS,
    store: Any = None,
    layout: str | None = None,
) -> int:
    """Convert ``sequence/velodyne/NNNNNN.bin`` into a bag of x, y, z, intensity clouds.

    ``layout`` declares the scans' float32 fields (:data:`lidar_completion.io.BIN_LAYOUTS`):
    ``"kitti"`` x, y, z, intensity or ``"nuscenes"`` x, y, z, intensity, ring (the ring goes
    into the bag as a uint16 field); by default ``NNNNNN.pcd.bin`` scans are nuScenes and
    ``NNNNNN.bin`` KITTI. A scan whose size or values do not fit the layout is refused
    (:func:`lidar_completion.io.check_bin`) and no bag is left behind.

    Stamps: ``rate_hz`` if given; else ``times.txt`` (relative to its first line) when
    present; else 10 Hz. All offset by ``start_ns``. Returns the number of scans written.
    """
    sequence = Path(sequence)
    velodyne = sequence / "velodyne"
    if not velodyne.is_dir():
        raise BagError(f"{sequence}: no velodyne/ directory (SemanticKITTI layout expected)")
    scans = sorted((p for p in velodyne.iterdir() if _SCAN_NAME.match(p.name)),
                   key=lambda p: int(p.name.split(".")[0]))
    if not scans:
        raise BagError(f"{velodyne}: no NNNNNN.bin scans")
    try:
        layouts = {bin_layout(p, layout) for p in scans}
    except ValueError as err:
        raise BagError(str(err)) from None
    if len(layouts) > 1:
        raise BagError(f"{velodyne}: both NNNNNN.bin (KITTI) and NNNNNN.pcd.bin (nuScenes) scans; "
                       f"keep one kind or pass the layout")
    (declared,) = layouts
    bad = [p.name for p in scans if p.stat().st_size % declared.record_bytes]
    if bad:  # checked up front so a bad file does not leave a half-written bag
        raise BagError(f"{velodyne}: not N x ({', '.join(declared.fields)}) float32: {bad[:5]}")
    stamps = _kitti_stamps(sequence, len(scans), rate_hz, int(start_ns))
    try:  # the first scan's values too, before a bag is created
        first = read_bin(scans[0], declared)
    except PointFileError as err:
        raise BagError(str(err)) from None

    def clouds() -> Iterator[tuple[int, str, np.ndarray, dict[str, np.ndarray]]]:
        for i, (scan, stamp) in enumerate(zip(scans, stamps, strict=True)):
            values = first if i == 0 else read_bin(scan, declared)
            extra = {"intensity": values[:, 3]}
            if "ring" in declared.fields:
                extra["ring"] = values[:, declared.fields.index("ring")].astype(np.uint16)
            yield int(stamp), frame_id, values[:, :3], extra

    try:
        return write_clouds(out, clouds(), topic, storage, store=store)
    except PointFileError as err:  # a later scan: remove the bag this call created
        shutil.rmtree(out, ignore_errors=True)
        raise BagError(f"{err} (no bag written)") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``lidar-kitti-to-bag``: SemanticKITTI-layout sequence -> rosbag2 bag."""
    parser = argparse.ArgumentParser(
        prog="lidar-kitti-to-bag",
        description="Convert a SemanticKITTI-layout sequence (velodyne/NNNNNN.bin, optional "
        "times.txt) into a rosbag2 bag of sensor_msgs/PointCloud2 (x, y, z, intensity[, ring]).",
    )
    parser.add_argument("--sequence", required=True, type=Path, help="sequence directory")
    parser.add_argument("--out", required=True, type=Path, help="bag directory to create")
    parser.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    parser.add_argument("--topic", default=DEFAULT_TOPIC)
    parser.add_argument("--frame-id", default="velodyne")
    parser.add_argument(
        "--layout", choices=LAYOUT_NAMES, default=None,
        help="fields of the .bin scans: kitti = x y z intensity, nuscenes = x y z intensity ring "
        "(float32); default: NNNNNN.pcd.bin nuscenes, NNNNNN.bin kitti",
    )
    parser.add_argument(
        "--rate-hz", type=float, default=None,
        help="fixed publish rate; default: times.txt if present, else 10 Hz",
    )
    parser.add_argument(
        "--start-sec", type=float, default=DEFAULT_START_NS / 1e9,
        help="stamp of the first scan in seconds (default %(default)s; 0 confuses tf2)",
    )
    args = parser.parse_args(argv)
    try:
        n = kitti_sequence_to_bag(
            args.sequence, args.out, storage=args.storage, topic=args.topic,
            frame_id=args.frame_id, rate_hz=args.rate_hz,
            start_ns=round(args.start_sec * 1e9), layout=args.layout,
        )
    except BagError as exc:
        print(f"lidar-kitti-to-bag: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} scans to {args.out} ({args.storage}, topic {args.topic})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
