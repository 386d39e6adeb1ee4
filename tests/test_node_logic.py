"""The ROS package's ROS-free parts, without DDS: frames, the batching mailbox, input checks
and output layout, counters and diagnostics levels, parameter lists (issue 13)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from lidar_completion.children import parameter_args
from lidar_completion.pointcloud2 import build_cloud, read_fields

frames = pytest.importorskip("lidar_completion_ros.frames")
from lidar_completion_ros.health import ERROR, OK, WARN, Health, Throttle  # noqa: E402
from lidar_completion_ros.parameters import defaults  # noqa: E402
from lidar_completion_ros.pipeline import Mailbox, Rejected, output_arrays, read_scan  # noqa: E402
from lidar_completion_ros.settings import DiagnosticsSettings, settings_from  # noqa: E402
from lidar_completion_ros.timings import ScanTimings  # noqa: E402


class _Header:
    def __init__(self, frame_id: str = "velodyne") -> None:
        self.frame_id = frame_id


def _cloud(xyz: np.ndarray, frame_id: str = "velodyne", intensity: np.ndarray | None = None):
    extra = {"intensity": intensity} if intensity is not None else None
    return build_cloud(xyz, _Header(frame_id), _Msg, _Field, extra=extra, data_as="bytes")


class _Msg:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


class _Field(_Msg):
    pass


# ----------------------------------------------------------------------------- frames
def test_rpy_matches_tf2_convention_and_round_trips() -> None:
    r = frames.rotation_from_rpy(0.1, -0.2, 0.7)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    # yaw only: x axis turns towards y
    np.testing.assert_allclose(frames.rotation_from_rpy(0, 0, math.pi / 2) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    # The same rotation as a quaternion (tf2 gives those).
    cy, sy, cp, sp, cr, sr = (math.cos(0.35), math.sin(0.35), math.cos(-0.1), math.sin(-0.1),
                              math.cos(0.05), math.sin(0.05))
    q = (sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy,
         cr * cp * cy + sr * sp * sy)
    np.testing.assert_allclose(frames.rotation_from_quaternion(*q), r, atol=1e-12)
    pose = frames.SensorPose("base_link", (1.2, -0.3, 1.73), tuple(map(tuple, r.tolist())))
    pts = np.random.default_rng(0).uniform(-30, 30, (500, 3)).astype(np.float32)
    np.testing.assert_allclose(pose.from_model(pose.to_model(pts)), pts, atol=1e-4)
    # The sensor origin in base_link is the translation; base_link's origin is below the sensor.
    np.testing.assert_allclose(pose.from_model(np.zeros((1, 3), np.float32))[0], (1.2, -0.3, 1.73), atol=1e-6)
    assert pose.accepts("base_link") and not pose.accepts("velodyne")
    assert frames.SensorPose().accepts("anything") and frames.SensorPose().identity


def test_sensor_pose_lists_one_for_all_or_one_per_input() -> None:
    values = {**defaults(), "input_topics": ["a", "b"], "output_topics": ["a_out", "b_out"],
              "frame.input_frames": ["base_link"], "frame.sensor_translation": [0.0, 0.0, 1.73, 1.0, 0.0, 1.5],
              "frame.sensor_rpy": [0.0, 0.0, 0.0]}
    poses = settings_from(values).frames.poses
    assert [p.frame_id for p in poses] == ["base_link", "base_link"]
    assert poses[0].translation == (0.0, 0.0, 1.73) and poses[1].translation == (1.0, 0.0, 1.5)
    for key, bad, needle in [("frame.sensor_translation", [0.0, 1.0], "frame.sensor_translation: 2 values"),
                             ("frame.input_frames", ["a", "b", "c"], "frame.input_frames: 3 values"),
                             ("frame.sensor_rpy", [0.0, math.nan, 0.0], "frame.sensor_rpy: values must be finite"),
                             ("output_topics", ["x"], "output_topics: give one distinct topic per input"),
                             ("input_topics", ["a", "a"], "input_topics: give one or more distinct")]:
        with pytest.raises(ValueError, match=needle):
            settings_from({**values, key: bad})


def test_parameter_args_write_typed_lists() -> None:
    args = parameter_args({"input_topics": ["a", "b"], "frame.sensor_translation": [0.0, 1, 1.73]})
    assert args == ["-p", "input_topics:=['a', 'b']", "-p", "frame.sensor_translation:=[0.0, 1.0, 1.73]"]


# ----------------------------------------------------------------------------- input and output
def test_read_scan_checks_frame_repairs_and_moves_into_the_sensor_frame() -> None:
    rng = np.random.default_rng(1)
    pose = frames.sensor_poses(1, ["base_link"], [0.5, 0.0, 1.73], [0.0, 0.0, 0.4])[0]
    xyz = rng.uniform(-20, 20, (400, 3)).astype(np.float32)
    xyz[:7, 1] = np.nan
    intensity = np.arange(400, dtype=np.float32)
    msg = _cloud(xyz, "base_link", intensity)
    scan = read_scan(msg, 0, pose, time.perf_counter(), min_points=10, max_points=10_000, rng=rng,
                     keep_intensity=True)
    assert scan.nonfinite == 7 and len(scan.xyz) == 393
    np.testing.assert_allclose(scan.xyz, pose.to_model(xyz[7:]), atol=1e-5)
    np.testing.assert_array_equal(scan.intensity, intensity[7:])
    with pytest.raises(Rejected) as wrong:
        read_scan(_cloud(xyz, "velodyne"), 0, pose, 0.0, min_points=10, max_points=10_000, rng=rng)
    assert wrong.value.reason == "frame" and "expected 'base_link'" in wrong.value.detail
    with pytest.raises(Rejected) as small:
        read_scan(msg, 0, pose, 0.0, min_points=1000, max_points=10_000, rng=rng)
    assert small.value.reason == "too_small"
    sub = read_scan(msg, 0, pose, 0.0, min_points=10, max_points=100, rng=rng, keep_intensity=True)
    assert sub.subsampled_from == 393 and len(sub.xyz) == len(sub.intensity) == 100

    # The core's composed result (model frame): the scan's points, then completed ones.
    from lidar_completion.completer import CompletionResult

    completed = rng.uniform(-5, 5, (50, 3)).astype(np.float32)
    model_input = scan.model_input()
    assert model_input.shape == (393, 4)
    measured = np.r_[np.ones(393, bool), np.zeros(50, bool)]
    result = CompletionResult(np.vstack([scan.xyz, completed]), {}, 1, 1.0, 1, 400, 393, measured=measured,
                              intensity=np.r_[model_input[:, 3], np.zeros(50, np.float32)])
    out_xyz, extra = output_arrays(result, scan)
    assert len(out_xyz) == 393 + 50
    np.testing.assert_allclose(out_xyz[393:], pose.from_model(completed), atol=1e-5)
    np.testing.assert_allclose(out_xyz[:393], xyz[7:], atol=1e-4)  # the measured points where they were
    assert extra["measured"].dtype == np.uint8 and extra["measured"].sum() == 393
    np.testing.assert_array_equal(extra["intensity"][:393], intensity[7:])
    assert not extra["intensity"][393:].any()
    cloud = build_cloud(out_xyz, _Header("base_link"), _Msg, _Field, extra=extra, data_as="bytes")
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "intensity", "measured"]
    assert read_fields(cloud, ["measured"])["measured"].sum() == 393


def test_mailbox_keeps_the_latest_scan_per_input_and_batches_waiting_ones() -> None:
    from lidar_completion_ros.pipeline import Scan

    def scan(index: int, tag: int) -> Scan:
        return Scan(index, tag, np.zeros((1, 3), np.float32), frames.SensorPose(), 0.0, 1)

    box = Mailbox(2)
    assert box.put(scan(0, 1)) is None
    assert box.put(scan(0, 2)).header == 1  # replaced: dropped
    assert [s.header for s in box.take()] == [2]
    # gather: the worker waits for the other input's scan (up to the limit)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(box.take(gather_s=30.0)))
    box.put(scan(1, 7))
    worker.start()
    worker.join(0.5)
    assert worker.is_alive() and not got  # still gathering half a second later, not merely not started
    box.put(scan(0, 8))
    worker.join(10)
    assert sorted(s.header for s in got[0]) == [7, 8]
    box.put(scan(1, 9))
    assert [s.header for s in box.close()] == [9] and box.take() is None


# ----------------------------------------------------------------------------- health
SETTINGS = DiagnosticsSettings(period=1.0, stale_input_s=1.0, error_after_s=2.0, warn_processing_ms=100.0,
                               error_processing_ms=1000.0, warn_output_ratio=0.5)


def _levels(health: Health, now: float, **kw) -> dict[str, tuple[int, str]]:
    args = {"active": True, "worker_alive": True, "outputs": {}, "model": {}} | kw
    return {t.task: (t.level, t.message) for t in health.evaluate(now, SETTINGS, **args)}


def test_no_input_after_activation_warns_then_errors() -> None:
    health = Health(["/a", "/b"])
    health.activated(100.0)
    assert _levels(health, 100.5)["input"][0] == OK
    level, message = _levels(health, 101.5)["input"]
    assert level == WARN and "no scan for 1.5 s on /a" in message and "/b" in message
    assert _levels(health, 103.5)["input"][0] == ERROR
    health.received(0, 103.6)
    health.received(1, 103.6)
    assert _levels(health, 103.7)["input"][0] == OK
    assert _levels(health, 103.7, active=False)["input"] == (OK, "inactive (lifecycle): not subscribed")


def test_levels_come_from_rates_and_times_not_from_a_single_drop() -> None:
    health = Health(["/a"])
    health.activated(0.0)
    t = 10.0
    for i in range(20):  # 10 Hz in, every other scan completed: drops by design
        health.received(0, t + 0.1 * i)
        health.accepted(0, t + 0.1 * i)
        if i % 2:
            health.completed(0, ScanTimings(model_ms=50.0), t + 0.1 * i)
        else:
            health.add(0, "dropped")
    levels = _levels(health, t + 2.0)
    assert levels["output"][0] == OK and levels["input"][0] == OK and levels["processing"][0] == OK
    # Below the ratio: WARN; processing above its thresholds: WARN, then ERROR.
    for i in range(30):
        health.received(0, t + 2 + 0.1 * i)
        health.accepted(0, t + 2 + 0.1 * i)
    assert _levels(health, t + 5.0)["output"][0] == WARN
    health.completed(0, ScanTimings(model_ms=2000.0), t + 5.0)  # mean of the window: ~230 ms
    assert _levels(health, t + 5.0)["processing"][0] == WARN
    health.busy_since = t + 5.0
    assert _levels(health, t + 6.5)["processing"][0] == ERROR  # one batch running > 1000 ms


def test_a_running_batch_shows_its_age_and_warns_past_the_processing_bound() -> None:
    """Issue 28, item 6: a batch that is still running counts, not only finished ones: its age
    is a value of the processing task, WARN past warn_processing_ms, ERROR past error_processing_ms."""
    health = Health(["/a"])
    health.activated(0.0)
    processing = {t.task: t for t in health.evaluate(1.0, SETTINGS, True, True, {}, {})}["processing"]
    assert processing.level == OK and processing.values["running_batch_age_s"] == "0.00"
    health.batch_started(10.0)
    for now, level in ((10.05, OK), (10.5, WARN), (11.5, ERROR)):  # bounds: 100 ms, 1000 ms
        processing = {t.task: t for t in health.evaluate(now, SETTINGS, True, True, {}, {})}["processing"]
        assert processing.level == level, (now, processing)
        assert processing.values["running_batch_age_s"] == f"{now - 10.0:.2f}"
    assert "a batch has run 500 ms > 100 ms" in {t.task: t for t in health.evaluate(
        10.5, SETTINGS, True, True, {}, {})}["processing"].message
    health.batch_done(None)
    assert {t.task: t for t in health.evaluate(12.0, SETTINGS, True, True, {}, {})}["processing"].level == OK


def test_in_flight_scans_are_answered_once_by_whichever_thread_claims_them() -> None:
    """Issue 28, item 1: the worker claims a scan before publishing it; a shutdown that cannot
    wait claims the rest as abandoned. No scan is counted twice, none is lost."""
    from lidar_completion_ros.pipeline import InFlight, Scan

    scans = [Scan(i, i, np.zeros((1, 3), np.float32), frames.SensorPose(), 0.0, 1) for i in range(3)]
    flight = InFlight()
    flight.start(scans)
    assert flight.claim(scans[0]) and not flight.claim(scans[0])  # the worker answered scan 0
    assert flight.claim_all() == scans[1:]  # the shutdown takes the rest
    assert not flight.claim(scans[1]) and flight.claim_all() == []  # the worker finds them gone
    # Racing threads: every scan goes to exactly one of them.
    for _ in range(20):
        many = [Scan(i, i, np.zeros((1, 3), np.float32), frames.SensorPose(), 0.0, 1) for i in range(200)]
        flight.start(many)
        won: list = []
        worker = threading.Thread(target=lambda won=won, many=many: won.extend(s for s in many if flight.claim(s)))
        worker.start()
        rest = flight.claim_all()
        worker.join()
        assert sorted(s.index for s in won + rest) == list(range(200))


def test_consecutive_failures_and_counters_per_input() -> None:
    health = Health(["/a", "/b"])
    assert health.batch_done("RuntimeError: x") == 1
    assert health.batch_done("RuntimeError: y") == 2
    level, message = _levels(health, 1.0)["output"]
    assert level == ERROR and "2 in a row" in message and "y" in message
    assert health.batch_done(None) == 0
    health.received(0, 1.0)
    health.add(0, "rejected", reason="frame")
    health.received(1, 1.0)
    assert health.counters(0)["rejected.frame"] == 1 and health.counters(1)["rejected"] == 0
    assert health.counters()["received"] == 2
    values = {t.task: t.values for t in health.evaluate(1.0, SETTINGS, True, True, {}, {})}
    assert values["input"]["/a.rejected"] == "1" and values["input"]["/b.received"] == "1"
    assert _levels(health, 1.0, worker_alive=False)["output"] == (ERROR, "worker thread died")
    assert _levels(health, 1.0, model={"device_requested": "auto", "device": "cpu"})["model"][0] == WARN
    assert _levels(health, 1.0, model={"device_requested": "cpu", "device": "cpu"})["model"][0] == OK


def test_throttle_says_how_many_it_held_back() -> None:
    throttle = Throttle()
    assert throttle.message("k", "bad", 0.0, 5.0) == "bad"
    assert throttle.message("k", "bad", 1.0, 5.0) is None
    assert throttle.message("k", "bad", 2.0, 5.0) is None
    assert throttle.message("k", "bad", 6.0, 5.0) == "bad (2 more like this in the last 6 s)"


def test_timings_add_up() -> None:
    tm = ScanTimings(convert_ms=1, wait_ms=2, model_ms=30, build_ms=0.5, publish_ms=0.25)
    assert tm.processing_ms == 33.75 and tm.overhead_ms == 1.75
    assert {"pipeline_latency_ms", "cyclic_time_ms", "processing_time_ms"} <= set(tm.scalars())


def test_a_batch_with_an_unusable_scan_still_completes_the_others(tmp_path) -> None:
    """complete_scans on a real (tiny, random) model: one ``complete_batch`` call; a scan with
    no point in the range band is reported and gets None, the other is still completed."""
    import torch

    from lidar_completion.model import CompletionModel, ModelConfig
    from lidar_completion_ros.parameters import completion_config
    from lidar_completion.completer import SceneCompleter
    from lidar_completion_ros.pipeline import Scan, complete_scans

    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25))
    config = completion_config({**defaults(), "device": "cpu", "sampling.steps": 1, "sampling.guidance": 1.0,
                                "data.n_part": 128, "data.repeat": 2})
    completer = SceneCompleter(model, config)
    rng = np.random.default_rng(2)
    good = rng.uniform(-20, 20, (600, 3)).astype(np.float32)
    direction = rng.normal(size=(600, 3))
    far = (direction / np.linalg.norm(direction, axis=1, keepdims=True) * rng.uniform(100, 200, (600, 1)))
    far = far.astype(np.float32)  # every point beyond max_range (50 m)
    batch = [Scan(i, i, xyz, frames.SensorPose(), 0.0, len(xyz)) for i, xyz in enumerate((good, far))]
    reported = []
    results = complete_scans(completer, batch, lambda scan, why: reported.append((scan.index, why)))
    assert results[1] is None and [i for i, _ in reported] == [1] and "no finite point" in reported[0][1]
    assert results[0] is not None and len(results[0].points) > 0
    both = complete_scans(completer, [batch[0], Scan(1, 1, good, frames.SensorPose(), 0.0, 600)], None)
    assert len(both) == 2 and all(len(r.points) > 0 for r in both)  # one batch of two


# ----------------------------------------------------------------------------- settings
def test_settings_are_built_once_typed_and_a_change_makes_a_new_object() -> None:
    import dataclasses

    settings = settings_from(defaults())
    assert settings.topics.inputs == ("points_raw",) and settings.qos.input_reliability == "best_effort"
    assert settings.completion.sampling.steps is None and settings.completion.data.free_space_margin == 0.2
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.limits.log_throttle_s = 1.0  # type: ignore[misc]
    changed, touched = settings.with_changes({"sampling.steps": 2, "diagnostics.warn_processing_ms": 5,
                                              "data.free_space_margin": -1.0, "not_a_parameter": 1})
    assert touched == {"sampling.steps", "diagnostics.warn_processing_ms", "data.free_space_margin"}
    assert changed.completion.sampling.steps == 2 and changed.completion.data.free_space_margin is None
    assert changed.diagnostics.warn_processing_ms == 5.0 and isinstance(changed.diagnostics.warn_processing_ms, float)
    assert changed.frames is settings.frames and settings.completion.sampling.steps is None  # the old one stays
    back, _ = changed.with_changes({"sampling.steps": 0})  # the sentinel: the checkpoint's own again
    assert back.completion == dataclasses.replace(changed.completion, sampling=settings.completion.sampling)
    for change, needle in [({"data.preset": "huge"}, "data.preset"),
                           ({"qos.input.reliability": "bogus"}, "qos.input.reliability: must be one of"),
                           ({"frame.sensor_translation": [0.0, 1.0]}, "frame.sensor_translation: 2 values")]:
        with pytest.raises(ValueError, match=needle):
            settings.with_changes(change)
