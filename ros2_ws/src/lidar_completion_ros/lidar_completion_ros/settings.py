"""The node's settings: one frozen, typed object built once from its parameter values (no ROS import).

:func:`node_settings` turns the values of the declared parameters (``ros_parameters.py``)
into a :class:`NodeSettings` and is the one place they are checked beyond rclpy's types and
ranges: the node's own string choices (:func:`parameters.check_choices`), the topic and
frame lists (one :class:`~lidar_completion_ros.frames.SensorPose` per input) and the
completion keys (by building the core :class:`CompletionConfig`). Everything after it --
loading the model (``startup.py``), the data path, diagnostics -- reads typed fields, not
parameter names. A run-time parameter change makes a new object
(:meth:`NodeSettings.with_changes`, ``dataclasses.replace`` of the sections it touches),
checked the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lidar_completion.config import CompletionConfig, flatten_keys

from .frames import SensorPose, sensor_poses
from .parameters import COMPLETION_KEYS, PARAMETERS, StartupError, check_choices, completion_config, core_config, core_value

__all__ = ["DiagnosticsSettings", "FrameSettings", "LimitSettings", "ModelSettings", "NodeSettings", "QosSettings",
           "TopicSettings", "node_settings", "settings_from"]

_BY_NAME = {spec.name: spec for spec in PARAMETERS}


def _param(name: str) -> Any:
    """A field set from the ROS parameter ``name``."""
    return field(metadata={"param": name})


@dataclass(frozen=True)
class TopicSettings:
    inputs: tuple[str, ...] = _param("input_topics")
    outputs: tuple[str, ...] = _param("output_topics")


@dataclass(frozen=True)
class QosSettings:
    input_reliability: str = _param("qos.input.reliability")
    input_depth: int = _param("qos.input.depth")
    output_reliability: str = _param("qos.output.reliability")
    output_depth: int = _param("qos.output.depth")


@dataclass(frozen=True)
class FrameSettings:
    input_frames: tuple[str, ...] = _param("frame.input_frames")
    sensor_translation: tuple[float, ...] = _param("frame.sensor_translation")
    sensor_rpy: tuple[float, ...] = _param("frame.sensor_rpy")
    tf_sensor_frame: str = _param("frame.tf_sensor_frame")  # "" = the poses below, not tf
    poses: tuple[SensorPose, ...] = ()  # one per input, from the three lists above


@dataclass(frozen=True)
class ModelSettings:
    checkpoint: str = _param("checkpoint")
    refine_checkpoint: str = _param("refine_checkpoint")  # "" = none
    device: str = _param("device")  # as requested ("auto"): the diagnostics compare it with the one found
    warmup: bool = _param("warmup")


@dataclass(frozen=True)
class LimitSettings:
    """What the node accepts and how long it keeps at it."""

    gather_ms: float = _param("batch.gather_ms")
    max_consecutive_failures: int = _param("max_consecutive_failures")  # 0 = never exit
    max_input_points: int = _param("max_input_points")
    min_input_points: int = _param("min_input_points")
    skip_without_subscribers: bool = _param("skip_without_subscribers")
    log_throttle_s: float = _param("log_throttle_s")


@dataclass(frozen=True)
class DiagnosticsSettings:
    period: float = _param("diagnostics.period")
    warn_processing_ms: float = _param("diagnostics.warn_processing_ms")
    error_processing_ms: float = _param("diagnostics.error_processing_ms")
    stale_input_s: float = _param("diagnostics.stale_input_s")
    error_after_s: float = _param("diagnostics.error_after_s")
    warn_output_ratio: float = _param("diagnostics.warn_output_ratio")


#: The sections of :class:`NodeSettings` set field by field from parameters.
_SECTIONS = {"topics": TopicSettings, "qos": QosSettings, "frames": FrameSettings, "model": ModelSettings,
             "limits": LimitSettings, "diagnostics": DiagnosticsSettings}
#: Parameters the sensor poses are made from.
_POSE_PARAMETERS = frozenset({"input_topics", "output_topics", "frame.input_frames", "frame.sensor_translation",
                              "frame.sensor_rpy"})


@dataclass(frozen=True)
class NodeSettings:
    """Every parameter of the table, typed and checked: topics and QoS, frames, the model,
    the core completion config (``data.*``, ``sampling.*``, ``refine``, ``device``,
    ``backend``; sentinels already turned into ``None``), limits and diagnostics."""

    autostart: bool
    topics: TopicSettings
    qos: QosSettings
    frames: FrameSettings
    model: ModelSettings
    completion: CompletionConfig
    limits: LimitSettings
    diagnostics: DiagnosticsSettings

    def with_changes(self, changes: Mapping[str, Any]) -> tuple[NodeSettings, frozenset[str]]:
        """The settings after a run-time change of some parameters, and the names of those
        this node has; ``ValueError`` naming the parameter when a value does not fit (the
        reason the change is refused with)."""
        given = {name: _typed(name, value) for name, value in changes.items() if name in _BY_NAME}
        check_choices(given)
        updates: dict[str, Any] = {}
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            fields = {f.name: given[f.metadata["param"]] for f in dataclasses.fields(cls)
                      if f.metadata.get("param") in given}
            if fields:
                updates[name] = dataclasses.replace(section, **fields)
        if given.keys() & _POSE_PARAMETERS:
            topics, frames = updates.get("topics", self.topics), updates.get("frames", self.frames)
            updates["frames"] = dataclasses.replace(frames, poses=_poses(topics, frames))
        completion = {key: core_value(key, value) for key, value in given.items() if key in COMPLETION_KEYS}
        if completion:
            updates["completion"] = core_config(flatten_keys(self.completion.to_dict()) | completion)
        if "autostart" in given:
            updates["autostart"] = given["autostart"]
        return dataclasses.replace(self, **updates), frozenset(given)


def _typed(name: str, value: Any) -> Any:
    """A parameter value as its field holds it: lists as tuples, an int given for a double as a float."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return float(value) if isinstance(_BY_NAME[name].default, float) and is_int else value


