"""Start-up times, each in a fresh process: importing the pipeline, ``lidar-complete`` to its
first output line and to exit, and the ROS node to "ready".

    python benchmarks/bench_startup.py                       # median of 3 per row
    python benchmarks/bench_startup.py --baseline-src /tmp/before/src   # before/after, interleaved

``--baseline-src DIR`` puts another copy of the core library first on ``PYTHONPATH`` (e.g.
``git archive <commit> src/lidar_completion | tar -x -C /tmp/before``) and runs it in turn
with this tree's, so both see the same machine load. Targets (issue 14): <= 3 s for the CLI's
import, <= 10 s for the node to ready. Times are wall seconds on this machine; a loaded
machine makes them noisy, which is why rows are medians and baselines interleave.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lidar_completion.children import ChildProcess

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO.parent / "shared" / "data" / "semantickitti_08_000123.ply"
HEAVY = ("diffusers", "scipy", "matplotlib", "open3d", "lightning", "fpsample", "safetensors")


def timed(cmd: list[str], env: dict[str, str], until: str | None, timeout: float) -> tuple[float, float]:
    """(seconds to the first output line matching ``until`` (None: to exit), seconds to exit)."""
    start = time.perf_counter()
    proc = ChildProcess(cmd, env, group=True)
    try:
        first = None
        if until is not None and proc.wait_for(until, timeout) is not None:
            first = time.perf_counter() - start
        if first is not None and until == "ready: ":  # a node runs until told to stop
            proc.interrupt(60)
        else:
            try:
                proc.wait(max(timeout - (time.perf_counter() - start), 1.0))
            except subprocess.TimeoutExpired:
                pass  # killed below
    finally:
        proc.kill()
    total = time.perf_counter() - start
    if until is not None and first is None:
        raise RuntimeError(f"{' '.join(cmd)}: no line matching {until!r}; output:\n{proc.tail(20)}")
    if until is None and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}; output:\n{proc.tail(20)}")
    return (total if first is None else first), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per row (median)")
    parser.add_argument("--baseline-src", type=Path, help="another lidar_completion source tree to compare with")
    parser.add_argument("--checkpoint", default="student_lite", help="model for the CLI and node rows")
    parser.add_argument("--scan", type=Path, default=SCAN)
    parser.add_argument("--skip-node", action="store_true")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    py = sys.executable
    check = ("import sys, lidar_completion.completer; "
             f"print('heavy modules imported:', sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}) or 'none')")
    rows = [
        ("import lidar_completion.completer", [py, "-c", check], None),
        ("lidar-complete: first output line", [py, "-m", "lidar_completion.cli", str(args.scan), "--out",
                                               str(out / "c.ply"), "--checkpoint", args.checkpoint], r" -> "),
    ]
    if not args.skip_node:
        rows.append(("node: start -> 'ready'", [py, "-m", "lidar_completion_ros.node", "--ros-args",
                                                "-p", f"checkpoint:={args.checkpoint}"], "ready: "))
    variants = {"this tree": dict(os.environ, ROS_DOMAIN_ID=str(170 + os.getpid() % 50))}
    if args.baseline_src:
        path = os.pathsep.join(p for p in (str(args.baseline_src.resolve()), os.environ.get("PYTHONPATH")) if p)
        variants["baseline"] = dict(variants["this tree"], PYTHONPATH=path)

    print(f"{os.cpu_count()} cores; {args.runs} runs per row, variants in turn; checkpoint {args.checkpoint}")
    header = f"{'row':38s} {'variant':10s} {'to output s':>12s} {'to exit s':>10s}   (median; min-max)"
    print(header + "\n" + "-" * len(header))
    for label, cmd, until in rows:
        results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for _ in range(args.runs):
            for variant, env in variants.items():
                results[variant].append(timed(cmd, env, until, timeout=300))
        for variant, times in results.items():
            firsts, totals = [t[0] for t in times], [t[1] for t in times]
            print(f"{label:38s} {variant:10s} {statistics.median(firsts):12.2f} {statistics.median(totals):10.2f}"
                  f"   ({min(firsts):.2f}-{max(firsts):.2f})", flush=True)
    env = variants["this tree"]
    print(subprocess.run([py, "-c", check], env=env, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
