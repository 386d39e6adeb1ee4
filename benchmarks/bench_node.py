"""The ROS node's costs besides the model: conversions, node overhead, DDS transport.

Run: ``source scripts/setup_env.sh && python benchmarks/bench_node.py [--quick]``.

Prints, on this machine:

1. message -> xyz for a 125k-point x/y/z/intensity cloud (core ``cloud_to_xyz`` +
   ``finite_points``) and xyz -> message for 180k points (core ``build_cloud``);
2. the node per scan, stage by stage, as it measures itself (``~/debug/timings``), and the
   frame rate (1000 / median processing ms; the model alone: 1000 / model ms): by default
   the shipped student (``--checkpoint``) at its own point budget and radius (read from its
   config: ``n_part``, ``max_range``), 2 torch threads (``--threads``), on the real scan in
   ``shared/data`` (else a synthetic 125k-point one); one scan in flight at a time. The
   node's own overhead is callback entry to the return of ``publish`` minus the model's
   time and the wait for the worker (``~/debug/overhead_ms``, target <= 5 ms);
3. DDS transport latency publish -> receive between two processes for a 125k-point cloud
   (2 MB) over Fast DDS, for several transport settings (default, the repository's
   large-data profile ``config/fastdds_large_data.xml``, ``FASTDDS_BUILTIN_TRANSPORTS``),
   with reliable and best-effort QoS, and how many of the clouds arrived.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO.parent / "shared" / "data" / "semantickitti_08_000123.ply"
PROFILE = REPO / "config" / "fastdds_large_data.xml"
N_SCAN, N_COMPLETED = 125_000, 180_000


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), float(np.percentile(times, 90) * 1e3)


def _scan(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, a = rng.uniform(4, 45, n), rng.uniform(-np.pi, np.pi, n)
    return np.column_stack([r * np.cos(a), r * np.sin(a), rng.uniform(-1.8, 2.5, n)]).astype(np.float32)


def bench_conversions(repeats: int) -> dict[str, Any]:
    from sensor_msgs.msg import PointCloud2, PointField
    from std_msgs.msg import Header

    from lidar_completion.pointcloud2 import build_cloud, cloud_to_xyz, finite_points

    header = Header(frame_id="velodyne")
    scan = _scan(N_SCAN)
    msg = build_cloud(scan, header, PointCloud2, PointField, extra={"intensity": scan[:, 0].copy()})
    to_xyz = _median_ms(lambda: finite_points(cloud_to_xyz(msg)), repeats)
    completed = _scan(N_COMPLETED, 1)
    to_msg = _median_ms(lambda: build_cloud(completed, header, PointCloud2, PointField), repeats)
    return {"msg_to_xyz_125k_ms": to_xyz, "xyz_to_msg_180k_ms": to_msg}


def _env(domain: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
    env.pop("FASTDDS_BUILTIN_TRANSPORTS", None)
    env.update(ROS_DOMAIN_ID=str(domain), PYTHONUNBUFFERED="1", RMW_IMPLEMENTATION="rmw_fastrtps_cpp")
    env.update(extra)
    return env


# --------------------------------------------------------------------------- node overhead
def bench_node_overhead(scans: int, domain: int, checkpoint: str = "student_lite", device: str = "cpu",
                        threads: int = 2, scan_path: Path | None = SCAN) -> dict[str, Any]:
    """The node completing ``scans`` scans one after another (the first one not counted):
    per-stage medians of ``~/debug/timings`` and what ran. ``checkpoint`` "tiny": a random
    channel-ratio-0.25 model (the node's cost without a trained model's budget)."""
    import torch
    from diagnostic_msgs.msg import DiagnosticArray
    from lidar_completion.children import ChildProcess
    from lidar_completion_ros.messages import qos_profile, stamp_ns, time_from_ns
    from lidar_completion_ros.runtime import PrivateNode
    from sensor_msgs.msg import PointCloud2, PointField
    from std_msgs.msg import Float64, Header

    from lidar_completion.checkpoints import save_model
    from lidar_completion.model import CompletionModel, ModelConfig
    from lidar_completion.pointcloud2 import build_cloud

    from lidar_completion.checkpoints import find_checkpoint, load_model
    from lidar_completion.config import UNRECORDED_RADIUS

    if checkpoint == "tiny":
        tmp = Path(tempfile.mkdtemp(prefix="bench_node_"))
        torch.manual_seed(0)
        checkpoint = str(save_model(CompletionModel(ModelConfig(channel_ratio=0.25)), tmp / "tiny"))
    model_config = load_model(find_checkpoint(checkpoint) or checkpoint).config
    max_range = float(model_config.max_range or UNRECORDED_RADIUS)
    env = _env(domain, FASTDDS_DEFAULT_PROFILES_FILE=str(PROFILE), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "lidar_completion_ros.node", "--ros-args",
           "--params-file", str(REPO / "config" / "completion_node.yaml"),
           "-p", f"checkpoint:={checkpoint}", "-p", "sampling.steps:=1", "-p", "sampling.guidance:=1.0",
           "-p", "data.preset:=model", "-p", f"data.max_range:={max_range}", "-p", f"device:={device}",
           "-p", "qos.input.reliability:=reliable"]  # the model's own budget (n_part) and radius
    node = ChildProcess(cmd, env, "completion_node")  # its output drained (a full pipe would stall it)
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    monitor = PrivateNode("bench_peer", domain)
    peer = monitor.node
    overheads: list[float] = []
    timings: list[dict[str, float]] = []
    outputs: list[int] = []
    peer.create_subscription(Float64, "/completion_node/debug/overhead_ms", lambda m: overheads.append(m.data), 50)
    peer.create_subscription(DiagnosticArray, "/completion_node/debug/timings",
                             lambda m: timings.append({kv.key: kv.value for kv in m.status[0].values}), 50)
    peer.create_subscription(PointCloud2, "/points_completed", lambda m: outputs.append(stamp_ns(m.header)),
                             qos_profile("reliable", 10))
    pub = peer.create_publisher(PointCloud2, "/points_raw", qos_profile("reliable", 10))

    def spin(predicate, timeout: float) -> bool:  # gives up when the node's process has ended
        return monitor.spin_until(lambda: predicate() or node.returncode is not None, timeout) and bool(predicate())

    try:
        if not spin(lambda: pub.get_subscription_count() > 0, 240):
            raise RuntimeError("node did not come up:\n" + node.tail(40))
        spin(lambda: False, 1.0)
        if scan_path is not None and scan_path.exists():
            from lidar_completion.io import read_points

            scan = np.ascontiguousarray(read_points(scan_path)[:, :3], dtype=np.float32)
        else:
            scan = _scan(N_SCAN)
        extra = {"intensity": np.linalg.norm(scan, axis=1).astype(np.float32)}
        for i in range(scans):
            msg = build_cloud(scan, Header(frame_id="velodyne", stamp=time_from_ns((i + 1) * 10**8)),
                              PointCloud2, PointField, extra=extra)
            pub.publish(msg)
            if not spin(lambda i=i: len(timings) > i and len(outputs) > i, 120):
                raise RuntimeError(f"no answer for scan {i}")
    finally:
        node.interrupt(60)
        monitor.close()
    values = {key: [float(t[key]) for t in timings[1:]] for key in timings[0]}  # first scan: cold caches
    return {
        "scans": len(timings) - 1,
        "checkpoint": checkpoint,
        "n_part": model_config.n_part,
        "max_range": max_range,
        "channel_ratio": model_config.channel_ratio,
        "threads": threads,
        "input_points": len(scan),
        "stages_median": {k: float(np.median(v)) for k, v in values.items()},
        "overhead_ms_p90": float(np.percentile(values["overhead_ms"], 90)),
        "overhead_topic_median": float(np.median(overheads[1:])),
    }


def print_node(node: dict[str, Any]) -> None:
    """The node rows: what ran, every stage's median, the frame rate."""
    med = node["stages_median"]
    points = med.get("output_points", float("nan"))
    print(f"\n== node, {node['input_points']:,}-point scans, checkpoint {node['checkpoint']} (channel ratio "
          f"{node['channel_ratio']:g}, model budget {node['n_part']} scan points, radius {node['max_range']:g} m), "
          f"{node['threads']} torch threads, {node['scans']} scans one at a time (median ms)")
    stages = [k for k in med if k.endswith("_ms") and k not in ("pipeline_latency_ms", "cyclic_ms")]
    print("  " + " | ".join(f"{k[:-3]} {med[k]:.1f}" for k in stages))
    print(f"  frame rate: {1000 / med['processing_ms']:.2f} Hz end to end in the node "
          f"(model alone {1000 / med['model_ms']:.2f} Hz; target >= 10 Hz), {points:.0f} output points")
    print(f"  overhead (callback entry -> publish return, minus model and wait for the worker): "
          f"{med['overhead_ms']:.2f} (p90 {node['overhead_ms_p90']:.2f}; ~/debug/overhead_ms median "
          f"{node['overhead_topic_median']:.2f}; target <= 5)")


