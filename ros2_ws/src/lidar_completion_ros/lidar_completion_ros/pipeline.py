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

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidar_completion.diffusion import Cancelled
from lidar_completion.pointcloud2 import CloudError, cloud_to_xyz, finite_points_with, read_fields

from .frames import SensorPose
from .parameters import COMPLETION_KEYS, StartupError, check_values, completion_config, sensor_poses_of
from .timings import ScanTimings

__all__ = ["Cancelled", "InFlight", "Mailbox", "Rejected", "Scan", "Setup", "apply_changes", "describe", "free_device",
           "log_range", "set_up", "complete_scans", "load_completer", "output_arrays", "resolve_checkpoint", "read_scan",
           "synthetic_scan", "warm_up"]


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


def synthetic_scan(config: Any, n: int, seed: int = 0, max_range: float | None = None) -> np.ndarray:
    """A ring of ground and wall points inside the range band (for the warm-up inference);
    ``max_range``: the effective one (the completer's), else ``data.max_range`` or 50 m."""
    rng = np.random.default_rng(seed)
    data = config.data
    low = data.min_range
    high = min(max_range or data.max_range or 50.0, max(30.0, low + 1.0))
    r = rng.uniform(low + 0.05 * (high - low), high - 0.05 * (high - low), n)
    angle = rng.uniform(-np.pi, np.pi, n)
    z = np.where(rng.random(n) < 0.6, -1.73, rng.uniform(-1.7, 2.0, n)) + rng.normal(0, 0.02, n)
    return np.column_stack([r * np.cos(angle), r * np.sin(angle), z]).astype(np.float32)


def resolve_checkpoint(value: str, name: str = "checkpoint") -> Path:
    """Path of the ``checkpoint`` (or ``name``) parameter: an existing path, or a shipped model's name.

    Raises ``FileNotFoundError`` with one line that says what was tried and what exists.
    """
    from lidar_completion import checkpoints

    text = os.path.expandvars(os.path.expanduser(str(value).strip()))
    if not text:
        raise FileNotFoundError(f"parameter '{name}' is empty; set it to a checkpoint path or a shipped model")
    found = checkpoints.find_checkpoint(text)
    if found is not None:
        return found
    shipped_dir, shipped = checkpoints.SHIPPED_MODELS, checkpoints.shipped_models()
    raise FileNotFoundError(
        f"{name} '{value}' not found: no such file or directory, and no model of that name in "
        f"{shipped_dir} (shipped models: {', '.join(shipped) or 'none'})"
    )


def load_completer(values: dict[str, Any], config: Any) -> Any:
    """The completer of the ``checkpoint`` (and ``refine_checkpoint``) parameters with
    ``config`` (:meth:`SceneCompleter.from_checkpoint`; its ``checkpoint`` and
    ``refine_checkpoint`` say which files); ``StartupError`` with one line when a file is
    missing or refused, or the parameters do not fit the model."""
    from lidar_completion.checkpoints import CheckpointError, RefinerError
    from lidar_completion.completer import SceneCompleter

    try:
        path = resolve_checkpoint(values["checkpoint"])
        refine_path = (resolve_checkpoint(values["refine_checkpoint"], "refine_checkpoint")
                       if values["refine_checkpoint"].strip() else None)
    except FileNotFoundError as err:
        raise StartupError(str(err)) from None
    try:
        return SceneCompleter.from_checkpoint(path, config, refine_path)
    except RefinerError as err:
        raise StartupError(f"cannot load refine_checkpoint '{refine_path}': {err}") from None
    except (CheckpointError, OSError) as err:
        raise StartupError(f"cannot load checkpoint '{path}': {err}") from None
    except (ValueError, RuntimeError) as err:
        raise StartupError(f"cannot run '{path}' with these parameters: {err}") from None


