"""Malformed and odd-layout PointCloud2 messages, published into a running node over DDS.

Hypothesis builds messages field by field (any datatype, order, padding, byte order,
organised or not, NaN/inf points) and breaks some on purpose (missing x/y/z, unsupported
datatype codes, data length off, point_step / row_step too small, count > 1, duplicate
names, empty, too few points). For each one the node must stay up and count exactly the
expected outcome in /diagnostics; afterwards it still completes a valid scan.
"""

from __future__ import annotations

import array
import re
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ros_helpers import TINY_OVERRIDES, Peer, make_cloud_msg, parse_summary, shell_points, start_node

from lidar_completion.pointcloud2 import DATATYPES, FLOAT32, FLOAT64, INT16, INT32

MIN_POINTS, MAX_POINTS = 50, 1000
XYZ_TYPES = (FLOAT32, FLOAT64, INT16, INT32)
BROKEN = ("missing_field", "bad_datatype", "data_length", "point_step", "row_step", "count", "duplicate")


@dataclass(repr=False)
class Case:
    msg: object
    expected: str  # "completed" or "rejected.<reason>"
    nonfinite: int  # NaN/inf points the node must drop
    subsampled: bool
    kind: str

    def __repr__(self) -> str:  # the layout, not the bytes
        m = self.msg
        fields = [(f.name, f.offset, f.datatype, f.count) for f in m.fields]
        return (f"Case({self.kind} -> {self.expected}, fields={fields}, point_step={m.point_step}, "
                f"height={m.height}, width={m.width}, row_step={m.row_step}, bigendian={m.is_bigendian}, "
                f"data={len(m.data)} bytes, nonfinite={self.nonfinite}, subsampled={self.subsampled})")


def _layout(draw, rng: np.random.Generator):
    """Random field list [(name, offset, datatype, count)] holding x, y, z, and the point size."""
    fields = [(axis, draw(st.sampled_from(XYZ_TYPES)), 1) for axis in "xyz"]
    for name in draw(st.lists(st.sampled_from(["intensity", "ring", "t", "rgb", "label"]), max_size=3, unique=True)):
        fields.append((name, draw(st.sampled_from(sorted(DATATYPES))), draw(st.integers(1, 2))))
    order = draw(st.permutations(range(len(fields))))
    placed, offset = [], 0
    for index in order:
        name, datatype, count = fields[index]
        offset += draw(st.integers(0, 3))  # unaligned offsets are legal
        placed.append((name, offset, datatype, count))
        offset += DATATYPES[datatype].itemsize * count
    return placed, offset + draw(st.integers(0, 8))


def _pack(fields, point_step: int, height: int, width: int, row_pad: int, bigendian: bool,
          xyz: np.ndarray, rng: np.random.Generator) -> bytes:
    order = ">" if bigendian else "<"
    dtype = np.dtype({
        "names": [f[0] for f in fields],
        "formats": [(DATATYPES[f[2]].newbyteorder(order), (f[3],)) if f[3] > 1 else DATATYPES[f[2]].newbyteorder(order)
                    for f in fields],
        "offsets": [f[1] for f in fields],
        "itemsize": point_step,
    })
    points = np.zeros(height * width, dtype)
    for name, _, datatype, _count in fields:
        if name in "xyz" and len(name) == 1:
            points[name] = xyz[:, "xyz".index(name)]
        elif np.dtype(DATATYPES[datatype]).kind == "f":
            points[name] = rng.random(points[name].shape)
        else:
            points[name] = rng.integers(0, 100, points[name].shape)
    rows = points.tobytes()
    if row_pad == 0:
        return rows
    step = width * point_step
    return b"".join(rows[r * step:(r + 1) * step] + b"\xee" * row_pad for r in range(height))


def _message(fields, point_step, height, width, row_step, bigendian, data: bytes):
    from sensor_msgs.msg import PointCloud2, PointField
    from std_msgs.msg import Header

    msg = PointCloud2(header=Header(frame_id="fuzz"), height=height, width=width,
                      fields=[PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields],
                      is_bigendian=bigendian, point_step=point_step, row_step=row_step, is_dense=False)
    msg.data = array.array("B", data)
    return msg


