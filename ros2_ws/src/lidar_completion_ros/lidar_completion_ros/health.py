"""Counters, throttled logging and the node's diagnostics tasks (no ROS import).

The node feeds :class:`Health` from its callback and worker threads and turns
:meth:`Health.evaluate` into ``diagnostic_msgs/DiagnosticStatus`` messages, the way
``diagnostic_updater`` does: one status per task, named ``"<node name>: <task>"``:

* ``input``: per input topic the rate, the age of its last scan and its counters; WARN
  when an input had no scan for ``diagnostics.stale_input_s`` (counted from activation,
  so a sensor that never sends is caught), ERROR when that lasts
  ``diagnostics.error_after_s`` longer; WARN when scans were rejected in the last period.
  Dropped scans (a model slower than the sensor) are counted, not a WARN.
* ``processing``: mean processing time over the window against
  ``diagnostics.warn_processing_ms`` (WARN) and ``diagnostics.error_processing_ms``
  (ERROR); the batch running now, by its age (``running_batch_age_s``), against the same
  two bounds: a batch that has run longer than a scan may take is a WARN (then an ERROR)
  while it runs, not only after it finished.
* ``output``: completed vs accepted scans per second; WARN below
  ``diagnostics.warn_output_ratio``; ERROR while inferences fail or the worker died.
* ``model``: device, checkpoint and settings; WARN when ``device: auto`` found no GPU.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import DiagnosticsSettings

__all__ = ["OK", "WARN", "ERROR", "Health", "TaskStatus", "Throttle", "REJECT_REASONS", "REPAIR_REASONS",
           "DROP_REASONS", "COUNTER_KEYS", "model_values"]

OK, WARN, ERROR = 0, 1, 2
WINDOW_S = 5.0  # rates and means are over the last few seconds

#: Why a scan was rejected (each has a counter ``rejected.<reason>``).
REJECT_REASONS = {
    "empty": "cloud has no points",
    "layout": "cloud layout cannot be read",
    "frame": "cloud is not in the configured frame",
    "too_small": "too few finite points",
    "out_of_range": "no point within the range band",
    "error": "unexpected error",
}
#: Scans that were changed and then used (counter ``repaired.<reason>``).
REPAIR_REASONS = ("nonfinite", "subsampled")
#: Why an accepted scan went unanswered (each has a counter ``dropped.<reason>``).
DROP_REASONS = {
    "stale": "a newer scan of its input replaced it while it waited (the model is slower than the sensor)",
    "stopped": "it was waiting when the node was deactivated or shut down",
    "abandoned": "it was being completed when the node shut down (cancelled between sampler steps)",
}
COUNTER_KEYS = ("received", "completed", "out_of_domain", "dropped", "skipped", "rejected",
                *(f"rejected.{r}" for r in REJECT_REASONS), *(f"dropped.{r}" for r in DROP_REASONS),
                *(f"repaired.{r}" for r in REPAIR_REASONS), "nonfinite_points")


@dataclass
class TaskStatus:
    task: str
    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)


class Throttle:
    """At most one log line per key per period; counts the ones it held back."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def message(self, key: str, text: str, now: float, period: float) -> str | None:
        """``text`` (with how many were held back) when it may be logged now, else None."""
        last = self._last.get(key)
        if last is not None and now - last < period:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        held = self._held.pop(key, 0)
        self._last[key] = now
        if not held:
            return text
        assert last is not None  # lines are only held back after one was logged
        return text + f" ({held} more like this in the last {now - last:.0f} s)"


@dataclass
class _Input:
    topic: str
    counts: dict[str, int] = field(default_factory=dict)
    received: deque = field(default_factory=lambda: deque(maxlen=500))
    accepted: deque = field(default_factory=lambda: deque(maxlen=500))
    last: float | None = None


