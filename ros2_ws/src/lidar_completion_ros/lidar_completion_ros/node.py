"""ROS 2 node: completes each LiDAR scan into a dense scene, same frame and stamp.

    ros2 run lidar_completion_ros completion_node --ros-args --params-file completion_node.yaml
    python -m lidar_completion_ros.node --ros-args -p checkpoint:=/models/student -r points_raw:=/velodyne_points

Topics (relative, so remappable and namespaced):

* ``points_raw`` (sub, sensor_msgs/PointCloud2, SensorData QoS by default) -- the scan;
* ``points_completed`` (pub, PointCloud2 x/y/z float32) -- the completion, header copied;
* ``/diagnostics`` (pub, diagnostic_msgs/DiagnosticArray) -- device, model, rates, times,
  dropped/rejected counters; WARN when slow, dropping or rejecting, ERROR when it persists;
* ``~/debug/processing_time_ms``, ``~/debug/model_time_ms``, ``~/debug/overhead_ms``,
  ``~/debug/wait_ms`` (std_msgs/Float64) -- per scan: subscription callback entry to
  ``publish`` return, the model's share, the node's own cost (convert + build + publish),
  and the time the scan waited for the worker to finish the previous one;
* ``~/debug/timings`` (DiagnosticArray, header = the scan's) -- every stage of one scan.

Threading: the subscription callback only validates and converts the message (a few ms)
and puts the points in a one-slot mailbox; a worker thread runs the model. A scan that
arrives while the previous one still waits in the mailbox replaces it (the stale one is
counted as dropped), so a slow model never builds a queue. Bad input is rejected or
repaired with one throttled log line and a counter; the node never dies of a bad message.

Start-up problems (bad parameter, missing or broken checkpoint) end the process with one
``FATAL`` line and exit status 2. SIGINT/SIGTERM end it cleanly with exit status 0.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: a spinning OpenMP pool is catastrophic when the CPU is shared
# (measured here: 62 s instead of 0.24 s per scan with one core busy elsewhere). The node
# always shares the CPU (driver, other nodes), so wait passively unless told otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
    ParameterException,
)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Float64

from lidar_completion.pointcloud2 import CloudError, build_cloud, cloud_to_xyz, finite_points

from .messages import qos_profile, stamp_ns
from .parameters import (
    COMPLETION_KEYS,
    PARAMETERS,
    ParamSpec,
    check_values,
    completion_config,
    resolve_checkpoint,
)

__all__ = ["CompletionNode", "StartupError", "PARAMETERS", "NODE_NAME", "REJECT_REASONS", "main"]

NODE_NAME = "completion_node"
INPUT_TOPIC = "points_raw"
OUTPUT_TOPIC = "points_completed"

#: Why a scan was rejected (each has a diagnostics counter ``rejected.<reason>``).
REJECT_REASONS = {
    "empty": "cloud has no points",
    "layout": "cloud layout cannot be read",
    "too_small": "too few finite points",
    "out_of_range": "no point within the range band",
    "error": "unexpected error",
}
#: Scans that were changed and then used (counter ``repaired.<reason>``).
REPAIR_REASONS = ("nonfinite", "subsampled")
# Parameters rclpy declares itself, and prefixes it owns; not "unknown" in a params file.
_BUILTIN_PARAMETERS = ("use_sim_time", "start_type_description_service")
_BUILTIN_PREFIXES = ("qos_overrides.",)


class StartupError(RuntimeError):
    """The node cannot start; the message is the one line shown to the user."""


@dataclass
class _Scan:
    """A validated scan waiting for the worker."""

    header: Any
    xyz: np.ndarray
    t_enter: float  # perf_counter() on entering the subscription callback
    convert_ms: float
    input_points: int
    nonfinite: int = 0
    subsampled_from: int = 0


@dataclass
class _Stats:
    """Counters and recent timings, shared by the callback, the worker and diagnostics."""

    counts: dict[str, int] = field(default_factory=dict)
    recent: deque = field(default_factory=lambda: deque(maxlen=100))  # (t, processing, model, overhead, wait)
    received_times: deque = field(default_factory=lambda: deque(maxlen=200))
    last_input: float | None = None

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(
        name=spec.name,
        description=spec.description,
        additional_constraints=spec.constraints,
        read_only=spec.read_only,
    )
    if spec.range is not None:
        low, high = spec.range
        if isinstance(spec.default, float):
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]
        else:
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
    return descriptor


def synthetic_scan(config: Any, n: int, seed: int = 0, max_range: float | None = None) -> np.ndarray:
    """A ring of ground and wall points inside the range band (for the warm-up inference);
    ``max_range``: the effective one, when the model caps ``data.max_range``."""
    rng = np.random.default_rng(seed)
    data = config.data
    low = data.min_range
    high = min(data.max_range, max_range or data.max_range, max(30.0, low + 1.0))
    r = rng.uniform(low + 0.05 * (high - low), high - 0.05 * (high - low), n)
    angle = rng.uniform(-np.pi, np.pi, n)
    z = np.where(rng.random(n) < 0.6, -1.73, rng.uniform(-1.7, 2.0, n)) + rng.normal(0, 0.02, n)
    return np.column_stack([r * np.cos(angle), r * np.sin(angle), z]).astype(np.float32)


class CompletionNode(Node):
    """Subscribes to ``points_raw``, publishes the completed scene on ``points_completed``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        try:
            self._setup()
        except BaseException:
            self._stop_worker()
            self.destroy_node()
            raise

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        self._stats = _Stats()
        self._lock = threading.Lock()  # guards _stats and the mailbox
        self._wakeup = threading.Condition(self._lock)
        self._pending: _Scan | None = None
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._worker_error: str | None = None
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._problem_since: float | None = None
        self._last_diag_counts: dict[str, int] = {}

        self._values = self._declare_parameters()
        self._check_unknown_overrides()
        try:  # every value, before the (slow) model load
            check_values(self._values)
            config = completion_config(self._values)
        except ValueError as err:
            raise StartupError(f"invalid parameter {err}") from None
        try:
            path = resolve_checkpoint(self._values["checkpoint"])
            refine_path = (resolve_checkpoint(self._values["refine_checkpoint"], "refine_checkpoint")
                           if self._values["refine_checkpoint"].strip() else None)
        except FileNotFoundError as err:
            raise StartupError(str(err)) from None

        from lidar_completion.checkpoints import CheckpointError, load_model, with_refiner

        try:
            self._model = load_model(path)
        except (CheckpointError, OSError, ValueError) as err:
            raise StartupError(f"cannot load checkpoint '{path}': {err}") from None
        if refine_path is not None:
            try:
                self._model = with_refiner(self._model, refine_path)
            except (CheckpointError, OSError, ValueError) as err:
                raise StartupError(f"cannot load refine_checkpoint '{refine_path}': {err}") from None
        try:
            self._completer = self._make_completer(config)
        except (ValueError, RuntimeError) as err:
            raise StartupError(f"cannot run '{path}' with these parameters: {err}") from None
        self._checkpoint = path
        self._refine_checkpoint = refine_path
        self._rng = np.random.default_rng(None if self._values["sampling.seed"] < 0 else self._values["sampling.seed"])
        mc = self._model.config
        self._model_name = f"{path.name} ({mc.kind}, channel_ratio {mc.channel_ratio:g})"
        self.get_logger().info(
            f"loaded {path} ({mc.kind}{': ' + mc.description if mc.description else ''}) on "
            f"{self._completer.device}: steps={self._completer.steps} guidance={self._completer.guidance:g} "
            f"n_part={self._completer.n_part} refine={'on' if config.refine else 'off'}"
            + (f" (refinement net from {refine_path})" if refine_path is not None else "")
        )
        if refine_path is not None and not config.refine:
            self.get_logger().info("refine_checkpoint is loaded but refine is false: set refine to true to use it")
        self._log_range(self._completer)

        v = self._values
        self._pub = self.create_publisher(
            PointCloud2, OUTPUT_TOPIC, qos_profile(v["qos.output.reliability"], v["qos.output.depth"])
        )
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._debug_pubs = {
            name: self.create_publisher(Float64, f"~/debug/{name}", 10)
            for name in ("processing_time_ms", "model_time_ms", "overhead_ms", "wait_ms")
        }
        self._timings_pub = self.create_publisher(DiagnosticArray, "~/debug/timings", 10)

        if v["warmup"]:
            try:
                self._warmup()
            except Exception as err:  # e.g. CUDA out of memory: say so in one line
                raise StartupError(f"warm-up inference failed: {type(err).__name__}: {err}") from None
        self._worker = threading.Thread(target=self._work, name="completion_worker", daemon=True)
        self._worker.start()
        self._sub = self.create_subscription(
            PointCloud2, INPUT_TOPIC, self._on_cloud, qos_profile(v["qos.input.reliability"], v["qos.input.depth"])
        )
        self._diag_timer = self.create_timer(v["diagnostics.period"], self._publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.get_logger().info(
            f"ready: {self._sub.topic_name} -> {self._pub.topic_name} "
            f"(input QoS {v['qos.input.reliability']}/{v['qos.input.depth']}, "
            f"output QoS {v['qos.output.reliability']}/{v['qos.output.depth']})"
        )

    def _make_completer(self, config: Any) -> Any:
        """A completer on the loaded model; ``ValueError`` when ``config`` does not fit the
        model (e.g. ``data.min_range`` beyond the radius the model completes)."""
        from lidar_completion.completer import SceneCompleter
        from lidar_completion.config import effective_range

        effective_range(config.data, self._model.config.max_range)
        return SceneCompleter(self._model, config)

    def _log_range(self, completer: Any) -> None:
        data = completer.config.data
        if completer.max_range < data.max_range:
            self.get_logger().warn(
                f"effective range {data.min_range:g}-{completer.max_range:g} m: data.max_range={data.max_range:g} is "
                f"capped at the radius the model was trained on ({completer.max_range:g} m); "
                f"see max_range_effective in /diagnostics"
            )

    def _declare_parameters(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in PARAMETERS:
            try:
                param = self.declare_parameter(spec.name, spec.default, _descriptor(spec))
            except InvalidParameterTypeException:
                given = self._overrides().get(spec.name)
                value = given.value if given is not None else "?"
                is_int = isinstance(value, int) and not isinstance(value, bool)
                hint = f" (write {float(value)!r})" if isinstance(spec.default, float) and is_int else ""
                raise StartupError(
                    f"invalid parameter {spec.name}: expected {spec.type_name}, got "
                    f"{type(value).__name__} {value!r}{hint}"
                ) from None
            except InvalidParameterValueException:
                given = self._overrides().get(spec.name)
                raise StartupError(
                    f"invalid parameter {spec.name}: {given.value if given else '?'!r} is outside "
                    f"{spec.constraints}"
                ) from None
            except ParameterException as err:
                raise StartupError(f"invalid parameter {spec.name}: {err}") from None
            values[spec.name] = param.value
        return values

    def _overrides(self) -> dict[str, Parameter]:
        # rclpy keeps the --params-file / -p values here; there is no public getter.
        return dict(getattr(self, "_parameter_overrides", {}) or {})

    def _check_unknown_overrides(self) -> None:
        known = {spec.name for spec in PARAMETERS} | set(_BUILTIN_PARAMETERS)
        unknown = sorted(
            name for name in self._overrides()
            if name not in known and not name.startswith(_BUILTIN_PREFIXES)
        )
        if unknown:
            raise StartupError(
                f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(s.name for s in PARAMETERS)}"
            )

    def _warmup(self) -> None:
        """One inference at the cheapest setting (1 step, no guidance): it pays the first-call
        costs (allocations, kernel maps, refinement) without the scans' step count, which for
        a published teacher (50 steps, guidance 6) would take minutes on a CPU."""
        from lidar_completion.completer import SceneCompleter

        completer = self._completer
        config = completer.config.replace(**{"sampling.steps": 1, "sampling.guidance": 1.0})
        cheap = SceneCompleter(self._model, config)
        points = synthetic_scan(config, max(2 * cheap.n_part, 1000), max_range=completer.max_range)
        self.get_logger().info(
            f"warm-up inference: 1 step without guidance (scans run {completer.steps} steps, "
            f"guidance {completer.guidance:g})"
        )
        start = time.perf_counter()
        result = cheap.complete(points)
        # The node's own stages too, so the first real scan pays no first-call costs.
        header = self._make_header()
        cloud_to_xyz(build_cloud(result.points, header, PointCloud2, PointField))
        self.get_logger().info(
            f"warm-up inference done in {1000 * (time.perf_counter() - start):.0f} ms "
            f"({result.nfe} network call{'s' * (result.nfe != 1)}, {len(points)} -> {len(result.points)} points)"
        )

    def _make_header(self) -> Any:
        from std_msgs.msg import Header

        return Header(frame_id="velodyne", stamp=self.get_clock().now().to_msg())

    # ------------------------------------------------------------------ parameters at run time
    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Validate changes by building the core config; apply them if it builds."""
        values = dict(self._values)
        for param in params:
            if param.name not in values:
                continue
            value = param.value
            if isinstance(values[param.name], float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            values[param.name] = value
        touched = {p.name for p in params}
        completer = self._completer
        try:
            check_values(values)
            if touched & set(COMPLETION_KEYS):
                completer = self._make_completer(completion_config(values))
        except (ValueError, RuntimeError) as err:
            return SetParametersResult(successful=False, reason=str(err))
        with self._lock:
            self._values = values
            self._completer = completer
            if "sampling.seed" in touched:
                seed = values["sampling.seed"]
                self._rng = np.random.default_rng(None if seed < 0 else seed)
        if touched & set(COMPLETION_KEYS):
            self.get_logger().info(
                f"parameters changed: steps={completer.steps} guidance={completer.guidance:g} "
                f"n_part={completer.n_part} refine={completer.config.refine} "
                f"range={completer.config.data.min_range:g}-{completer.max_range:g} m"
            )
            self._log_range(completer)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ logging helpers
    def _throttled(self, key: str, message: str, level: str = "warn") -> None:
        """At most one line per ``key`` per ``log_throttle_s``, saying how many were suppressed."""
        if not self.context.ok():  # shutting down: rosout is gone, and so is the reader
            return
        now = time.monotonic()
        period = self._values["log_throttle_s"]
        last = self._last_log.get(key)
        if last is not None and now - last < period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        suppressed = self._suppressed.pop(key, 0)
        self._last_log[key] = now
        if suppressed:
            message += f" ({suppressed} more like this in the last {now - last:.0f} s)"
        getattr(self.get_logger(), level)(message)

    def _reject(self, reason: str, detail: str, header: Any = None) -> None:
        with self._lock:
            self._stats.add("rejected")
            self._stats.add(f"rejected.{reason}")
        where = f" (stamp {stamp_ns(header) / 1e9:.3f}, frame '{header.frame_id}')" if header is not None else ""
        self._throttled(f"reject.{reason}", f"rejected scan{where}: {REJECT_REASONS[reason]}: {detail}")

    # ------------------------------------------------------------------ subscription callback
    def _on_cloud(self, msg: PointCloud2) -> None:
        t_enter = time.perf_counter()
        with self._lock:
            self._stats.add("received")
            self._stats.last_input = time.monotonic()
            self._stats.received_times.append(self._stats.last_input)
        try:
            if self._values["skip_without_subscribers"] and self._pub.get_subscription_count() == 0:
                with self._lock:
                    self._stats.add("skipped")
                self._throttled("skipped", f"no subscriber on {self._pub.topic_name}: skipping inference", "info")
                return
            scan = self._validate(msg, t_enter)
        except Exception as err:  # never let one message take the node down
            self._reject("error", f"{type(err).__name__}: {err}", getattr(msg, "header", None))
            return
        if scan is None:
            return
        with self._wakeup:
            if self._pending is not None:
                stale = self._pending
                self._stats.add("dropped")
                self._throttled(
                    "dropped",
                    f"dropped stale scan (stamp {stamp_ns(stale.header) / 1e9:.3f}): the model is slower "
                    f"than the input rate; only the latest scan is processed",
                )
            self._pending = scan
            self._wakeup.notify()

    def _validate(self, msg: PointCloud2, t_enter: float) -> _Scan | None:
        """Points of ``msg`` ready for the model, or None after a counted rejection."""
        header = msg.header
        if int(msg.width) * int(msg.height) == 0:
            self._reject("empty", f"width={msg.width} height={msg.height}", header)
            return None
        try:
            xyz = cloud_to_xyz(msg)
        except CloudError as err:
            self._reject("layout", str(err), header)
            return None
        n_input = len(xyz)
        xyz, n_bad = finite_points(xyz)
        if n_bad:
            with self._lock:
                self._stats.add("repaired.nonfinite")
                self._stats.add("nonfinite_points", n_bad)
            self._throttled("nonfinite", f"dropped {n_bad} NaN/inf points of {n_input}", "info")
        minimum, maximum = self._values["min_input_points"], self._values["max_input_points"]
        if len(xyz) < minimum:
            self._reject("too_small", f"{len(xyz)} finite points, min_input_points is {minimum}", header)
            return None
        subsampled_from = 0
        if len(xyz) > maximum:
            subsampled_from = len(xyz)
            keep = np.sort(self._rng.choice(len(xyz), maximum, replace=False))
            xyz = xyz[keep]
            with self._lock:
                self._stats.add("repaired.subsampled")
            self._throttled("subsampled", f"subsampled {subsampled_from} points to max_input_points={maximum}", "info")
        convert_ms = 1000 * (time.perf_counter() - t_enter)
        return _Scan(header, xyz, t_enter, convert_ms, n_input, n_bad, subsampled_from)

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            with self._wakeup:
                while self._pending is None and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                scan, self._pending = self._pending, None
            try:
                self._process(scan)
            except Exception as err:
                if self._stopping or not self.context.ok():  # shutting down: the scan goes unanswered
                    with self._lock:
                        self._stats.add("dropped")
                    return
                self._worker_error = f"{type(err).__name__}: {err}"
                self._reject("error", self._worker_error, scan.header)
                self._throttled("traceback", traceback.format_exc(), "debug")

    def _process(self, scan: _Scan) -> None:
        from lidar_completion.completer import ScanError

        completer = self._completer
        t_model = time.perf_counter()
        try:
            result = completer.complete(scan.xyz)
        except ScanError as err:
            self._reject("out_of_range", str(err), scan.header)
            return
        t_build = time.perf_counter()
        out = build_cloud(result.points, scan.header, PointCloud2, PointField)
        t_publish = time.perf_counter()
        self._pub.publish(out)
        t_end = time.perf_counter()

        processing_ms = 1000 * (t_end - scan.t_enter)
        model_ms = 1000 * (t_build - t_model)
        # Time the scan spent in the mailbox while the worker finished the previous one: part
        # of its latency, but not a cost of the node's code.
        wait_ms = 1000 * (t_model - scan.t_enter) - scan.convert_ms
        overhead_ms = processing_ms - model_ms - wait_ms  # convert + build + publish
        with self._lock:
            self._stats.add("completed")
            self._stats.recent.append((time.monotonic(), processing_ms, model_ms, overhead_ms, wait_ms))
        try:  # the scan is answered: trouble with the debug topics must not count against it
            self._publish_debug(scan, result, completer, processing_ms, model_ms, overhead_ms, wait_ms,
                                t_build, t_publish, t_end)
        except Exception as err:
            if self.context.ok() and not self._stopping:
                self._throttled("debug", f"could not publish debug timings: {type(err).__name__}: {err}")

    def _publish_debug(self, scan: _Scan, result: Any, completer: Any, processing_ms: float, model_ms: float,
                       overhead_ms: float, wait_ms: float, t_build: float, t_publish: float, t_end: float) -> None:
        for name, value in (("processing_time_ms", processing_ms), ("model_time_ms", model_ms),
                            ("overhead_ms", overhead_ms), ("wait_ms", wait_ms)):
            self._debug_pubs[name].publish(Float64(data=value))
        stages = {
            "processing_ms": processing_ms,
            "model_ms": model_ms,
            "overhead_ms": overhead_ms,
            "convert_ms": scan.convert_ms,
            "wait_ms": wait_ms,
            **{f"model.{k}_ms": v for k, v in result.timings_ms.items()},
            "build_ms": 1000 * (t_publish - t_build),
            "publish_ms": 1000 * (t_end - t_publish),
        }
        counts = {"input_points": scan.input_points, "nonfinite_points": scan.nonfinite,
                  "used_points": result.used_points, "output_points": len(result.points),
                  "steps": result.steps, "nfe": result.nfe}
        status = DiagnosticStatus(
            level=DiagnosticStatus.OK, name=f"{self.get_fully_qualified_name()}: scan timings",
            message=f"{processing_ms:.1f} ms", hardware_id=str(completer.device),
            values=[KeyValue(key=k, value=f"{v:.3f}") for k, v in stages.items()]
            + [KeyValue(key=k, value=str(v)) for k, v in counts.items()],
        )
        self._timings_pub.publish(DiagnosticArray(header=scan.header, status=[status]))
        self.get_logger().debug(
            f"scan {stamp_ns(scan.header) / 1e9:.3f}: {scan.input_points} -> {len(result.points)} points, "
            f"{processing_ms:.1f} ms (model {model_ms:.1f}, overhead {overhead_ms:.2f})"
        )
        if self._stats.get("completed") == 1:
            self.get_logger().info(
                f"first completed scan published: {scan.input_points} -> {len(result.points)} points "
                f"in {processing_ms:.0f} ms"
            )

    # ------------------------------------------------------------------ diagnostics
    def counters(self) -> dict[str, int]:
        """Snapshot of every counter (zeros included)."""
        keys = ["received", "completed", "dropped", "skipped", "rejected",
                *(f"rejected.{r}" for r in REJECT_REASONS), *(f"repaired.{r}" for r in REPAIR_REASONS),
                "nonfinite_points"]
        with self._lock:
            return {k: self._stats.get(k) for k in keys}

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        v = self._values
        counts = self.counters()
        with self._lock:
            recent = list(self._stats.recent)
            received_times = list(self._stats.received_times)
            last_input = self._stats.last_input
        window = 5.0
        in_rate = sum(1 for t in received_times if now - t <= window) / window
        out_rate = sum(1 for r in recent if now - r[0] <= window) / window
        latest = [r for r in recent if now - r[0] <= max(window, 3 * v["diagnostics.period"])]
        mean_ms = float(np.mean([r[1] for r in latest])) if latest else 0.0

        problems = []
        previous = self._last_diag_counts or {k: 0 for k in counts}
        grew = {k: counts[k] - previous.get(k, 0) for k in counts}
        if self._worker is not None and not self._worker.is_alive() and not self._stopping:
            problems.append("worker thread died")
        if latest and mean_ms > v["diagnostics.warn_processing_ms"]:
            problems.append(f"slow: {mean_ms:.0f} ms per scan > {v['diagnostics.warn_processing_ms']:g} ms")
        if grew["dropped"]:
            problems.append(f"dropped {grew['dropped']} stale scans (model slower than input)")
        if grew["rejected"]:
            problems.append(f"rejected {grew['rejected']} scans")
        if grew["rejected.error"]:
            problems.append(f"errors: {self._worker_error or 'see log'}")
        if last_input is not None and now - last_input > v["diagnostics.stale_input_s"]:
            problems.append(f"no scan for {now - last_input:.1f} s")
        self._last_diag_counts = counts

        if not problems:
            self._problem_since = None
            level = DiagnosticStatus.OK
            message = f"ok: {out_rate:.1f} scans/s" if last_input is not None else "waiting for scans"
        else:
            self._problem_since = self._problem_since or now
            persistent = now - self._problem_since >= v["diagnostics.error_after_s"]
            level = DiagnosticStatus.ERROR if persistent or "worker thread died" in problems else DiagnosticStatus.WARN
            message = "; ".join(problems)
        completer = self._completer
        values = {
            "device": str(completer.device),
            "checkpoint": str(self._checkpoint),
            "model": self._model_name,
            "steps": str(completer.steps),
            "guidance": f"{completer.guidance:g}",
            "n_part": str(completer.n_part),
            "refine": str(completer.config.refine).lower(),
            "refine_checkpoint": str(self._refine_checkpoint or ""),
            "min_range": f"{completer.config.data.min_range:g}",
            "max_range": f"{completer.config.data.max_range:g}",
            "max_range_model": f"{self._model.config.max_range:g}" if self._model.config.max_range else "",
            "max_range_effective": f"{completer.max_range:g}",
            "input_topic": self._sub.topic_name,
            "output_topic": self._pub.topic_name,
            "output_subscribers": str(self._pub.get_subscription_count()),
            "input_rate_hz": f"{in_rate:.2f}",
            "output_rate_hz": f"{out_rate:.2f}",
            "processing_time_ms": f"{recent[-1][1]:.1f}" if recent else "",
            "processing_time_mean_ms": f"{mean_ms:.1f}",
            "model_time_ms": f"{recent[-1][2]:.1f}" if recent else "",
            "overhead_ms": f"{recent[-1][3]:.2f}" if recent else "",
            "wait_ms": f"{recent[-1][4]:.1f}" if recent else "",
            **{k: str(n) for k, n in counts.items()},
        }
        status = DiagnosticStatus(
            level=level, name=f"lidar_completion: {self.get_fully_qualified_name()}", message=message,
            hardware_id=str(completer.device), values=[KeyValue(key=k, value=x) for k, x in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    # ------------------------------------------------------------------ shutdown
    def _stop_worker(self, timeout: float = 30.0) -> None:
        wakeup = getattr(self, "_wakeup", None)
        if wakeup is None:
            return
        with wakeup:
            self._stopping = True
            wakeup.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def close(self) -> dict[str, int]:
        """Stop the worker (finishing the scan in flight) and return the final counters.

        A scan still waiting for the worker counts as dropped, so that at exit
        ``received == completed + dropped + skipped + rejected``.
        """
        self._stop_worker()
        with self._lock:
            if self._pending is not None:
                self._pending = None
                self._stats.add("dropped")
        return self.counters()


def summary_line(counts: dict[str, int]) -> str:
    """``summary: received=5 completed=5 ...`` (tests and the demo parse it)."""
    return "summary: " + " ".join(f"{k}={n}" for k, n in counts.items())


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM: exit status 0, or 2 when it cannot start."""
    rclpy.init(args=args)
    logger = rclpy.logging.get_logger(NODE_NAME)
    executor = SingleThreadedExecutor()  # before the slow start-up, while the context is surely valid
    node: CompletionNode | None = None
    status = 0
    try:
        node = CompletionNode()
        executor.add_node(node)
        executor.spin()
    except StartupError as err:
        logger.fatal(f"cannot start: {err}")
        status = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise
        # A signal shut the context down mid-start-up or between start-up and spin: a clean stop.
    finally:
        if node is not None:
            counts = node.close()
            print(f"[{NODE_NAME}] {summary_line(counts)}", file=sys.stderr, flush=True)
            try:
                node.destroy_node()
            except Exception:  # the context may already be shut down by the signal handler
                pass
        rclpy.try_shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