@st.composite
def cases(draw, kind: str) -> Case:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fields, point_step = _layout(draw, rng)
    height = draw(st.integers(1, 3))
    n_target = draw(st.integers(1, MIN_POINTS - 1)) if kind == "too_small" else draw(st.integers(MIN_POINTS, 2400))
    width = 0 if kind == "empty" else max(1, n_target // height)
    n = height * width
    row_pad = draw(st.integers(0, 16)) if height > 1 else 0
    bigendian = draw(st.booleans())
    xyz = shell_points(n, rng)
    all_float = all(d in (FLOAT32, FLOAT64) for name, _, d, _ in fields if name in ("x", "y", "z"))
    nonfinite = 0
    if all_float and n and kind in ("valid", "too_small") and draw(st.booleans()):
        bad = rng.random(n) < draw(st.floats(0.0, 0.4))
        xyz[bad, rng.integers(0, 3, int(bad.sum()))] = rng.choice([np.nan, np.inf, -np.inf], int(bad.sum()))
        nonfinite = int(bad.sum())
    if not all_float:
        xyz = np.round(xyz)
    row_step = width * point_step + row_pad
    data = _pack(fields, point_step, height, width, row_pad, bigendian, xyz, rng)

    finite = n - nonfinite
    expected = "completed"
    if kind == "empty":
        expected = "rejected.empty"
    elif kind in BROKEN:
        expected = "rejected.layout"
        fields = list(fields)
        if kind == "missing_field":
            axis = draw(st.sampled_from("xyz"))
            index = next(i for i, f in enumerate(fields) if f[0] == axis)
            fields[index] = (draw(st.sampled_from(["", "X", "xx", "range"])),) + fields[index][1:]
        elif kind == "bad_datatype":
            index = draw(st.integers(0, len(fields) - 1))
            fields[index] = fields[index][:2] + (draw(st.sampled_from([0, 9, 17, 255])),) + fields[index][3:]
        elif kind == "data_length":
            delta = draw(st.integers(1, 2 * point_step))
            data = data[:-delta] if draw(st.booleans()) else data + bytes(delta)
        elif kind == "point_step":
            point_step = max(f[1] + DATATYPES[f[2]].itemsize * f[3] for f in fields) - 1
            row_step = width * point_step
            data = bytes(height * row_step)
        elif kind == "row_step":
            row_step = width * point_step - 1
            data = bytes(height * row_step)
        elif kind == "count":
            index = next(i for i, f in enumerate(fields) if f[0] == "x")
            fields[index] = fields[index][:3] + (2,)
        elif kind == "duplicate":
            fields.append(("x", 0, FLOAT32, 1))
    elif finite < MIN_POINTS:
        expected = "rejected.too_small"
    msg = _message(fields, point_step, height, width, row_step, bigendian, data)
    # NaN/inf points count as repairs only on a cloud that is completed; a rejected cloud is dropped whole.
    return Case(msg, expected, nonfinite if expected == "completed" else 0,
                expected == "completed" and finite > MAX_POINTS, kind)


class _Target(tuple):
    """(node, peer, publisher, completed messages) with a short repr for Hypothesis reports."""

    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self) -> str:
        return "<fuzz target: completion_node process + test peer>"


@pytest.fixture(scope="module")
def fuzz_target(module_domain_id: int, tiny_checkpoint):
    """A node on the tiny model (this is about robustness, not quality) and a peer."""
    from diagnostic_msgs.msg import DiagnosticArray  # noqa: F401  (message types load once)
    from sensor_msgs.msg import PointCloud2

    params = {"checkpoint": str(tiny_checkpoint), **TINY_OVERRIDES, "qos.input.reliability": "reliable", "qos.input.depth": 100,
              "min_input_points": MIN_POINTS, "max_input_points": MAX_POINTS, "diagnostics.period": 0.1,
              "log_throttle_s": 600.0}
    node = start_node(module_domain_id, params)
    peer = Peer(module_domain_id, "fuzz_peer")
    try:
        node.wait_for_line(r"ready: ", 300)
        peer.watch_diagnostics()
        completed = peer.subscribe(PointCloud2, "/points_completed")
        pub = peer.publisher(PointCloud2, "/points_raw", depth=100)
        peer.spin_until(lambda: pub.get_subscription_count() >= 1 and peer.diagnostics
                        and peer.diagnostics[-1]["output_subscribers"] == "1", 120, "node and peer to match")
        yield _Target(node, peer, pub, completed)
    finally:
        peer.close()
        node.kill()


def _settled(peer: Peer, received: int):
    def check() -> bool:
        c = peer.counters()
        return c.get("received") == received and \
            c["completed"] + c["out_of_domain"] + c["rejected"] + c["dropped"] + c["skipped"] == received
    return check


KINDS = ("valid", "empty", "too_small", *BROKEN)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=4, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_and_odd_clouds_are_counted_and_survived(fuzz_target, kind: str, data) -> None:
    case = data.draw(cases(kind), label="case")
    node, peer, pub, _ = fuzz_target
    event(f"{case.kind} -> {case.expected}")
    peer.spin_until(lambda: bool(peer.counters()), 120, "diagnostics")
    before = peer.counters()
    pub.publish(case.msg)
    peer.spin_until(_settled(peer, before["received"] + 1), 300, f"the node to handle a {case.kind} cloud")
    after = peer.counters()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert node.popen.poll() is None, node.output
    assert delta["dropped"] == 0 and delta["skipped"] == 0
    if case.expected == "completed":
        assert delta["completed"] == 1 and delta["rejected"] == 0, (case.kind, delta)
    else:
        assert delta["rejected"] == 1 and delta[case.expected] == 1 and delta["completed"] == 0, \
            (case.kind, case.expected, delta)
    assert delta["nonfinite_points"] == case.nonfinite
    assert delta["repaired.nonfinite"] == (1 if case.nonfinite else 0)
    assert delta["repaired.subsampled"] == (1 if case.subsampled else 0)


def test_node_still_completes_and_logged_each_problem_once(fuzz_target) -> None:
    node, peer, pub, completed = fuzz_target
    stamp = 4_242_000_000_123
    completed.clear()
    pub.publish(make_cloud_msg(shell_points(3000, np.random.default_rng(1)), stamp, "velodyne"))
    peer.spin_until(lambda: any(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == stamp for m in completed),
                    300, "a valid scan to be completed")
    assert completed[-1].header.frame_id == "velodyne"
    assert node.interrupt(60) == 0
    summary = parse_summary(node.output)
    assert summary["received"] == summary["completed"] + summary["out_of_domain"] + summary["rejected"]
    # One throttled line per kind of rejection (log_throttle_s is longer than this test).
    for reason in ("empty", "layout", "too_small"):
        lines = [line for line in node.lines if re.search(rf"rejected scan .*: (?:{_REASON_TEXT[reason]})", line)]
        assert len(lines) == (1 if summary[f"rejected.{reason}"] else 0), (reason, lines)
    assert "Traceback" not in node.output


_REASON_TEXT = {"empty": "cloud has no points", "layout": "cloud layout cannot be read",
                "too_small": "too few finite points"}
