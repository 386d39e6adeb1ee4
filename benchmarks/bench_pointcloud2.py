"""PointCloud2 conversion speed at the node's edges: message -> xyz and xyz -> message.

Run: ``PYTHONPATH=src python benchmarks/bench_pointcloud2.py [--repeats 50]``.
Uses real sensor_msgs classes when importable (rclpy path), else a plain stand-in.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lidar_completion.pointcloud2 import CloudMessage, Field, build_cloud, cloud_to_xyz, finite_points


def _classes() -> tuple[str, Callable[..., Any], Callable[..., Any], Any]:
    try:
        from sensor_msgs.msg import PointCloud2, PointField
        from std_msgs.msg import Header

        return "sensor_msgs (rclpy)", PointCloud2, PointField, Header(frame_id="velodyne")
    except ImportError:
        return "duck-typed stand-in", CloudMessage, Field, None


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm caches (dtype cache, page faults)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    kind, msg_cls, field_cls, header = _classes()
    rng = np.random.default_rng(0)

    n_in = 125_000
    xyz_in = rng.uniform(-50, 50, (n_in, 3)).astype(np.float32)
    xyz_in[::20] = np.nan  # 5 % no-return points, as some drivers emit
    msg_in = build_cloud(xyz_in, header, msg_cls, field_cls,
                         extra={"intensity": rng.uniform(0, 1, n_in).astype(np.float32)})
    n_out = 180_000
    xyz_out = rng.uniform(-50, 50, (n_out, 3)).astype(np.float32)

    rows = [
        (f"message -> xyz ({n_in // 1000}k pts, x,y,z,intensity)", 2.0,
         _median_ms(lambda: cloud_to_xyz(msg_in), args.repeats)),
        (f"message -> xyz + finite filter ({n_in // 1000}k, 5% NaN)", None,
         _median_ms(lambda: finite_points(cloud_to_xyz(msg_in)), args.repeats)),
        (f"xyz -> message ({n_out // 1000}k pts, x,y,z)", 5.0,
         _median_ms(lambda: build_cloud(xyz_out, header, msg_cls, field_cls), args.repeats)),
        (f"xyz -> message ({n_out // 1000}k pts, + intensity)", None,
         _median_ms(lambda: build_cloud(xyz_out, header, msg_cls, field_cls,
                                        extra={"intensity": xyz_out[:, 0]}), args.repeats)),
    ]
    print(f"PointCloud2 conversion, message classes: {kind}, median of {args.repeats} runs")
    print(f"{'case':<48} {'median ms':>10} {'target ms':>10}  ok")
    for name, target, ms in rows:
        ok = "" if target is None else ("yes" if ms <= target else "NO")
        tgt = "-" if target is None else f"{target:.1f}"
        print(f"{name:<48} {ms:>10.3f} {tgt:>10}  {ok}")


if __name__ == "__main__":
    main()
