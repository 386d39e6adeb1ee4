"""A node that cannot start says why in one line and exits non-zero; SIGTERM ends it cleanly."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from ros_helpers import TINY_OVERRIDES, start_node

# (case id, parameter overrides, text the FATAL line must contain)
CASES = [
    ("missing_checkpoint", {"checkpoint": "/nonexistent/student"}, "checkpoint '/nonexistent/student' not found"),
    ("out_of_ros_range", {"sampling.steps": 5000}, "sampling.steps"),
    ("core_config_rule", {"data.min_range": 60.0}, "data.min_range"),
    ("wrong_type", {"data.max_range": 50}, "data.max_range: expected double"),
    ("bad_choice", {"device": "gpu"}, "device: must be auto, cpu, cuda"),
    ("unknown_parameter", {"sampling.step": 3}, "unknown parameter(s) sampling.step"),
    ("refine_without_refiner", {"refine": True}, "with these parameters: refine is on but the checkpoint has no"),
    # String choices rclpy does not enforce: caught before the model loads (issue 15, item 1).
    ("bad_input_qos", {"qos.input.reliability": "bogus"}, "qos.input.reliability: must be one of best_effort, reliable"),
    ("upper_case_qos", {"qos.input.reliability": "BEST_EFFORT"}, "got 'BEST_EFFORT'"),
    ("bad_output_qos", {"qos.output.reliability": "bogus"}, "qos.output.reliability: must be one of"),
    ("bad_sampler", {"sampling.sampler": "ddim"}, "sampling.sampler: must be one of"),
    ("t0_below_steps", {"sampling.t0": 3, "sampling.steps": 8}, "sampling.steps=8 exceeds the timesteps"),
]
#: Parameter problems found before the checkpoint is even read.
BEFORE_LOADING = {"out_of_ros_range", "core_config_rule", "wrong_type", "bad_choice", "unknown_parameter",
                  "bad_input_qos", "upper_case_qos", "bad_output_qos", "bad_sampler"}


def test_startup_failures_exit_non_zero_with_one_clear_line(domain_id: int, tiny_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    cases = CASES + [("corrupt_checkpoint", {"checkpoint": str(broken)}, f"cannot load checkpoint '{broken}'")]
    # All at once: each is mostly interpreter + torch start-up.
    procs = []
    for _name, overrides, _ in cases:
        params = {"checkpoint": str(tiny_checkpoint), **TINY_OVERRIDES, "warmup": False, **overrides}
        procs.append(start_node(domain_id, params))
    for (name, _, expected), proc in zip(cases, procs, strict=True):
        code = proc.wait(300)
        fatal = [line for line in proc.lines if "FATAL" in line]
        assert code == 2, f"{name}: exit status {code}\n{proc.output}"
        assert len(fatal) == 1, f"{name}: expected one FATAL line\n{proc.output}"
        assert "cannot start:" in fatal[0] and expected in fatal[0], f"{name}: {fatal[0]}"
        assert "Traceback" not in proc.output, f"{name}: traceback shown\n{proc.output}"
        if name in BEFORE_LOADING:
            assert "loaded " not in proc.output and "warm-up" not in proc.output, f"{name}: checked too late\n{proc.output}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_shuts_down_cleanly(domain_id: int, tiny_checkpoint: Path, peer, sig: int) -> None:
    peer.watch_diagnostics()
    node = start_node(domain_id, {"checkpoint": str(tiny_checkpoint), **TINY_OVERRIDES, "warmup": False,
                                  "diagnostics.period": 0.2})
    try:
        node.wait_for_line(r"ready: /points_raw -> /points_completed", 300)
        # A diagnostics message comes from the node's timer: it is spinning (a signal during
        # start-up also exits 0, but without a summary).
        peer.spin_until(lambda: bool(peer.diagnostics), 120, "the node's first diagnostics")
        assert node.interrupt(30, sig) == 0, node.output
        assert "summary: received=0" in node.output
        assert "Traceback" not in node.output
    finally:
        node.kill()
