"""What one scan cost, stage by stage (no ROS import): one record instead of ten arguments.

Stages, in milliseconds (``perf_counter``): ``convert`` (message -> points, checks, frame
transform), ``wait`` (in the input's slot until the worker took it: the previous batch, or
``batch.wait_ms`` for the other inputs), ``model`` (``SceneCompleter.complete_batch`` of
the whole batch), ``build`` (back to the input frame, output layout, message) and
``publish``. ``processing = convert + wait + model + build + publish``; the node's own cost
is ``overhead = convert + build + publish``. ``latency`` is the ROS clock at publish minus
the scan's header stamp (driver, transport and everything above); ``cyclic`` the time
since this input's previous completed scan was published.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ScanTimings"]


@dataclass
class ScanTimings:
    convert_ms: float = 0.0
    wait_ms: float = 0.0
    model_ms: float = 0.0
    build_ms: float = 0.0
    publish_ms: float = 0.0
    latency_ms: float = 0.0
    cyclic_ms: float = 0.0  # 0 for an input's first scan
    batch_size: int = 1
    model_stages: dict[str, float] = field(default_factory=dict)  # the completer's own timings
    counts: dict[str, int] = field(default_factory=dict)  # input/used/output points, steps, nfe

    @property
    def processing_ms(self) -> float:
        return self.convert_ms + self.wait_ms + self.model_ms + self.build_ms + self.publish_ms

    @property
    def overhead_ms(self) -> float:
        return self.convert_ms + self.build_ms + self.publish_ms

    def scalars(self) -> dict[str, float]:
        """The ``~/debug/<name>`` values."""
        return {"processing_time_ms": self.processing_ms, "model_time_ms": self.model_ms,
                "overhead_ms": self.overhead_ms, "wait_ms": self.wait_ms,
                "pipeline_latency_ms": self.latency_ms, "cyclic_time_ms": self.cyclic_ms}

    def stages(self) -> dict[str, float]:
        """Every stage for ``~/debug/timings`` (keys ``<stage>_ms``)."""
        return {
            "processing_ms": self.processing_ms, "model_ms": self.model_ms, "overhead_ms": self.overhead_ms,
            "convert_ms": self.convert_ms, "wait_ms": self.wait_ms,
            **{f"model.{k}_ms": v for k, v in self.model_stages.items()},
            "build_ms": self.build_ms, "publish_ms": self.publish_ms,
            "pipeline_latency_ms": self.latency_ms, "cyclic_ms": self.cyclic_ms,
        }
