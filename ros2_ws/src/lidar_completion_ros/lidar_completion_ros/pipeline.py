"""The node's data path without ROS: a message's points in, a batch out, output arrays back.

* :func:`read_scan` turns a PointCloud2 (rclpy's or any look-alike) into the points the
  model gets, in the model's sensor frame, or raises :class:`Rejected` with a reason;
* :class:`Mailbox` holds the latest scan of each input (one slot each: a newer scan
  replaces a waiting one, which is then dropped) and hands the worker every waiting scan
  as one batch;
* :class:`InFlight` holds the batch the worker is completing, so each of its scans is
  answered (or counted as abandoned at shutdown) exactly once, by whichever thread claims it;
* :func:`output_arrays` lays out a completion for publishing: x, y, z, intensity and
  ``measured`` (1 = a point of the input scan, 0 = completed), in the input's frame.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lidar_completion.diffusion import Cancelled
from lidar_completion.pointcloud2 import CloudError, cloud_to_xyz, finite_points_with, read_fields

from .frames import SensorPose
from .timings import ScanTimings

__all__ = ["Cancelled", "InFlight", "Mailbox", "Rejected", "Scan", "complete_scans", "output_arrays", "read_scan"]


class Rejected(Exception):
    """A scan that is not used; ``reason`` is a key of ``health.REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Scan:
    """A validated scan waiting for the worker."""

    index: int  # which input
    header: Any
    xyz: np.ndarray  # finite points in the model's sensor frame
    pose: SensorPose
    t_enter: float  # perf_counter() on entering the subscription callback
    input_points: int
    intensity: np.ndarray | None = None  # of xyz's points (0 where the cloud has no intensity field)
    nonfinite: int = 0
    subsampled_from: int = 0
    timings: ScanTimings = field(default_factory=ScanTimings)

    def model_input(self) -> np.ndarray:
        """x, y, z (the model's sensor frame) and, when read, intensity: what the core completes."""
        if self.intensity is None:
            return self.xyz
        return np.column_stack([self.xyz, self.intensity]).astype(np.float32, copy=False)

    def repairs(self, max_points: int) -> list[tuple[str, int, str]]:
        """``(counter, NaN/inf points, log line)`` for each repair made to this scan."""
        out = []
        if self.nonfinite:
            out.append(("nonfinite", self.nonfinite, f"dropped {self.nonfinite} NaN/inf points of {self.input_points}"))
        if self.subsampled_from:
            out.append(("subsampled", 0, f"subsampled {self.subsampled_from} points to max_input_points={max_points}"))
        return out

    def model_done(self, result: Any, t_model: float, model_ms: float, batch_size: int) -> ScanTimings:
        """Record the batch's model stage (started at ``t_model``) and the result's counts."""
        tm = self.timings
        tm.wait_ms = 1000 * (t_model - self.t_enter) - tm.convert_ms  # in the slot, not a cost of the node
        tm.model_ms, tm.batch_size, tm.model_stages = model_ms, batch_size, dict(result.timings_ms)
        tm.counts = {"input_points": self.input_points, "nonfinite_points": self.nonfinite,
                     "used_points": result.used_points, "model_points": result.model_points,
                     "output_points": len(result.points), "completed_points": result.completed_points,
                     "clipped_predictions": result.clipped, "steps": result.steps, "nfe": result.nfe,
                     "batch_size": batch_size}
        return tm


def _intensity(msg: Any, n: int) -> np.ndarray:
    if not any(f.name == "intensity" for f in msg.fields):
        return np.zeros(n, np.float32)
    values = read_fields(msg, ["intensity"])["intensity"]
    return (values[:, 0] if values.ndim > 1 else values).astype(np.float32)


