"""The shipped parameter YAML agrees with the shipped model (issue 28, item 9): started with
``config/completion_node.yaml`` alone (what ``completion.launch.py`` loads), the node runs
the shipped student over the student's own radius and says nothing about capping
``data.max_range`` (the YAML used to say 50 m, and every start warned that it was capped at
the model's 10 m)."""

from __future__ import annotations

import json

import pytest
from ros_helpers import NODE_YAML, SHIPPED_STUDENT, start_node


def test_shipped_yaml_runs_the_shipped_model_over_its_own_radius_without_a_warning(domain_id: int, peer) -> None:
    if not (SHIPPED_STUDENT / "config.json").is_file():
        pytest.skip("the shipped student is not in this checkout")
    radius = json.loads((SHIPPED_STUDENT / "config.json").read_text())["max_range"]
    peer.watch_diagnostics()
    node = start_node(domain_id, {}, params_file=NODE_YAML)
    try:
        node.wait_for_line(r"ready: /points_raw -> /points_completed \(input QoS best_effort/5, output QoS reliable/2;",
                           300)
        peer.spin_until(lambda: peer.diagnostics, 120, "the node's diagnostics")
        assert node.interrupt(60) == 0, node.output
    finally:
        node.kill()
    assert "loaded " in node.output and "student_lite" in node.output
    assert "WARN" not in node.output and "capped" not in node.output, node.output
    diag = peer.diagnostics[-1]
    assert (diag["max_range"], diag["max_range_effective"]) == ("0", f"{radius:g}"), diag
