"""The frame contract between a LiDAR's cloud and the model's sensor frame (no ROS import).

The model was trained on clouds in a LiDAR's own frame: origin at the sensor, z up, the
road about 1.73 m below. A cloud in another frame (Autoware's ``base_link``: origin on the
ground under the rear axle) would be completed out of distribution, and the range band
would be measured from the wrong point. So each input has a :class:`SensorPose`: the pose
of the model's sensor frame expressed in the cloud's frame (what a URDF or
``static_transform_publisher base_link velodyne`` gives: translation, then roll/pitch/yaw
about the fixed x, y, z axes, as tf2's ``setRPY``). Points go into the sensor frame before
completion and back afterwards, so the output is in the input's frame with its stamp.

A cloud whose ``frame_id`` is not the configured one is rejected (counted); an empty
configured frame accepts any ``frame_id``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SensorPose", "rotation_from_rpy", "rotation_from_quaternion", "sensor_poses"]


def rotation_from_rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """3x3 rotation ``Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (fixed axes x, y, z; tf2's setRPY)."""
    cr, sr, cp, sp, cy, sy = (math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch),
                              math.cos(yaw), math.sin(yaw))
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def rotation_from_quaternion(x: float, y: float, z: float, w: float) -> np.ndarray:
    """3x3 rotation of a (normalised here) quaternion, as in geometry_msgs/Transform."""
    n = math.sqrt(x * x + y * y + z * z + w * w)
    if not n > 0:
        raise ValueError("zero quaternion")
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


@dataclass(frozen=True)
class SensorPose:
    """The model's sensor frame in an input cloud's frame (``frame_id``; "" = any frame)."""

    frame_id: str = ""
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    @property
    def identity(self) -> bool:
        return np.allclose(self.translation, 0.0) and np.allclose(self.rotation, np.eye(3))

    def accepts(self, frame_id: str) -> bool:
        return not self.frame_id or frame_id == self.frame_id

    def to_model(self, xyz: np.ndarray) -> np.ndarray:
        """Points of the input frame in the model's sensor frame: ``R^T (p - t)``."""
        if self.identity:
            return xyz
        r = np.asarray(self.rotation, dtype=np.float64)
        return ((xyz.astype(np.float64) - np.asarray(self.translation)) @ r).astype(np.float32)

    def from_model(self, xyz: np.ndarray) -> np.ndarray:
        """Points of the model's sensor frame back in the input frame: ``R p + t``."""
        if self.identity:
            return xyz
        r = np.asarray(self.rotation, dtype=np.float64)
        return (xyz.astype(np.float64) @ r.T + np.asarray(self.translation)).astype(np.float32)

    def describe(self) -> str:
        if self.identity:
            return f"{self.frame_id or '(any frame)'}: identity"
        t = ", ".join(f"{v:g}" for v in self.translation)
        return f"{self.frame_id or '(any frame)'}: sensor at [{t}]"


def _per_input(name: str, values: Sequence, width: int, n_inputs: int) -> list:
    """``values`` holds ``width`` entries for all inputs or ``width`` per input."""
    values = list(values)
    if len(values) == width:
        return [values] * n_inputs
    if len(values) == width * n_inputs:
        return [values[i * width:(i + 1) * width] for i in range(n_inputs)]
    per = f"{width} number{'s' * (width > 1)}" if width > 1 else "1 entry"
    raise ValueError(f"{name}: {len(values)} values for {n_inputs} input(s); give {per} for all inputs "
                     f"or {per} per input")


def sensor_poses(n_inputs: int, frames: Sequence[str], translation: Sequence[float],
                 rpy: Sequence[float]) -> list[SensorPose]:
    """One :class:`SensorPose` per input from the ``frame.*`` parameters; ``ValueError``
    naming the parameter when a list has the wrong length or a value is not finite."""
    frame_ids = [f[0] for f in _per_input("frame.input_frames", frames, 1, n_inputs)]
    moves = _per_input("frame.sensor_translation", translation, 3, n_inputs)
    turns = _per_input("frame.sensor_rpy", rpy, 3, n_inputs)
    for name, groups in (("frame.sensor_translation", moves), ("frame.sensor_rpy", turns)):
        if not all(math.isfinite(float(v)) for g in groups for v in g):
            raise ValueError(f"{name}: values must be finite numbers")
    return [SensorPose(frame, (float(t[0]), float(t[1]), float(t[2])),  # _per_input: 3 values
                       tuple(tuple(row) for row in rotation_from_rpy(*(float(v) for v in a)).tolist()))
            for frame, t, a in zip(frame_ids, moves, turns, strict=True)]