def warm_up(completer: Any, log: Any) -> None:
    """One inference at the cheapest setting (1 step, no guidance): it pays the first-call
    costs (allocations, kernel maps, refinement) without the scans' step count, which for
    a published teacher (50 steps, guidance 6) would take minutes on a CPU."""
    from lidar_completion.completer import SceneCompleter

    config = completer.config.replace(**{"sampling.steps": 1, "sampling.guidance": 1.0})
    cheap = SceneCompleter(completer.model, config)
    points = synthetic_scan(config, max(2 * cheap.n_part, 1000), max_range=completer.max_range)
    log(f"warm-up inference: 1 step without guidance (scans run {completer.steps} steps, "
        f"guidance {completer.guidance:g})")
    start = time.perf_counter()
    result = cheap.complete(points)
    log(f"warm-up inference done in {1000 * (time.perf_counter() - start):.0f} ms "
        f"({result.nfe} network call{'s' * (result.nfe != 1)}, {len(points)} -> {len(result.points)} points)")


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


def apply_changes(values: dict[str, Any], changes: dict[str, Any], model: Any, completer: Any):
    """``(values, completer, touched)`` after a run-time parameter change, validated by
    building the core config (and a completer on the loaded ``model``); ``ValueError`` with
    the reason when it does not build."""
    from lidar_completion.completer import SceneCompleter

    values = dict(values)
    for name, value in changes.items():
        if name in values:
            is_int = isinstance(value, int) and not isinstance(value, bool)
            values[name] = float(value) if isinstance(values[name], float) and is_int else value
    touched = set(changes) & set(values)
    check_values(values)
    if touched & set(COMPLETION_KEYS):
        config = completion_config(values)
        completer = SceneCompleter(model, config) if model is not None else None
    return values, completer, touched


@dataclass
class Setup:
    """What configure builds from the parameters (the node keeps it until cleanup)."""

    model: Any
    completer: Any
    checkpoint: Path
    refine_checkpoint: Path | None
    poses: list[SensorPose]


def set_up(values: dict[str, Any], info: Any, warning: Any) -> Setup:
    """Check every parameter (before the slow model load), load the model and build the
    completer, logging what runs; ``StartupError`` with one line for anything wrong."""
    try:
        check_values(values)
        config = completion_config(values)
        poses = sensor_poses_of(values)
    except ValueError as err:
        raise StartupError(f"invalid parameter {err}") from None
    completer = load_completer(values, config)
    model, path, refine_path = completer.model, completer.checkpoint, completer.refine_checkpoint
    c, mc = completer, model.config
    info(f"loaded {path} ({mc.kind}{': ' + mc.description if mc.description else ''}) on {c.device}: "
         f"steps={c.steps} guidance={c.guidance:g} n_part={c.n_part} refine={'on' if config.refine else 'off'}"
         + (f" (refinement net from {refine_path})" if refine_path else ""))
    if refine_path is not None and not config.refine:
        info("refine_checkpoint is loaded but refine is false: set refine to true to use it")
    log_range(completer, warning)
    return Setup(model, completer, path, refine_path, poses)


def log_range(completer: Any, warning: Any) -> None:
    """Say so when the model's radius caps a ``data.max_range`` that was set (0, the
    default, means that radius: nothing to say)."""
    data = completer.config.data
    if data.max_range is not None and completer.max_range < data.max_range:
        warning(f"effective range {data.min_range:g}-{completer.max_range:g} m: data.max_range={data.max_range:g} "
                f"is capped at the radius the model was trained on ({completer.max_range:g} m); "
                f"see max_range_effective in /diagnostics")


def describe(completer: Any) -> str:
    return (f"steps={completer.steps} guidance={completer.guidance:g} n_part={completer.n_part} "
            f"refine={completer.config.refine} range={completer.config.data.min_range:g}-{completer.max_range:g} m")


def free_device(completer: Any) -> None:
    """Give the GPU memory of a released completer back (cleanup)."""
    if completer is not None and completer.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
