"""The node's parameter table: names, defaults, ranges and descriptions, in one place.

Why a table: the node declares every parameter from it (with a ``ParameterDescriptor``
and range), the tests compare it with ``config/completion_node.yaml`` both ways, and the
parameter table in ``docs/ros.md`` is checked against it. This module imports no ROS
package, so it is usable and testable without rclpy.

The completion keys (``data.*``, ``sampling.*``, ``refine``, ``device``) are the core
:class:`lidar_completion.config.CompletionConfig` keys, spelled the same way. Their values
are validated by *building that config* (:func:`completion_config`), so the core library
stays the one place where their limits are enforced; the ranges below only describe them to
``ros2 param describe`` and to rclpy (a test checks that both agree). ROS parameters cannot
be "unset", so ``None`` in the core config ("use the preset's / checkpoint's value") is
spelled with a sentinel: ``0`` for ``data.n_part``, ``data.max_range`` (the model's radius),
``data.repeat`` (the model's), ``sampling.steps`` and ``sampling.t0``,
``-1`` for ``data.min_range`` (the model's), ``sampling.guidance`` and ``sampling.seed``,
``""`` for ``sampling.sampler``;
``data.free_space_margin`` = -1 turns the free-space stage off, converted by the core's
:func:`lidar_completion.config.free_space_margin` (the one conversion, also lidar-evaluate's).

The node's own string parameters (QoS reliability, ...) are checked against their choices
by :func:`check_choices` before anything is loaded (rclpy itself only enforces ranges), when
settings.py builds the node's settings from these values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lidar_completion.backends import BACKENDS
from lidar_completion.config import CUT_LIMITS, STAGE_OFF, free_space_margin

__all__ = [
    "COMPLETION_KEYS",
    "PARAMETERS",
    "ParamSpec",
    "StartupError",
    "check_choices",
    "completion_config",
    "core_value",
    "defaults",
]

INT64_MAX = 2**63 - 1


class StartupError(RuntimeError):
    """The node cannot start (or configure); the message is the one line shown to the user."""


@dataclass(frozen=True)
class ParamSpec:
    """One ROS parameter: its default fixes the type (bool, int, float or str)."""

    name: str
    default: bool | int | float | str | list
    description: str
    range: tuple[float, float] | None = None  # inclusive, for int and float parameters
    choices: tuple[str, ...] | None = None  # for string parameters
    read_only: bool = False  # needs a restart (checkpoint, device, QoS)
    none_value: Any = None  # the sentinel that means ``None`` in the core config
    none_means: str = "default of the preset/checkpoint"  # what that ``None`` does

    @property
    def type_name(self) -> str:
        if isinstance(self.default, list):
            return {float: "double_array", str: "string_array"}[type(self.default[0])] if self.default else "array"
        return {bool: "bool", int: "int", float: "double", str: "string"}[type(self.default)]

    @property
    def constraints(self) -> str:
        """Human-readable limits (``ParameterDescriptor.additional_constraints``)."""
        parts = []
        if self.range is not None:
            parts.append(f"range [{self.range[0]:g}, {self.range[1]:g}]")
        if self.choices is not None:
            parts.append("one of " + ", ".join(c or "''" for c in self.choices))
        if self.none_value is not None:
            shown = self.none_value if self.none_value != "" else "''"
            parts.append(f"{shown} = {self.none_means}")
        if self.read_only:
            parts.append("read-only (restart the node to change)")
        return "; ".join(parts)


#: Keys passed to the core CompletionConfig (the rest are the node's own).
COMPLETION_KEYS = (
    "device",
    "backend",
    "refine",
    "data.preset",
    "data.n_part",
    "data.min_range",
    "data.max_range",
    "data.repeat",
    "data.free_space_margin",
    "data.completion_only",
    "data.compose_distance",
    "data.compose_support",
    "sampling.steps",
    "sampling.guidance",
    "sampling.seed",
    "sampling.sampler",
    "sampling.t0",
    "sampling.noise_clip",
)

PARAMETERS: tuple[ParamSpec, ...] = (
    # --- topics and frames ----------------------------------------------------------------
    ParamSpec("input_topics", ["points_raw"],
              "PointCloud2 inputs (relative names: remappable, namespaced), one per LiDAR; each keeps only its "
              "latest scan, and scans waiting together are completed in one batch on one model.", read_only=True),
    ParamSpec("output_topics", ["points_completed"],
              "One output topic per input, in the same order; each completion carries its input's header.",
              read_only=True),
    ParamSpec("frame.input_frames", [""],
              "frame_id each input must carry (one for all inputs, or one per input); '' accepts any frame. "
              "A cloud in another frame is rejected (rejected.frame).", read_only=True),
    ParamSpec("frame.sensor_translation", [0.0, 0.0, 0.0],
              "x, y, z (m) of the model's sensor frame in the input frame (3 for all inputs, or 3 per input), "
              "e.g. [0.0, 0.0, 1.73] for a roof LiDAR over base_link. Clouds are moved into the sensor frame "
              "before completion and back after it.", read_only=True),
    ParamSpec("frame.sensor_rpy", [0.0, 0.0, 0.0],
              "roll, pitch, yaw (rad; fixed axes x, y, z as tf2's setRPY) of the model's sensor frame in the "
              "input frame (3 for all inputs, or 3 per input).", read_only=True),
    ParamSpec("frame.tf_sensor_frame", "",
              "Optional: look the sensor pose up on tf (input frame -> this frame) instead of the frame.sensor_* "
              "parameters; needs tf2_ros (not installed in CI, so not covered by its tests). '' = off.",
              read_only=True),
    ParamSpec("batch.gather_ms", 0.0,
              "With several inputs: after a scan arrives, wait up to this long (ms) for the other inputs' scans "
              "so they are completed in one batch; 0 = take what is waiting.", range=(0.0, 600_000.0)),
    # --- lifecycle and health --------------------------------------------------------------
    ParamSpec("autostart", True,
              "Configure and activate right after start; false: wait for lifecycle transitions "
              "(ros2 lifecycle set <node> configure / activate).", read_only=True),
    ParamSpec("max_consecutive_failures", 5,
              "Exit with status 3 after this many failed inferences in a row (respawn restarts the node); "
              "0 = never.", range=(0, 1_000_000)),
    # --- model ------------------------------------------------------------------------
    ParamSpec(
        "checkpoint", "student_lite",
        "Model to run: a checkpoint directory (model.safetensors + config.json), a "
        ".safetensors file, a published .ckpt, or the name of a model shipped in "
        "lidar_completion/models (e.g. student_lite).",
        read_only=True,
    ),
    ParamSpec(
        "device", "auto", "Torch device: auto (CUDA when available), cpu, cuda or cuda:N.",
        choices=("auto", "cpu", "cuda", "cuda:N"), read_only=True,
    ),
    ParamSpec(
        "backend", "torch",
        "Sparse convolutions: torch (built in), torch-bf16 (the same, GEMMs in bfloat16: faster on CPUs with "
        "AVX512-BF16/AMX), minkowski (MinkowskiEngine 0.5.4) or spconv (2.3), when installed.",
        choices=BACKENDS, read_only=True,
    ),
    ParamSpec("refine", False, "Run the x6 refinement net after sampling (the checkpoint, or refine_checkpoint, "
              "must have one)."),
    ParamSpec(
        "refine_checkpoint", "",
        "A separate x6 refinement net replacing the checkpoint's own: the published refine_net.ckpt "
        "(prefix model_refine.) or one of our models with a refiner (path or shipped name); empty = none. "
        "Set refine to true to use it.",
        read_only=True,
    ),
    # --- core completion config ---------------------------------------------------------
    ParamSpec("data.preset", "model",
              "Point budget: model (what the checkpoint was trained with, else lite), lite (2000 points, CPU) "
              "or full (18000, GPU).", choices=("model", "lite", "full")),
    # The scan cut's ranges are the core ScanCut's limits (config.CUT_LIMITS), from the sentinel up.
    ParamSpec("data.n_part", 0, "Points the scan is farthest-point sampled to; 0 = the preset's.",
              range=(0, int(CUT_LIMITS["n_part"][1])), none_value=0),
    ParamSpec("data.min_range", -1.0, "Scan points closer than this (m) are ignored; -1 = the model's (3.5 m for "
              "a checkpoint that records none).",
              range=(-1.0, CUT_LIMITS["min_range"][1]), none_value=-1.0, none_means="the model's"),
    ParamSpec("data.max_range", 0.0,
              "Completion reaches this far (m): scan points beyond it are not given to the model and no "
              "completed point lies beyond it; capped at the radius the model was trained on. 0 = that "
              "radius (50 m for a checkpoint that records none).",
              range=(0.0, CUT_LIMITS["max_range"][1]), none_value=0.0, none_means="the model's radius"),
    ParamSpec("data.repeat", 0, "Each sampled scan point seeds this many output points; 0 = the model's (10 for "
              "a checkpoint that records none).", range=(0, int(CUT_LIMITS["repeat"][1])), none_value=0,
              none_means="the model's"),
    ParamSpec("data.free_space_margin", 0.2,
              "Completed points more than this (m) in front of the scan's nearest return in their direction "
              "(space the sensor saw through) are dropped; -1 = keep every point.",
              range=(STAGE_OFF, 10.0), none_value=STAGE_OFF, none_means="keep every point"),
    ParamSpec("data.completion_only", False,
              "Publish the completed points alone (measured = 0). Default false: the whole input scan "
              "(every finite point, measured = 1, its intensity) plus the completed points that add to it."),
    ParamSpec("data.compose_distance", 0.3,
              "A completed point within this distance (m) of a measured return adds nothing and is not "
              "published (0 = keep every completed point).", range=(0.0, 5.0)),
    ParamSpec("data.compose_support", 2,
              "A completed point is published only with at least this many other completed points within "
              "2 x compose_distance (stray points are dropped); 0 = keep them all.", range=(0, 100)),
    ParamSpec("sampling.steps", 0, "Diffusion sampler steps; 0 = the checkpoint's default (student: 1-8).",
              range=(0, 1000), none_value=0),
    ParamSpec("sampling.guidance", -1.0,
              "Classifier-free guidance weight (0 or 1 = off, one network call per step); "
              "-1 = the checkpoint's default.", range=(-1.0, 50.0), none_value=-1.0),
    ParamSpec("sampling.seed", 0, "Sampling noise seed (reproducible output); -1 = a fresh seed per scan.",
              range=(-1, INT64_MAX), none_value=-1),
    ParamSpec("sampling.sampler", "",
              "Diffusion sampler: dpmsolver++ (published) or ve (consistent with the local training "
              "process); empty = the checkpoint's own.", choices=("", "dpmsolver++", "ve"), none_value=""),
    ParamSpec("sampling.t0", 0, "Start timestep of sampling (the scan is noised to t0); 0 = the checkpoint's own.",
              range=(0, 999), none_value=0),
    ParamSpec("sampling.noise_clip", 6.0,
              "Longest predicted noise per point: a sampler step moves a point at most this many noise "
              "levels; scans whose predictions are mostly clipped are counted out_of_domain (WARN). "
              "0 = unbounded (the published loop).", range=(0.0, 100.0), none_value=0.0, none_means="unbounded"),
    # --- input handling -------------------------------------------------------------------
    ParamSpec("max_input_points", 500_000,
              "Clouds with more finite points are randomly subsampled to this many (counted).",
              range=(1_000, 50_000_000)),
    ParamSpec("min_input_points", 100, "Clouds with fewer finite points are rejected (counted).",
              range=(1, 1_000_000)),
    ParamSpec("skip_without_subscribers", True,
              "Skip inference (counted) while nothing subscribes to points_completed."),
    ParamSpec("warmup", True, "Run one inference on a synthetic scan before subscribing.", read_only=True),
    # --- QoS --------------------------------------------------------------------------------
    ParamSpec("qos.input.reliability", "best_effort",
              "Input QoS reliability: best_effort (SensorData QoS, matches every publisher) or "
              "reliable (matches reliable publishers only; for lossless bag replay).",
              choices=("best_effort", "reliable"), read_only=True),
    ParamSpec("qos.input.depth", 5, "Input QoS history depth (the node still processes only the latest scan).",
              range=(1, 1000), read_only=True),
    ParamSpec("qos.output.reliability", "reliable",
              "Output QoS reliability (reliable matches RViz and recorders of either kind).",
              choices=("best_effort", "reliable"), read_only=True),
    ParamSpec("qos.output.depth", 2, "Output QoS history depth.", range=(1, 1000), read_only=True),
    # --- diagnostics ------------------------------------------------------------------------
    ParamSpec("diagnostics.period", 1.0, "Seconds between /diagnostics messages.", range=(0.05, 60.0),
              read_only=True),
    ParamSpec("diagnostics.warn_processing_ms", 1000.0,
              "Mean processing time above this (ms, callback to publish) is a WARN.", range=(1.0, 3_600_000.0)),
    ParamSpec("diagnostics.error_processing_ms", 10_000.0,
              "Mean processing time above this (ms), or one batch running this long, is an ERROR.",
              range=(1.0, 3_600_000.0)),
    ParamSpec("diagnostics.stale_input_s", 3.0,
              "An input with no scan for this long (s), counted from activation, is a WARN.", range=(0.1, 86_400.0)),
    ParamSpec("diagnostics.error_after_s", 5.0,
              "A stale input that stays stale this much longer (s) is an ERROR.", range=(0.0, 86_400.0)),
    ParamSpec("diagnostics.warn_output_ratio", 0.1,
              "Completed / accepted scans per second below this is a WARN (dropping scans because the model "
              "is slower than the sensor is normal above it).", range=(0.0, 1.0)),
    ParamSpec("log_throttle_s", 5.0,
              "Each kind of rejected or repaired scan is logged at most once per this many seconds.",
              range=(0.0, 3600.0)),
)

_BY_NAME = {spec.name: spec for spec in PARAMETERS}
# Keys whose sentinel the core converts itself (one conversion for every front end).
_CORE_SPELLING = {"data.free_space_margin": free_space_margin}
assert set(COMPLETION_KEYS) <= set(_BY_NAME), "every completion key needs a ParamSpec"


def defaults() -> dict[str, Any]:
    """``{name: default}`` for every parameter."""
    return {spec.name: list(spec.default) if isinstance(spec.default, list) else spec.default
            for spec in PARAMETERS}


def check_choices(values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the parameter when one of the node's own string values
    (of those in ``values``) is not one of its choices. Values are compared as given:
    ``BEST_EFFORT`` is not ``best_effort``. (The completion keys are the core config's to
    check; the topic and frame lists, settings.py's.)"""
    for spec in PARAMETERS:
        if spec.choices is None or spec.name not in values or spec.name in COMPLETION_KEYS:
            continue
        value = values[spec.name]
        if value in spec.choices:
            continue
        shown = ", ".join(c or "'' (empty)" for c in spec.choices)
        raise ValueError(f"{spec.name}: must be one of {shown}, got {value!r}")


def core_value(key: str, value: Any) -> Any:
    """A completion key's parameter value as the core config spells it (sentinel -> ``None``;
    an int given for a double as a float)."""
    spec = _BY_NAME[key]
    if isinstance(spec.default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if key in _CORE_SPELLING:
        return _CORE_SPELLING[key](value)
    return None if spec.none_value is not None and value == spec.none_value else value


def completion_config(values: Mapping[str, Any]):
    """The core :class:`CompletionConfig` from parameter values (sentinels -> ``None``).

    Raises ``ValueError`` naming the key when a value is out of range; this is the only
    validation the completion keys get, so the limits live in the core library.
    """
    return core_config({key: core_value(key, values.get(key, _BY_NAME[key].default)) for key in COMPLETION_KEYS})


def core_config(dotted: Mapping[str, Any]):
    """The core :class:`CompletionConfig` from its dotted keys in the core's spelling;
    ``ValueError`` naming the key when a value does not fit (a rejected keyword too)."""
    from lidar_completion.config import CompletionConfig

    try:
        return CompletionConfig.from_dict(dict(dotted))
    except TypeError as err:  # a dataclass rejecting a keyword: report it like a bad value
        raise ValueError(str(err)) from None
