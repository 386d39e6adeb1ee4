"""Issue 13 on a real node process over DDS: frames, several LiDARs in one batch, the output
layout, the managed lifecycle, QoS overrides and the no-input WARN; issue 28, item 6: the
"ready" line states the QoS in effect (after an override), and the shutdown transition
(finalized) ends the process with status 0."""

from __future__ import annotations

import numpy as np
from ros_helpers import make_cloud_msg, parse_summary, shell_points, start_node
from scipy.spatial import cKDTree
from sensor_msgs.msg import PointCloud2

from lidar_completion.pointcloud2 import cloud_to_xyz, read_fields
from lidar_completion_ros.frames import sensor_poses


def _stamp(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def test_two_lidars_in_their_own_frames_complete_in_one_batch(domain_id: int, model, peer) -> None:
    from diagnostic_msgs.msg import DiagnosticArray

    frames, moves, turns = ["base_link", "lidar_b"], [1.0, -0.5, 1.73, 0.0, 0.0, 0.0], [0.0, 0.0, 0.6, 0.0, 0.0, 0.0]
    poses = sensor_poses(2, frames, moves, turns)
    params = {"checkpoint": str(model.path), **model.overrides, "warmup": False,
              "input_topics": ["lidar_a/points", "lidar_b/points"],
              "output_topics": ["lidar_a/completed", "lidar_b/completed"],
              "frame.input_frames": frames, "frame.sensor_translation": moves, "frame.sensor_rpy": turns,
              "batch.gather_ms": 120_000.0, "data.max_range": 18.0,
              "qos.input.reliability": "reliable", "qos.input.depth": 10, "diagnostics.period": 0.2}
    peer.watch_diagnostics()
    out_a = peer.subscribe(PointCloud2, "/lidar_a/completed")
    out_b = peer.subscribe(PointCloud2, "/lidar_b/completed")
    timings = peer.subscribe(DiagnosticArray, "/completion_node/debug/timings")
    pub_a = peer.publisher(PointCloud2, "/lidar_a/points")
    pub_b = peer.publisher(PointCloud2, "/lidar_b/points")
    node = start_node(domain_id, params)
    rng = np.random.default_rng(3)
    # Scans as each LiDAR sees them (sensor frame), then as its driver publishes them.
    seen_a, seen_b = shell_points(3000, rng, 4.0, 16.0), shell_points(2500, rng, 4.0, 16.0)
    cloud_a, cloud_b = poses[0].from_model(seen_a), poses[1].from_model(seen_b)
    assert np.abs(cloud_a - seen_a).max() > 1.0  # base_link is not the sensor frame
    try:
        node.wait_for_line(r"ready: /lidar_a/points, /lidar_b/points -> /lidar_a/completed, /lidar_b/completed", 300)
        peer.spin_until(lambda: peer.diagnostics and peer.diagnostics[-1].get("output_subscribers") == "2"
                        and pub_a.get_subscription_count() and pub_b.get_subscription_count(), 120,
                        "node and peer to match")
        pub_a.publish(make_cloud_msg(cloud_a, 11_000_000_001, "base_link"))
        pub_b.publish(make_cloud_msg(cloud_b, 22_000_000_002, "lidar_b"))
        peer.spin_until(lambda: out_a and out_b and len(timings) >= 2, 600, "both completions")
        # A cloud in a frame that is not the configured one: rejected and counted, per input.
        pub_a.publish(make_cloud_msg(seen_a, 33_000_000_003, "velodyne"))
        peer.spin_until(lambda: peer.counters().get("rejected.frame") == 1, 120, "the wrong frame to be counted")
        assert peer.diagnostics[-1]["/lidar_a/points.rejected"] == "1"
        assert peer.diagnostics[-1]["/lidar_b/points.rejected"] == "0"
        assert node.interrupt(60) == 0, node.output
    finally:
        node.kill()

    assert "rejected scan (stamp 33.000, frame 'velodyne'): cloud is not in the configured frame" in node.output
    summary = parse_summary(node.output)
    assert (summary["received"], summary["completed"], summary["rejected"]) == (3, 2, 1), summary
    # Each output carries its own input's header; both were completed in one batch.
    assert (out_a[0].header.frame_id, _stamp(out_a[0])) == ("base_link", 11_000_000_001)
    assert (out_b[0].header.frame_id, _stamp(out_b[0])) == ("lidar_b", 22_000_000_002)
    stages = {_stamp(t): {kv.key: kv.value for kv in t.status[0].values} for t in timings}
    assert stages[11_000_000_001]["batch_size"] == stages[22_000_000_002]["batch_size"] == "2"
    assert float(stages[11_000_000_001]["pipeline_latency_ms"]) > 0

    for msg, seen, cloud, pose in ((out_a[0], seen_a, cloud_a, poses[0]), (out_b[0], seen_b, cloud_b, poses[1])):
        assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity", "measured"]
        xyz, measured = cloud_to_xyz(msg), read_fields(msg, ["measured"])["measured"].astype(bool)
        # The input's own points come back unchanged, in the input frame.
        np.testing.assert_allclose(xyz[measured], cloud, atol=1e-4)
        completed = xyz[~measured]
        assert len(completed) > 100
        # In the sensor frame (the transform inverted) the completion obeys the model's range
        # band and the height band of the scan; in the input frame it lies where the scan is.
        in_sensor = pose.to_model(completed)
        assert np.linalg.norm(in_sensor, axis=1).max() < 18.0 + 1e-3
        assert in_sensor[:, 2].max() <= seen[:, 2].max() + 1e-3
        near = cKDTree(cloud).query(completed, distance_upper_bound=5.0)[0]
        assert np.mean(np.isfinite(near)) > 0.9


def _lifecycle(peer, transition: str | None = None) -> int:
    """Change the node's state over its lifecycle services (or just read it); the state id."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    if transition is not None:
        client = peer.node.create_client(ChangeState, "/completion_node/change_state")
        peer.spin_until(client.service_is_ready, 120, "the change_state service")
        future = client.call_async(ChangeState.Request(
            transition=Transition(id=getattr(Transition, f"TRANSITION_{transition.upper()}"))))
        peer.spin_until(future.done, 600, f"the {transition} transition")
        assert future.result().success, transition
        peer.node.destroy_client(client)
    client = peer.node.create_client(GetState, "/completion_node/get_state")
    peer.spin_until(client.service_is_ready, 120, "the get_state service")
    future = client.call_async(GetState.Request())
    peer.spin_until(future.done, 120, "the state")
    peer.node.destroy_client(client)
    return future.result().current_state.id


def _shutdown(peer) -> None:
    """Ask for the shutdown transition; the node may exit before its answer arrives."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    client = peer.node.create_client(ChangeState, "/completion_node/change_state")
    peer.spin_until(client.service_is_ready, 120, "the change_state service")
    client.call_async(ChangeState.Request(transition=Transition(id=Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)))


def test_lifecycle_qos_override_and_no_input_warning(domain_id: int, model, peer) -> None:
    from lifecycle_msgs.msg import State
    from rclpy.qos import ReliabilityPolicy

    params = {"checkpoint": str(model.path), **model.overrides, "warmup": False, "autostart": False,
              # The standard override beats the node's own qos.input.reliability (best_effort).
              "qos_overrides./points_raw.subscription.reliability": "reliable",
              "diagnostics.period": 0.2, "diagnostics.stale_input_s": 1.0, "diagnostics.error_after_s": 3600.0}
    peer.watch_diagnostics()
    completed = peer.subscribe(PointCloud2, "/points_completed")
    pub = peer.publisher(PointCloud2, "/points_raw")
    node = start_node(domain_id, params)
    rng = np.random.default_rng(4)
    graph = peer.node
    try:
        assert _lifecycle(peer) == State.PRIMARY_STATE_UNCONFIGURED
        assert graph.count_publishers("/points_completed") == 0 and not peer.diagnostics
        assert _lifecycle(peer, "configure") == State.PRIMARY_STATE_INACTIVE
        node.wait_for_line(r"loaded .* on cpu", 60)
        peer.spin_until(lambda: peer.tasks.get("input"), 120, "diagnostics while inactive")
        assert peer.tasks["input"][-1][:2] == (0, "inactive (lifecycle): not subscribed")
        assert graph.count_subscribers("/points_raw") == 0
        pub.publish(make_cloud_msg(shell_points(3000, rng, 4.0, 16.0), 1_000_000_001))  # nobody listens

        assert _lifecycle(peer, "activate") == State.PRIMARY_STATE_ACTIVE
        peer.spin_until(lambda: graph.count_subscribers("/points_raw") == 1 and pub.get_subscription_count(), 120,
                        "the node's subscription")
        (info,) = graph.get_subscriptions_info_by_topic("/points_raw")
        assert info.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        # The log says what is in effect, not qos.input.reliability (best_effort).
        node.wait_for_line(r"ready: /points_raw -> /points_completed \(input QoS reliable/5, output QoS reliable/2;", 60)
        # No scan since activation: the input task warns (not before activation).
        peer.spin_until(lambda: any(lv == 1 and "no scan for" in msg for lv, msg, _ in peer.tasks["input"]), 120,
                        "the no-input WARN")
        peer.spin_until(lambda: peer.diagnostics[-1].get("output_subscribers") == "1", 120, "the node to see us")
        pub.publish(make_cloud_msg(shell_points(3000, rng, 4.0, 16.0), 2_000_000_002))
        peer.spin_until(lambda: completed, 600, "a completion while active")

        assert _lifecycle(peer, "deactivate") == State.PRIMARY_STATE_INACTIVE
        peer.spin_until(lambda: graph.count_subscribers("/points_raw") == 0, 120, "the subscription to go")
        pub.publish(make_cloud_msg(shell_points(3000, rng, 4.0, 16.0), 3_000_000_003))  # while inactive
        assert _lifecycle(peer, "activate") == State.PRIMARY_STATE_ACTIVE
        peer.spin_until(lambda: pub.get_subscription_count() == 1, 120, "the node's subscription again")
        pub.publish(make_cloud_msg(shell_points(3000, rng, 4.0, 16.0), 4_000_000_004))
        peer.spin_until(lambda: len(completed) >= 2, 600, "a completion after re-activation")

        assert _lifecycle(peer, "deactivate") == State.PRIMARY_STATE_INACTIVE
        assert _lifecycle(peer, "cleanup") == State.PRIMARY_STATE_UNCONFIGURED
        node.wait_for_line(r"cleaned up: model released", 60)
        peer.spin_until(lambda: graph.count_publishers("/points_completed") == 0, 120, "the publisher to go")
        # shutdown (unconfigured -> finalized): nothing can leave finalized, so the process
        # exits 0 by itself (docs/ros.md, "The node"), as under a launch file it would too.
        _shutdown(peer)
        peer.spin_until(lambda: node.returncode is not None, 30, "the finalized node to exit")
        assert node.wait(10) == 0, node.output
    finally:
        node.kill()

    # Nothing was taken in or published while inactive or unconfigured.
    assert [_stamp(m) for m in completed] == [2_000_000_002, 4_000_000_004]
    summary = parse_summary(node.output)
    assert (summary["received"], summary["completed"]) == (2, 2), summary
    assert "shut down (lifecycle): finalized, exiting" in node.output
    assert "Traceback" not in node.output


def test_runtime_exits_3_when_the_node_gives_up(domain_id: int, monkeypatch, capfd) -> None:
    """The executable's loop (runtime.run_managed_node, what ``main`` runs): a node that sets
    ``fatal`` (the completion node does after ``max_consecutive_failures`` failed batches,
    see tests/test_node_logic.py) ends the process with one FATAL line and status 3."""
    from rclpy.node import Node

    from lidar_completion_ros.runtime import EXIT_FAILURES, run_managed_node

    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain_id))

    class GivesUp(Node):
        autostart, configure_error, fatal = False, "", ""

        def __init__(self) -> None:
            super().__init__("gives_up")
            self.create_timer(0.1, self._fail)

        def _fail(self) -> None:
            self.fatal = "inference failed 5 times in a row (max_consecutive_failures): RuntimeError: boom"

        def close(self) -> dict[str, int]:
            return {"received": 5, "rejected": 5}

    assert run_managed_node(GivesUp, "gives_up", ["gives_up"]) == EXIT_FAILURES
    err = capfd.readouterr().err
    assert "[FATAL]" in err and "inference failed 5 times in a row" in err
    assert "[gives_up] summary: received=5 rejected=5" in err
