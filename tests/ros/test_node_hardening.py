"""Issue 15 on a real node process over DDS: parameters checked against the model's own
limits (at start-up and at run time), the effective range in /diagnostics, a separate
refinement checkpoint, a cheap warm-up whose time is logged, and an overhead that excludes
waiting for the worker."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ros_helpers import make_cloud_msg, parse_summary, shell_points, start_node

#: What the scans would cost at the model's own defaults (teacher: 50 steps, guidance 6).
MODEL_STEPS, MODEL_GUIDANCE = 50, 6.0
#: Steps after the run-time change: a scan's batch runs long enough (> the 0.2 s diagnostics
#: period) to be seen running in /diagnostics.
PAIR_STEPS = 20


@pytest.fixture(scope="module")
def radius_20_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher trained (so its config says) on a 20 m radius."""
    from lidar_completion.checkpoints import save_model
    from lidar_completion.config import ScanCut
    from lidar_completion.model import CompletionModel, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(channel_ratio=0.25, cut=ScanCut.recorded_before(None, 20.0), default_steps=MODEL_STEPS, default_guidance=MODEL_GUIDANCE)
    return save_model(CompletionModel(config), tmp_path_factory.mktemp("radius20") / "model")


@pytest.fixture(scope="module")
def published_refiner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A refinement net in the published ``refine_net.ckpt`` layout (prefix ``model_refine.``)."""
    from lidar_completion.networks import RefinementNet

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("refiner") / "refine_net.ckpt"
    net = RefinementNet(0.25)
    torch.save({"state_dict": {f"model_refine.{k}": v for k, v in net.state_dict().items()}, "epoch": 9}, path)
    return path


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_startup_refuses_what_the_model_cannot_do(domain_id: int, radius_20_model: Path, tmp_path: Path) -> None:
    hostile = tmp_path / "refine_net.ckpt"
    torch.save({"state_dict": {"model_refine.stem.0.kernel": torch.zeros(27, 3, 8)}, "x": _Hostile()}, hostile)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    base = {"checkpoint": str(radius_20_model), "sampling.steps": 1, "sampling.guidance": 1.0, "data.n_part": 256,
            "warmup": False}
    cases = [
        ("min_range_beyond_model", {"data.min_range": 30.0},
         "data.min_range: 30 m leaves no range band: the model completes up to 20 m"),
        ("hostile_refiner", {"refine_checkpoint": str(hostile), "refine": True},
         f"cannot load refine_checkpoint '{hostile}': refused: {hostile} is not a weights-only checkpoint "
         "(it would execute code: "),
        ("missing_refiner", {"refine_checkpoint": "/nonexistent/refine_net.ckpt"},
         "refine_checkpoint '/nonexistent/refine_net.ckpt' not found"),
        ("random_bytes_checkpoint", {"checkpoint": str(noise)}, f"not a checkpoint: {noise}: "),
    ]
    procs = [start_node(domain_id, {**base, **overrides}) for _, overrides, _ in cases]
    for (name, _, expected), proc in zip(cases, procs, strict=True):
        code = proc.wait(300)
        fatal = [line for line in proc.lines if "FATAL" in line]
        assert code == 2, f"{name}: exit status {code}\n{proc.output}"
        assert len(fatal) == 1 and expected in fatal[0], f"{name}:\n{proc.output}"
        assert "Traceback" not in proc.output and "this must never run" not in proc.output, proc.output
        assert "weights_only" not in proc.output, proc.output


def _set_parameters(peer, values: dict) -> list:
    """``ros2 param set`` over the node's service; the node's SetParametersResult list."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    client = peer.node.create_client(SetParameters, "/completion_node/set_parameters")
    peer.spin_until(lambda: client.service_is_ready(), 60, "the set_parameters service")
    request = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
    future = client.call_async(request)
    peer.spin_until(future.done, 120, "the parameter change to be answered")
    peer.node.destroy_client(client)
    return list(future.result().results)


