"""ROS 2 managed (lifecycle) node: completes LiDAR scans into dense scenes, same frame and stamp.

    ros2 run lidar_completion_ros completion_node --ros-args --params-file completion_node.yaml

configure = check parameters, load the model, warm up; activate = subscribe and publish;
deactivate = stop; cleanup = free the model; shutdown = finalized, and the process exits
(``autostart``: configure + activate at start). This is the ROS part only; settings.py
(the parameters as one checked, typed object), startup.py (model loading), pipeline.py,
frames.py, health.py and timings.py hold the rest. Exit status (runtime.py): 0 on
SIGINT/SIGTERM and after the shutdown transition (the scan in flight is abandoned between
two sampler steps), 2 when it cannot start, 3 after ``max_consecutive_failures`` failed
inferences. Topics, parameters, diagnostics: docs/ros.md.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning OpenMP workers on a shared CPU made a scan 62 s, not 0.24 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Float64

from lidar_completion.pointcloud2 import build_cloud

from .health import REJECT_REASONS, Health, Throttle, model_values
from .messages import describe_qos, qos_profile, stamp_ns
from .parameters import COMPLETION_KEYS, PARAMETERS, StartupError
from .pipeline import Cancelled, InFlight, Mailbox, Rejected, complete_scans, output_arrays, read_scan
from .ros_parameters import declare_parameters, parameter_values
from .runtime import run_managed_node, summary_line  # noqa: F401  (summary_line: part of the module's API)
from .settings import NodeSettings, node_settings, settings_from
from .startup import apply_changes, describe, free_device, log_range, set_up, warm_up
from .tf_poses import TfPoses
from .timings import ScanTimings

if TYPE_CHECKING:
    from rclpy.timer import Timer

__all__ = ["CompletionNode", "StartupError", "PARAMETERS", "NODE_NAME", "REJECT_REASONS", "main"]

NODE_NAME = "completion_node"
INPUT_TOPIC, OUTPUT_TOPIC = "points_raw", "points_completed"
DEBUG_SCALARS = tuple(ScanTimings().scalars())  # ~/debug/<name>, std_msgs/Float64
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
#: Shutting down, how long to wait for the worker to reach its next sampler step (where it
#: abandons the batch); one network call longer than this is left behind (runtime.py).
SHUTDOWN_WAIT_S = 3.0
#: Deactivating, how long to wait for the batch in flight to finish and be published.
DEACTIVATE_WAIT_S = 60.0


class CompletionNode(LifecycleNode):
    """``input_topics`` (PointCloud2) -> one batch on one model -> ``output_topics``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        declared = declare_parameters(self)  # types and ranges; the rest is checked at configure
        self.autostart = bool(declared["autostart"])
        self._settings: NodeSettings | None = None  # built by configure
        self.configure_error = self.fatal = ""  # why configure failed; why to exit (worker)
        self.finalized = False  # the shutdown transition ran: the process exits (runtime.py)
        self._completer: Any = None  # a SceneCompleter once configured
        self._model: Any = None
        self._diag_timer: Timer | None = None
        self._worker: threading.Thread | None = None
        self._tf: TfPoses | None = None
        self._left_behind: threading.Thread | None = None  # a worker that did not stop in time
        self._cancel, self._in_flight = threading.Event(), InFlight()
        self._subs: list[Any] = []  # rclpy Subscriptions
        self._pubs: list[Any] = []  # lifecycle Publishers
        self._debug: dict[str, Any] = {}  # lifecycle Publishers by scalar name
        self._active, self._throttle = False, Throttle()
        self._health = Health([self.resolve_topic_name(t) for t in declared["input_topics"]])
        self._mailbox = Mailbox(len(declared["input_topics"]))
        self._last_publish: dict[int, float] = {}  # input index -> when its last output went out
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def on_configure(self, state: Any) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as err:  # StartupError: one line; anything else: say what it was
            self.configure_error = str(err) if isinstance(err, StartupError) else f"{type(err).__name__}: {err}"
            if not self.autostart:  # with autostart, main() prints it as the FATAL line
                self.get_logger().error(f"configure failed: {self.configure_error}")
            self._release()
            return FAILURE
        return super().on_configure(state)

    @property
    def settings(self) -> NodeSettings:
        """The parameters, checked and typed (configure builds them; a change replaces them)."""
        assert self._settings is not None, "not configured"
        return self._settings

    def _configure(self) -> None:
        log = self.get_logger()
        s = self._settings = node_settings(parameter_values(self))
        self._completer = set_up(s, log.info, log.warning)
        self._model = self._completer.model
        self._checkpoint, self._refine_checkpoint = self._completer.checkpoint, self._completer.refine_checkpoint
        self._rng = np.random.default_rng(s.completion.sampling.seed)
        self._tf = TfPoses(self, s.frames.tf_sensor_frame) if s.frames.tf_sensor_frame else None
        overrides = QoSOverridingOptions.with_default_policies()
        qos = qos_profile(s.qos.output_reliability, s.qos.output_depth)
        self._pubs = [self.create_lifecycle_publisher(PointCloud2, topic, qos, qos_overriding_options=overrides)
                      for topic in s.topics.outputs]
        self._debug = {name: self.create_lifecycle_publisher(Float64, f"~/debug/{name}", 10) for name in DEBUG_SCALARS}
        self._debug["timings"] = self.create_lifecycle_publisher(DiagnosticArray, "~/debug/timings", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        if s.model.warmup:
            try:
                warm_up(self._completer, log.info)
            except Exception as err:  # e.g. CUDA out of memory: say so in one line
                raise StartupError(f"warm-up inference failed: {type(err).__name__}: {err}") from None
        self._diag_timer = self.create_timer(s.diagnostics.period, self._publish_diagnostics)

    def on_activate(self, state: Any) -> TransitionCallbackReturn:
        s, overrides = self.settings, QoSOverridingOptions.with_default_policies()
        try:
            qos = qos_profile(s.qos.input_reliability, s.qos.input_depth)
            self._subs = [self.create_subscription(PointCloud2, topic, partial(self._on_cloud, index), qos,
                                                   qos_overriding_options=overrides)
                          for index, topic in enumerate(s.topics.inputs)]
        except Exception as err:  # e.g. a qos_overrides value that is not a policy
            self.configure_error = f"cannot subscribe: {type(err).__name__}: {err}"
            self.get_logger().error(self.configure_error)
            self._drop_subscriptions()
            return FAILURE
        self._mailbox.reopen()
        self._cancel.clear()
        self._worker = threading.Thread(target=self._work, name="completion_worker", daemon=True)
        self._worker.start()
        self._health.activated(time.monotonic())
        self._active = True
        def qos_of(entities: list) -> str:  # as in effect: after any qos_overrides.* parameter
            return ", ".join(dict.fromkeys(describe_qos(e.qos_profile) for e in entities))

        self.get_logger().info(
            f"ready: {', '.join(s.topic_name for s in self._subs)} -> {', '.join(p.topic_name for p in self._pubs)} "
            f"(input QoS {qos_of(self._subs)}, output QoS {qos_of(self._pubs)}; "
            f"frames: {'; '.join(p.describe() for p in s.frames.poses)})")
        return super().on_activate(state)

    def on_deactivate(self, state: Any) -> TransitionCallbackReturn:
        self._stop()
        self.get_logger().info("deactivated: not subscribed, nothing published")
        return super().on_deactivate(state)

    def on_cleanup(self, state: Any) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("cleaned up: model released")
        return super().on_cleanup(state)

    def on_shutdown(self, state: Any) -> TransitionCallbackReturn:
        """Finalized: the batch in flight is abandoned, the model freed, and the process exits
        with status 0 (runtime.py; launch's ``respawn`` would start it again)."""
        self._stop(abandon=True)
        self._release()
        self.finalized = True
        self.get_logger().info("shut down (lifecycle): finalized, exiting")
        return SUCCESS

    def _drop_subscriptions(self) -> None:
        subs, self._subs = self._subs, []
        [self.destroy_subscription(sub) for sub in subs]

    def _stop(self, abandon: bool = False) -> None:
        """Unsubscribe; waiting scans count as dropped (``dropped.stopped``). The batch in flight
        is finished and published (deactivate) or, with ``abandon`` (shutdown), given up at the
        sampler's next step and counted as ``dropped.abandoned``. A worker still busy after the
        wait is left behind and its scans are counted as abandoned here."""
        self._active = False
        self._drop_subscriptions()
        if abandon:
            self._cancel.set()
        for scan in self._mailbox.close():
            self._health.add(scan.index, "dropped", reason="stopped")
        worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            worker.join(SHUTDOWN_WAIT_S if abandon else DEACTIVATE_WAIT_S)
            if worker.is_alive():
                self._left_behind = worker
                self._abandon()

    def worker_running(self) -> bool:
        """A worker did not stop when asked (one network call longer than ``SHUTDOWN_WAIT_S``):
        the process must exit without waiting for it (runtime.py)."""
        return self._left_behind is not None and self._left_behind.is_alive()

    def _abandon(self) -> None:
        """Count the scans of the batch in flight that nobody answered as ``dropped.abandoned``."""
        for scan in self._in_flight.claim_all():
            self._health.add(scan.index, "dropped", reason="abandoned")
        self._health.batch_abandoned()

    def _stopping(self) -> bool:
        """The sampler's cancellation check: shutdown asked for, or the context is gone (SIGINT)."""
        return self._cancel.is_set() or not self.context.ok()

    def _release(self) -> None:
        for pub in [*self._pubs, *self._debug.values()]:
            self.destroy_lifecycle_publisher(pub)
        self._pubs, self._debug = [], {}
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
        completer, self._completer, self._model, self._diag_timer, self._tf = self._completer, None, None, None, None
        free_device(completer)

    def _on_set_parameters(self, params: list) -> SetParametersResult:  # applied to the next scan if valid
        changes = {p.name: p.value for p in params}
        try:
            if self._settings is None:  # not configured yet: checked now, used by configure
                settings_from({**parameter_values(self), **changes})
                return SetParametersResult(successful=True)
            settings, completer, touched = apply_changes(self._settings, changes, self._model, self._completer)
        except (ValueError, RuntimeError) as err:
            return SetParametersResult(successful=False, reason=str(err))
        self._settings, self._completer = settings, completer
        if "sampling.seed" in touched:
            self._rng = np.random.default_rng(settings.completion.sampling.seed)
        if completer is not None and touched & set(COMPLETION_KEYS):
            self.get_logger().info(f"parameters changed: {describe(completer)}")
            log_range(completer, self.get_logger().warning)
        return SetParametersResult(successful=True)

    def _throttled(self, key: str, message: str, level: str = "warning") -> None:
        if self.context.ok():  # shutting down: rosout is gone, and so is the reader
            text = self._throttle.message(key, message, time.monotonic(), self.settings.limits.log_throttle_s)
            if text is not None and level == "info":  # one call site per severity: rclpy insists
                self.get_logger().info(text)
            elif text is not None:
                self.get_logger().warning(text)

    def _reject(self, index: int, reason: str, detail: str, header: Any = None) -> None:
        self._health.add(index, "rejected", reason=reason)
        where = f" (stamp {stamp_ns(header) / 1e9:.3f}, frame '{header.frame_id}')" if header is not None else ""
        self._throttled(f"reject.{reason}", f"rejected scan{where}: {REJECT_REASONS[reason]}: {detail}")

    def _on_cloud(self, index: int, msg: PointCloud2) -> None:
        t_enter, limits = time.perf_counter(), self.settings.limits
        self._health.received(index, time.monotonic())
        try:
            if limits.skip_without_subscribers and self._pubs[index].get_subscription_count() == 0:
                self._health.add(index, "skipped")
                self._throttled("skipped", f"no subscriber on {self._pubs[index].topic_name}: skipping inference",
                                "info")
                return
            pose = self.settings.frames.poses[index]
            pose = self._tf.pose(pose, msg.header.frame_id) if self._tf else pose
            scan = read_scan(msg, index, pose, t_enter, rng=self._rng,
                             min_points=limits.min_input_points, max_points=limits.max_input_points,
                             keep_intensity=not self.settings.completion.data.completion_only)
        except Rejected as err:
            return self._reject(index, err.reason, err.detail, msg.header)
        except Exception as err:  # never let one message take the node down
            return self._reject(index, "error", f"{type(err).__name__}: {err}", getattr(msg, "header", None))
        for key, n, text in scan.repairs(limits.max_input_points):
            self._health.add(index, f"repaired.{key}")
            self._health.add(index, "nonfinite_points", n)
            self._throttled(key, text, "info")
        self._health.accepted(index, time.monotonic())
        stale = self._mailbox.put(scan)
        if stale is not None:
            self._health.add(index, "dropped", reason="stale")
            self._throttled("dropped", f"dropped stale scan (stamp {stamp_ns(stale.header) / 1e9:.3f}) on "
                            f"{self._subs[index].topic_name}: the model is slower than the input rate")

    def _work(self) -> None:
        while (batch := self._mailbox.take(self.settings.limits.gather_ms / 1000)) is not None:
            now = time.monotonic()
            self._in_flight.start(batch)
            self._health.batch_started(now)
            error = None
            try:
                self._process(batch)
            except Cancelled:  # shutting down: given up between two sampler steps
                return self._abandon()
            except Exception as err:
                if self._stopping():  # shutting down: the batch goes unanswered
                    return self._abandon()
                error = f"{type(err).__name__}: {err}"
                for scan in self._in_flight.claim_all():
                    self._reject(scan.index, "error", error, scan.header)
            self._in_flight.claim_all()  # every scan is answered: the batch is over
            failures, limit = self._health.batch_done(error), self.settings.limits.max_consecutive_failures
            if error and limit and failures >= limit:
                self.fatal = f"inference failed {failures} times in a row (max_consecutive_failures): {error}"
                return

    def _process(self, batch: list) -> None:
        def out_of_range(scan: Any, why: str) -> None:
            if self._in_flight.claim(scan):
                self._reject(scan.index, "out_of_range", why, scan.header)

        t_model = time.perf_counter()
        results = complete_scans(self._completer, batch, out_of_range, self._stopping)
        model_ms = 1000 * (time.perf_counter() - t_model)
        for scan, result in zip(batch, results, strict=True):
            if result is None or not self._in_flight.claim(scan):
                continue  # rejected above, or abandoned by a shutdown that could not wait
            try:
                self._answer(scan, result, t_model, model_ms, len(batch))
            except Exception as err:  # this scan is claimed: count it here, the rest in _work
                if self._stopping():
                    self._health.add(scan.index, "dropped", reason="abandoned")
                else:
                    self._reject(scan.index, "error", f"{type(err).__name__}: {err}", scan.header)
                raise

    def _answer(self, scan: Any, result: Any, t_model: float, model_ms: float, batch_size: int) -> None:
        """Publish one scan's completion and count it (completed or out_of_domain)."""
        tm = scan.model_done(result, t_model, model_ms, batch_size)
        t_build = time.perf_counter()
        xyz, extra = output_arrays(result, scan)
        out = build_cloud(xyz, scan.header, PointCloud2, PointField, extra=extra)
        t_publish = time.perf_counter()
        self._pubs[scan.index].publish(out)
        t_end = time.perf_counter()
        tm.build_ms, tm.publish_ms = 1000 * (t_publish - t_build), 1000 * (t_end - t_publish)
        tm.latency_ms = (self.get_clock().now().nanoseconds - stamp_ns(scan.header)) / 1e6
        previous, self._last_publish[scan.index] = self._last_publish.get(scan.index), t_end
        tm.cyclic_ms = 1000 * (t_end - previous) if previous is not None else 0.0
        tm.counts["output_points"] = len(xyz)
        if result.out_of_domain:  # published (the scan is still in it), never counted as completed
            self._throttled("out_of_domain", f"scan (stamp {stamp_ns(scan.header) / 1e9:.3f}) is outside the "
                            f"model's domain: {result.domain_problem}; published the scan with {result.completed_points} "
                            f"completed points (out_of_domain in /diagnostics)")
            self._health.out_of_domain(scan.index, tm, time.monotonic())
        else:
            self._health.completed(scan.index, tm, time.monotonic())
        try:  # the scan is answered and counted: trouble with the debug topics must not count against it
            self._publish_debug(scan, tm)
        except Exception as err:
            if self.context.ok():
                self._throttled("debug", f"could not publish debug timings: {type(err).__name__}: {err}")

    def _publish_debug(self, scan: Any, tm: Any) -> None:
        for name, value in tm.scalars().items():
            self._debug[name].publish(Float64(data=value))
        values = {**{k: f"{x:.3f}" for k, x in tm.stages().items()}, **tm.counts, "input_index": scan.index}
        status = self._status("scan timings", 0, f"{tm.processing_ms:.1f} ms", values)
        self._debug["timings"].publish(DiagnosticArray(header=scan.header, status=[status]))
        if self._health.counters()["completed"] == 1:
            self.get_logger().info(f"first completed scan published: {scan.input_points} -> "
                                   f"{tm.counts['output_points']} points in {tm.processing_ms:.0f} ms")

    def _publish_diagnostics(self) -> None:
        c, s = self._completer, self.settings
        model = model_values(c, s.model.device, self._checkpoint, self._refine_checkpoint, list(s.frames.poses))
        outputs = {f"{p.topic_name}.subscribers": p.get_subscription_count() for p in self._pubs}
        outputs["output_subscribers"] = sum(outputs.values())
        alive = self._worker is not None and self._worker.is_alive()
        tasks = self._health.evaluate(time.monotonic(), s.diagnostics, self._active, alive, outputs, model)
        array = DiagnosticArray(status=[self._status(t.task, t.level, t.message, t.values) for t in tasks])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def _status(self, task: str, level: int, message: str, values: dict) -> DiagnosticStatus:
        return DiagnosticStatus(level=bytes([level]), name=f"{self.get_name()}: {task}", message=message,
                                hardware_id=self.get_fully_qualified_name(),
                                values=[KeyValue(key=k, value=str(x)) for k, x in values.items()])

    def close(self) -> dict[str, int]:
        """Stop (abandoning the batch in flight); the final counters
        (``received == completed + out_of_domain + dropped + skipped + rejected``)."""
        self._stop(abandon=True)
        return self._health.counters()


def main(args: list[str] | None = None) -> int:  # exit status: see runtime.run_managed_node
    return run_managed_node(CompletionNode, NODE_NAME, args)


if __name__ == "__main__":
    sys.exit(main())