class Health:
    """Thread-safe counters and recent timings of one node, per input."""

    def __init__(self, topics: list[str]) -> None:
        self.lock = threading.Lock()
        self.inputs = [_Input(t) for t in topics]
        self.recent: deque = deque(maxlen=200)  # (t, ScanTimings)
        self.activated_at: float | None = None
        self.busy_since: float | None = None
        self.failures = 0  # consecutive failed batches
        self.last_error = ""
        self._reported: dict[str, int] = {}

    # --------------------------------------------------------------- recording
    def add(self, index: int, key: str, n: int = 1, reason: str = "") -> None:
        """Count ``key`` (and ``key.reason`` when given) for one input."""
        with self.lock:
            counts = self.inputs[index].counts
            for name in (key, f"{key}.{reason}") if reason else (key,):
                counts[name] = counts.get(name, 0) + n

    def received(self, index: int, now: float) -> None:
        with self.lock:
            entry = self.inputs[index]
            entry.counts["received"] = entry.counts.get("received", 0) + 1
            entry.last = now
            entry.received.append(now)

    def accepted(self, index: int, now: float) -> None:
        with self.lock:
            self.inputs[index].accepted.append(now)

    def completed(self, index: int, timings: Any, now: float) -> None:
        with self.lock:
            counts = self.inputs[index].counts
            counts["completed"] = counts.get("completed", 0) + 1
            self.recent.append((now, timings))

    def out_of_domain(self, index: int, timings: Any, now: float) -> None:
        """A scan published without a completion to trust (mostly clipped, or nothing added)."""
        with self.lock:
            counts = self.inputs[index].counts
            counts["out_of_domain"] = counts.get("out_of_domain", 0) + 1
            self.recent.append((now, timings))

    def batch_started(self, now: float) -> None:
        with self.lock:
            self.busy_since = now

    def batch_abandoned(self) -> None:
        """The batch in flight was given up (shutdown): no outcome to record."""
        with self.lock:
            self.busy_since = None

    def batch_done(self, error: str | None) -> int:
        """Record a batch's outcome; the number of consecutive failed batches."""
        with self.lock:
            self.busy_since = None
            if error is None:
                self.failures = 0
            else:
                self.failures += 1
                self.last_error = error
            return self.failures

    def activated(self, now: float) -> None:
        with self.lock:
            self.activated_at = now
            for entry in self.inputs:
                entry.last = None

    def counters(self, index: int | None = None) -> dict[str, int]:
        """Every counter (zeros included) of one input, or summed over all inputs."""
        with self.lock:
            entries = self.inputs if index is None else [self.inputs[index]]
            return {k: sum(e.counts.get(k, 0) for e in entries) for k in COUNTER_KEYS}

    # --------------------------------------------------------------- diagnostics
    def evaluate(self, now: float, settings: DiagnosticsSettings, active: bool, worker_alive: bool,
                 outputs: dict[str, Any], model: dict[str, str]) -> list[TaskStatus]:
        totals = self.counters()
        per_input = [self.counters(i) for i in range(len(self.inputs))]
        with self.lock:
            recent = [t for when, t in self.recent if now - when <= WINDOW_S]
            rates = [(sum(now - t <= WINDOW_S for t in e.received) / WINDOW_S,
                      sum(now - t <= WINDOW_S for t in e.accepted) / WINDOW_S, e.last) for e in self.inputs]
            activated, busy_since, failures, last_error = self.activated_at, self.busy_since, self.failures, self.last_error
            grew = totals["rejected"] - self._reported.get("rejected", 0)
            outside = totals["out_of_domain"] - self._reported.get("out_of_domain", 0)
            self._reported = dict(totals)
        return [
            self._input_task(now, settings, active, activated, rates, per_input, totals, grew),
            self._processing_task(now, settings, recent, busy_since),
            self._output_task(settings, active, worker_alive, recent, rates, failures, last_error, totals, outputs,
                              outside),
            self._model_task(model),
        ]

    @staticmethod
    def _model_task(model: dict[str, str]) -> TaskStatus:
        if model.get("device_requested") == "auto" and model.get("device") == "cpu":
            return TaskStatus("model", WARN, "device auto found no GPU: running on CPU", dict(model))
        return TaskStatus("model", OK, f"{model.get('model', '')} on {model.get('device', '')}", dict(model))

    def _input_task(self, now, settings, active, activated, rates, per_input, totals, grew) -> TaskStatus:
        values = {k: str(n) for k, n in totals.items()}
        problems, level = [], OK
        stale_s, error_s = settings.stale_input_s, settings.error_after_s
        for entry, (rate, _, last), counts in zip(self.inputs, rates, per_input, strict=True):
            since = last if last is not None else activated
            age = now - since if since is not None else 0.0
            values.update({f"{entry.topic}.rate_hz": f"{rate:.2f}",
                           f"{entry.topic}.age_s": f"{now - last:.2f}" if last is not None else ""})
            values.update({f"{entry.topic}.{k}": str(counts[k])
                           for k in ("received", "completed", "dropped", "skipped", "rejected")})
            if active and age > stale_s:
                problems.append(f"no scan for {age:.1f} s on {entry.topic}")
                level = max(level, ERROR if age > stale_s + error_s else WARN)
        if grew > 0:
            problems.append(f"rejected {grew} scans (see rejected.* and the log)")
            level = max(level, WARN)
        if not active:
            return TaskStatus("input", OK, "inactive (lifecycle): not subscribed", values)
        rate = sum(r for r, _, _ in rates)
        return TaskStatus("input", level, "; ".join(problems) or f"ok: {rate:.1f} scans/s", values)

    def _processing_task(self, now, settings, recent, busy_since) -> TaskStatus:
        warn_ms, error_ms = settings.warn_processing_ms, settings.error_processing_ms
        mean = sum(t.processing_ms for t in recent) / len(recent) if recent else 0.0
        values = {"processing_time_mean_ms": f"{mean:.1f}", "warn_processing_ms": f"{warn_ms:g}",
                  "error_processing_ms": f"{error_ms:g}"}
        if recent:
            last = recent[-1]
            values.update({"processing_time_ms": f"{last.processing_ms:.1f}", "model_time_ms": f"{last.model_ms:.1f}",
                           "overhead_ms": f"{last.overhead_ms:.2f}", "wait_ms": f"{last.wait_ms:.1f}",
                           "pipeline_latency_ms": f"{last.latency_ms:.1f}", "batch_size": str(last.batch_size)})
        running = 1000 * (now - busy_since) if busy_since is not None else 0.0
        values["running_batch_age_s"] = f"{running / 1000:.2f}"  # 0: no batch running
        if running > error_ms:
            return TaskStatus("processing", ERROR, f"a batch has run {running:.0f} ms > {error_ms:g} ms", values)
        if recent and mean > error_ms:
            return TaskStatus("processing", ERROR, f"slow: {mean:.0f} ms per scan > {error_ms:g} ms", values)
        if running > warn_ms:
            return TaskStatus("processing", WARN, f"a batch has run {running:.0f} ms > {warn_ms:g} ms", values)
        if recent and mean > warn_ms:
            return TaskStatus("processing", WARN, f"slow: {mean:.0f} ms per scan > {warn_ms:g} ms", values)
        idle = f"{mean:.1f} ms per scan" if recent else "no scan processed recently"
        return TaskStatus("processing", OK, idle + (f"; a batch running for {running / 1000:.1f} s" if busy_since
                                                    is not None else ""), values)

    def _output_task(self, settings, active, worker_alive, recent, rates, failures, last_error, totals,
                     outputs, outside: int = 0) -> TaskStatus:
        out_rate = len(recent) / WINDOW_S
        in_rate = sum(r for r, _, _ in rates)
        wanted = sum(a for _, a, _ in rates)  # accepted for inference (not skipped or rejected)
        ratio = out_rate / wanted if wanted else 1.0
        values = {"output_rate_hz": f"{out_rate:.2f}", "input_rate_hz": f"{in_rate:.2f}",
                  "output_ratio": f"{min(ratio, 1.0):.2f}", "consecutive_failures": str(failures),
                  "completed": str(totals["completed"]), "out_of_domain": str(totals["out_of_domain"]),
                  **{k: str(x) for k, x in outputs.items()}}
        if recent:
            counts = recent[-1].counts
            values.update({k: str(counts[k]) for k in ("output_points", "completed_points", "clipped_predictions")
                           if k in counts})
        if active and not worker_alive:
            return TaskStatus("output", ERROR, "worker thread died", values)
        if failures:
            return TaskStatus("output", ERROR, f"inference failing ({failures} in a row): {last_error}", values)
        if outside > 0:
            return TaskStatus("output", WARN, f"{outside} scan(s) outside the model's domain (noise predictions "
                              "mostly clipped, or nothing completed): published without a trusted completion "
                              "(see out_of_domain and the log)", values)
        minimum = settings.warn_output_ratio
        if active and wanted and ratio < minimum:
            return TaskStatus("output", WARN, f"completing {out_rate:.2f} of {wanted:.2f} scans/s "
                              f"(ratio {ratio:.2f} < {minimum:g})", values)
        return TaskStatus("output", OK, f"ok: {out_rate:.1f} scans/s", values)