def test_running_node_limits_range_refines_and_times_its_own_overhead(domain_id: int, radius_20_model: Path,
                                                                      published_refiner: Path, peer) -> None:
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Float64

    from lidar_completion_ros.messages import stamp_ns

    peer.watch_diagnostics()
    completed = peer.subscribe(PointCloud2, "/points_completed")
    timings = peer.subscribe(DiagnosticArray, "/completion_node/debug/timings")
    overheads = peer.subscribe(Float64, "/completion_node/debug/overhead_ms")
    waits = peer.subscribe(Float64, "/completion_node/debug/wait_ms")
    pub = peer.publisher(PointCloud2, "/points_raw", depth=10)
    # The model's own setting (50 steps, guidance 6) for the scans; warm-up on (the default).
    params = {"checkpoint": str(radius_20_model), "refine_checkpoint": str(published_refiner), "refine": True,
              "data.max_range": 50.0, "data.n_part": 256, "qos.input.reliability": "reliable", "qos.input.depth": 10,
              "diagnostics.period": 0.2, "log_throttle_s": 0.0}
    node = start_node(domain_id, params)
    try:
        # Item 7: the warm-up runs one network call, not the scans' 100, and says how long it took.
        announced = node.wait_for_line(r"warm-up inference: 1 step without guidance \(scans run (\d+) steps, "
                                       r"guidance ([\d.]+)\)", 300)
        assert (int(announced.group(1)), float(announced.group(2))) == (MODEL_STEPS, MODEL_GUIDANCE)
        done = node.wait_for_line(r"warm-up inference done in (\d+) ms \((\d+) network calls?,", 300)
        assert int(done.group(2)) == 1
        node.wait_for_line(r"ready: /points_raw -> /points_completed", 300)
        assert re.search(r"refinement net from .*refine_net\.ckpt", node.output), node.output
        # Item 4: the cap is said in the log and shown in /diagnostics.
        assert "data.max_range=50 is capped at the radius the model was trained on (20 m)" in node.output
        peer.spin_until(lambda: peer.diagnostics and peer.diagnostics[-1]["output_subscribers"] == "1"
                        and pub.get_subscription_count() >= 1, 120, "node and peer to match")
        diag = peer.diagnostics[-1]
        assert (diag["max_range"], diag["max_range_model"], diag["max_range_effective"], diag["min_range"]) == \
            ("50", "20", "20", "3.5")
        assert diag["refine"] == "true" and diag["refine_checkpoint"] == str(published_refiner)
        assert diag["steps"] == str(MODEL_STEPS)

        # Item 4 at run time: refused with the reason, nothing changed; a sane change applies.
        (refused,) = _set_parameters(peer, {"data.min_range": 30.0})
        assert not refused.successful and "leaves no range band: the model completes up to 20 m" in refused.reason
        (bogus,) = _set_parameters(peer, {"data.preset": "huge"})
        assert not bogus.successful and "data.preset" in bogus.reason
        results = _set_parameters(peer, {"sampling.steps": PAIR_STEPS, "sampling.guidance": 1.0,
                                         "data.max_range": 18.0})
        assert all(r.successful for r in results), [r.reason for r in results]
        peer.spin_until(lambda: peer.diagnostics[-1]["steps"] == str(PAIR_STEPS), 60, "the new setting in /diagnostics")
        assert peer.diagnostics[-1]["max_range_effective"] == "18" and peer.diagnostics[-1]["min_range"] == "3.5"

        # Item 8: a scan that arrives while the worker completes another waits for it, and that
        # wait is not overhead. Whether it did is read from /diagnostics, not from a time: one
        # message shows the first scan's batch running, a later one shows the second scan
        # received while the first is still unanswered. A pair where the first batch ended
        # before either was seen (a slow diagnostics timer) proves nothing and is sent again.
        rng = np.random.default_rng(5)
        sent, waited_stamp = 0, None

        def send() -> None:
            nonlocal sent
            pub.publish(make_cloud_msg(shell_points(4000, rng, 4.0, 17.0), 7_000_000_000 + sent))
            sent += 1

        def answered(d: dict) -> int:
            return sum(int(d[k]) for k in ("completed", "out_of_domain", "dropped", "rejected"))

        def settled() -> bool:
            c = peer.counters()
            return c.get("received") == sent and answered(c) == sent

        def first_running(since: int) -> bool:  # the pair's first scan unanswered, a batch running
            return any(int(d["received"]) == sent and answered(d) < sent and float(d["running_batch_age_s"]) > 0
                       for d in peer.diagnostics[since:])

        for _ in range(3):
            first = len(peer.diagnostics)
            send()  # the first of the pair: nothing else is waiting or running
            peer.spin_until(lambda since=first: settled() or first_running(since), 600,
                            "the worker to start on the first scan of a pair")
            if settled():
                continue  # its batch ended before a diagnostics message showed it running
            second = len(peer.diagnostics)
            send()
            peer.spin_until(settled, 600, f"the node to account for {sent} scans")
            if any(int(d["received"]) == sent and answered(d) == sent - 2 for d in peer.diagnostics[second:]):
                waited_stamp = 7_000_000_000 + sent - 1  # received while the first scan's batch ran
                break
        assert waited_stamp is not None, f"no scan arrived while the worker was busy\n{peer.diagnostics[-1]}"
        peer.spin_until(lambda: len(timings) == peer.counters()["completed"] == len(completed), 120,
                        "the debug timings of every completed scan")
        assert node.interrupt(60) == 0, node.output
    finally:
        node.kill()

    summary = parse_summary(node.output)
    assert summary["rejected"] == 0 and summary["completed"] >= 1, summary
    assert summary["received"] == sent == summary["completed"] + summary["dropped"], summary
    stages = [{kv.key: float(kv.value) for kv in t.status[0].values} for t in timings]
    for s in stages:
        parts = s["convert_ms"] + s["wait_ms"] + s["model_ms"] + s["build_ms"] + s["publish_ms"]
        assert abs(s["processing_ms"] - parts) < 0.05, s
        assert abs(s["overhead_ms"] - (s["convert_ms"] + s["build_ms"] + s["publish_ms"])) < 0.05, s
    # The scan that arrived while the worker was busy waited (its batch began after the other
    # one ended, which was after it arrived), and that wait is in wait_ms, not in overhead_ms.
    (waited,) = [s for s, t in zip(stages, timings, strict=True) if stamp_ns(t.header) == waited_stamp]
    assert waited["wait_ms"] > 0 and abs(waited["processing_ms"] - waited["overhead_ms"] - waited["wait_ms"]
                                         - waited["model_ms"]) < 0.05, waited
    assert sorted(round(m.data, 3) for m in overheads) == sorted(round(s["overhead_ms"], 3) for s in stages)
    # (the status values are printed to 3 decimals: compare within that, not after a rounding
    # that can fall either side of .x5)
    np.testing.assert_allclose(sorted(m.data for m in waits), sorted(s["wait_ms"] for s in stages), atol=0.002)
    # Refined (x6) and within the effective range (18 m after the change).
    from lidar_completion.pointcloud2 import cloud_to_xyz

    for msg in completed:
        xyz = cloud_to_xyz(msg)
        assert len(xyz) > 256 * 10 and np.linalg.norm(xyz, axis=1).max() < 18.0 + 1e-3
