"""Optional: the sensor pose from tf (``frame.tf_sensor_frame``) instead of parameters.

``tf2_ros`` is imported only when the parameter is set; it is not installed in CI (not on
PyPI), so this small path is not covered by the tests (docs/ros.md says so).
"""

from __future__ import annotations

from typing import Any

from .frames import SensorPose, rotation_from_quaternion
from .parameters import StartupError
from .pipeline import Rejected

__all__ = ["TfPoses"]


class TfPoses:
    """Looks up the pose of ``sensor_frame`` in a cloud's frame (latest transform)."""

    def __init__(self, node: Any, sensor_frame: str) -> None:
        try:
            import tf2_ros
        except ImportError:
            raise StartupError("frame.tf_sensor_frame is set but tf2_ros is not importable; "
                               "use frame.sensor_translation / frame.sensor_rpy") from None
        self.sensor_frame = sensor_frame
        self.buffer = tf2_ros.Buffer()
        self.listener = tf2_ros.TransformListener(self.buffer, node)

    def pose(self, configured: SensorPose, frame_id: str) -> SensorPose:
        """``configured`` with its translation and rotation from tf (unchanged for a cloud in a
        frame it does not accept: that is rejected later); ``Rejected`` when tf has none."""
        import rclpy.time

        if not configured.accepts(frame_id):
            return configured

        try:
            t = self.buffer.lookup_transform(frame_id, self.sensor_frame, rclpy.time.Time())
        except Exception as err:
            raise Rejected("frame", f"no transform {frame_id} -> {self.sensor_frame}: {err}") from None
        q, p = t.transform.rotation, t.transform.translation
        rotation = rotation_from_quaternion(q.x, q.y, q.z, q.w)
        return SensorPose(configured.frame_id, (p.x, p.y, p.z), tuple(tuple(r) for r in rotation.tolist()))