def read_scan(msg: Any, index: int, pose: SensorPose, t_enter: float, *, min_points: int, max_points: int,
              rng: np.random.Generator, keep_intensity: bool = True) -> Scan:
    """Check and convert ``msg``; raises :class:`Rejected`. Repairs (NaN/inf points dropped,
    a too-large cloud subsampled) are recorded on the scan for the caller to count."""
    header = msg.header
    if not pose.accepts(header.frame_id):
        raise Rejected("frame", f"frame_id '{header.frame_id}', expected '{pose.frame_id}' (frame.input_frames)")
    if int(msg.width) * int(msg.height) == 0:
        raise Rejected("empty", f"width={msg.width} height={msg.height}")
    try:
        xyz = cloud_to_xyz(msg)
        intensity = _intensity(msg, len(xyz)) if keep_intensity else None
    except CloudError as err:
        raise Rejected("layout", str(err)) from None
    n_input = len(xyz)
    xyz, intensity, n_bad = finite_points_with(xyz, intensity)
    if len(xyz) < min_points:
        # The whole cloud is dropped: its NaN/inf points are named here, not counted as repairs.
        bad = f" ({n_bad} NaN/inf of {n_input} dropped)" if n_bad else ""
        raise Rejected("too_small", f"{len(xyz)} finite points{bad}, min_input_points is {min_points}")
    subsampled_from = 0
    if len(xyz) > max_points:
        subsampled_from = len(xyz)
        keep = np.sort(rng.choice(len(xyz), max_points, replace=False))
        xyz = xyz[keep]
        intensity = intensity[keep] if intensity is not None else None
    scan = Scan(index, header, pose.to_model(xyz), pose, t_enter, n_input, intensity, n_bad, subsampled_from)
    scan.timings.convert_ms = 1000 * (time.perf_counter() - t_enter)
    return scan


def output_arrays(result: Any, scan: Scan) -> tuple[np.ndarray, dict]:
    """x, y, z in the input's frame and the extra fields to publish: ``intensity`` (the scan's
    own; 0 for completed points, the model predicts none) and ``measured`` (1 = a point of
    the input scan, 0 = completed), from the core's composed result."""
    xyz = np.ascontiguousarray(scan.pose.from_model(result.points), dtype=np.float32)
    return xyz, {"intensity": result.intensity.astype(np.float32), "measured": result.measured.astype(np.uint8)}


class Mailbox:
    """One latest-only slot per input; the worker takes every waiting scan as one batch."""

    def __init__(self, n_inputs: int) -> None:
        self._slots: list[Scan | None] = [None] * n_inputs
        self._cv = threading.Condition()
        self._closed = False

    def put(self, scan: Scan) -> Scan | None:
        """Leave ``scan`` in its input's slot; the scan it replaced (now dropped), if any."""
        with self._cv:
            stale, self._slots[scan.index] = self._slots[scan.index], scan
            self._cv.notify_all()
            return stale

    def take(self, gather_s: float = 0.0) -> list[Scan] | None:
        """Block until a scan waits, then up to ``gather_s`` more for the other inputs' slots
        to fill; empty every slot and return the scans (None once closed)."""
        with self._cv:
            while not self._closed and not any(self._slots):
                self._cv.wait()
            deadline = time.monotonic() + gather_s
            while not self._closed and not all(self._slots) and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            if self._closed:
                return None
            batch = [s for s in self._slots if s is not None]
            self._slots = [None] * len(self._slots)
            return batch

    def close(self) -> list[Scan]:
        """Wake the worker for good; the scans still waiting (they go unanswered)."""
        with self._cv:
            self._closed = True
            left = [s for s in self._slots if s is not None]
            self._slots = [None] * len(self._slots)
            self._cv.notify_all()
            return left

    def reopen(self) -> None:
        with self._cv:
            self._closed = False


class InFlight:
    """The scans of the batch being completed that nobody has answered yet. The worker
    claims a scan before it publishes or rejects it; a shutdown that cannot wait for the
    worker claims what is left and counts it as abandoned. A scan claimed once is never
    claimed again, so every scan is counted once, whichever thread gets there first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scans: list[Scan] = []

    def start(self, batch: list[Scan]) -> None:
        with self._lock:
            self._scans = list(batch)

    def claim(self, scan: Scan) -> bool:
        """True once for a scan of the batch (the caller answers it), False after that."""
        with self._lock:
            for i, waiting in enumerate(self._scans):
                if waiting is scan:
                    del self._scans[i]
                    return True
            return False

    def claim_all(self) -> list[Scan]:
        """The scans nobody has claimed yet (now claimed by the caller); the batch is over."""
        with self._lock:
            left, self._scans = self._scans, []
            return left


def complete_scans(completer: Any, batch: list[Scan], out_of_range: Any, should_stop: Any = None) -> list:
    """Completions of a batch in one ``complete_batch`` call; a scan with no point in the
    range band gets None (after ``out_of_range(scan, why)``) and the others are still done.
    :class:`Cancelled` when ``should_stop()`` turns true between two sampler steps."""
    from lidar_completion.completer import ScanError

    try:
        return completer.complete_batch([s.model_input() for s in batch], should_stop)
    except ScanError:
        results = []
        for scan in batch:
            try:
                results.append(completer.complete(scan.model_input(), should_stop))
            except ScanError as err:
                results.append(None)
                out_of_range(scan, str(err))
        return results