# --------------------------------------------------------------------------- transport
def _transport_role(role: str, count: int, reliability: str, listen_s: float) -> None:
    """Child process: ``pub`` sends ``count`` 125k-point clouds stamped with the send time;
    ``sub`` prints the latencies it saw as JSON."""
    import rclpy
    from lidar_completion_ros.messages import qos_profile, stamp_ns, time_from_ns
    from rclpy.node import Node
    from sensor_msgs.msg import PointCloud2, PointField
    from std_msgs.msg import Header

    from lidar_completion.pointcloud2 import build_cloud

    rclpy.init()
    node = Node(f"transport_{role}")
    qos = qos_profile(reliability, 5)
    if role == "pub":
        pub = node.create_publisher(PointCloud2, "transport_probe", qos)
        deadline = time.monotonic() + 30
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
        time.sleep(1.0)
        scan = _scan(N_SCAN)
        extra = {"intensity": np.linalg.norm(scan, axis=1).astype(np.float32)}
        msg = build_cloud(scan, Header(frame_id="velodyne"), PointCloud2, PointField, extra=extra)
        for _ in range(count):
            msg.header.stamp = time_from_ns(time.time_ns())
            pub.publish(msg)
            time.sleep(0.25)
        if reliability == "reliable":
            from rclpy.duration import Duration

            pub.wait_for_all_acked(Duration(seconds=10))
        time.sleep(0.5)
    else:
        latencies: list[float] = []
        sizes: list[int] = []

        def on_msg(m: PointCloud2) -> None:
            latencies.append((time.time_ns() - stamp_ns(m.header)) / 1e6)
            sizes.append(len(m.data))

        node.create_subscription(PointCloud2, "transport_probe", on_msg, qos)
        start = last = time.monotonic()
        while len(latencies) < count:  # stop 5 s after the last cloud, or listen_s without any
            seen = len(latencies)
            rclpy.spin_once(node, timeout_sec=0.05)
            now = time.monotonic()
            if len(latencies) > seen:
                last = now
            if (latencies and now - last > 5.0) or now - start > listen_s:
                break
        print(json.dumps({"latencies": latencies, "bytes": sizes[0] if sizes else 0}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


def bench_transport(count: int, domain: int) -> list[dict[str, Any]]:
    variants = [
        ("Fast DDS defaults (ROS_LOCALHOST_ONLY unset)", {"ROS_LOCALHOST_ONLY": "0"}),
        ("Fast DDS defaults + ROS_LOCALHOST_ONLY=1", {"ROS_LOCALHOST_ONLY": "1"}),
        ("FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA",
         {"ROS_LOCALHOST_ONLY": "0", "FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"}),
        ("config/fastdds_large_data.xml (32 MB SHM)", {"FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE)}),
    ]
    results = []
    for reliability in ("reliable", "best_effort"):
        for name, extra in variants:
            domain += 1
            env = _env(domain, **extra)
            me = [sys.executable, __file__, "--_role"]
            sub = subprocess.Popen(me + ["sub", str(count), reliability], env=env, stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            pub = subprocess.run(me + ["pub", str(count), reliability], env=env, capture_output=True, text=True,
                                 timeout=120)
            out, _ = sub.communicate(timeout=60)
            data = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"latencies": [], "bytes": 0}
            lat = data["latencies"]
            results.append({
                "transport": name, "qos": reliability, "received": f"{len(lat)}/{count}",
                "MB": data["bytes"] / 1e6,
                "median_ms": float(np.median(lat)) if lat else float("nan"),
                "p90_ms": float(np.percentile(lat, 90)) if lat else float("nan"),
                "min_ms": float(np.min(lat)) if lat else float("nan"),
                "pub_rc": pub.returncode,
            })
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--domain", type=int, default=150, help="first ROS_DOMAIN_ID to use (uses ~10)")
    parser.add_argument("--scans", type=int, help="scans for the node-overhead run (default 20, quick 4)")
    parser.add_argument("--checkpoint", default="student_lite",
                        help="model the node runs: a shipped name, a path, or 'tiny' (random, ratio 0.25)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the node (OMP_NUM_THREADS)")
    parser.add_argument("--device", default="cpu", help="the node's device parameter")
    parser.add_argument("--skip-node", action="store_true")
    parser.add_argument("--skip-transport", action="store_true")
    parser.add_argument("--_role", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._role:
        role, count, reliability = args._role
        _transport_role(role, int(count), reliability, listen_s=25)
        return

    repeats, scans, count = (5, 4, 5) if args.quick else (50, 20, 20)
    scans = args.scans or scans
    print(f"machine: {os.cpu_count()} cores; RMW {os.environ.get('RMW_IMPLEMENTATION', 'default')}")
    conv = bench_conversions(repeats)
    print("\n== conversions (core pointcloud2, rclpy messages; median / p90 ms)")
    print(f"message -> xyz, {N_SCAN:,} points (x,y,z,intensity): "
          f"{conv['msg_to_xyz_125k_ms'][0]:.2f} / {conv['msg_to_xyz_125k_ms'][1]:.2f} ms")
    print(f"xyz -> message, {N_COMPLETED:,} points:                 "
          f"{conv['xyz_to_msg_180k_ms'][0]:.2f} / {conv['xyz_to_msg_180k_ms'][1]:.2f} ms")

    if not args.skip_node:
        print_node(bench_node_overhead(scans, args.domain, args.checkpoint, args.device, args.threads))

    if not args.skip_transport:
        print(f"\n== transport publish -> receive (rclpy callback), {N_SCAN:,} points x,y,z,intensity, "
              f"two processes, {count} clouds at 4 Hz")
        print(f"{'transport':48s} {'QoS':12s} {'received':>9s} {'MB':>5s} {'median':>7s} {'p90':>7s} {'min':>7s}")
        for r in bench_transport(count, args.domain + 10):
            print(f"{r['transport']:48s} {r['qos']:12s} {r['received']:>9s} {r['MB']:5.2f} {r['median_ms']:7.1f} "
                  f"{r['p90_ms']:7.1f} {r['min_ms']:7.1f}")


if __name__ == "__main__":
    main()