def model_values(completer: Any, device: str, checkpoint: Any, refine_checkpoint: Any, poses: list) -> dict[str, str]:
    """The ``model`` task's values: what runs, where, with which settings and frames."""
    mc, data = completer.model.config, completer.config.data
    return {
        "device": str(completer.device), "device_requested": device, "checkpoint": str(checkpoint),
        "model": f"{checkpoint.name} ({mc.kind}, channel_ratio {mc.channel_ratio:g})",
        "steps": str(completer.steps), "guidance": f"{completer.guidance:g}", "n_part": str(completer.n_part),
        "refine": str(completer.config.refine).lower(), "refine_checkpoint": str(refine_checkpoint or ""),
        "min_range": f"{data.min_range:g}", "max_range": f"{data.max_range or 0:g}",  # the parameter: 0 = the model's radius
        "max_range_model": f"{mc.max_range:g}" if mc.max_range else "",
        "max_range_effective": f"{completer.max_range:g}", "frames": "; ".join(p.describe() for p in poses),
        "output": ("completed points only" if data.completion_only else
                   f"the whole scan + completed points within {completer.max_range:g} m "
                   f"(none within {data.compose_distance:g} m of a return, >= {data.compose_support} "
                   f"completed neighbours)"),
        "noise_clip": "off" if completer.config.sampling.noise_clip is None else f"{completer.config.sampling.noise_clip:g}",
    }