def _section(cls: Any, values: Mapping[str, Any]) -> Any:
    return cls(**{f.name: _typed(f.metadata["param"], values[f.metadata["param"]])
                  for f in dataclasses.fields(cls) if "param" in f.metadata})


def _poses(topics: TopicSettings, frames: FrameSettings) -> tuple[SensorPose, ...]:
    """One pose per input; ``ValueError`` naming the parameter when the topic or frame lists
    do not fit together."""
    inputs, outputs = list(topics.inputs), list(topics.outputs)
    if not inputs or any(not t.strip() for t in inputs) or len(set(inputs)) != len(inputs):
        raise ValueError(f"input_topics: give one or more distinct topic names, got {inputs}")
    if len(outputs) != len(inputs) or any(not t.strip() for t in outputs) or len(set(outputs)) != len(outputs):
        raise ValueError(f"output_topics: give one distinct topic per input ({len(inputs)}), got {outputs}")
    return tuple(sensor_poses(len(inputs), frames.input_frames, frames.sensor_translation, frames.sensor_rpy))


def settings_from(values: Mapping[str, Any]) -> NodeSettings:
    """:class:`NodeSettings` from ``{parameter name: value}`` (every parameter of the table);
    ``ValueError`` naming the first parameter that does not fit: a string choice, then the
    topic and frame lists, then the completion keys (the core config's own limits)."""
    check_choices(values)
    topics, frames = _section(TopicSettings, values), _section(FrameSettings, values)
    frames = dataclasses.replace(frames, poses=_poses(topics, frames))
    return NodeSettings(autostart=bool(values["autostart"]), topics=topics, qos=_section(QosSettings, values),
                        frames=frames, model=_section(ModelSettings, values), completion=completion_config(values),
                        limits=_section(LimitSettings, values), diagnostics=_section(DiagnosticsSettings, values))


def node_settings(values: Mapping[str, Any]) -> NodeSettings:
    """:func:`settings_from` at configure: ``StartupError`` with one line for a value that
    does not fit (checked before the slow model load)."""
    try:
        return settings_from(values)
    except ValueError as err:
        raise StartupError(f"invalid parameter {err}") from None
