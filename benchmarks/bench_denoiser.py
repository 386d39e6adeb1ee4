"""Denoiser forward time and peak memory of the pure-PyTorch sparse backend.

    python benchmarks/bench_denoiser.py [--threads 2] [--points 20000 60000 180000] [--ratios 1 0.25]

Input is the real SemanticKITTI scan from ``shared/data`` as the pipeline feeds it: the
scan sampled to n/10 points, repeated x10, plus unit Gaussian noise. Each row runs in a
fresh subprocess so its peak RSS is its own. Reference (MinkowskiEngine 0.5.4 CPU build,
this kind of machine, full width): 2.6 s at 20k, 11 s at 60k, 62 s at 180k points; the
table prints it beside our time as a ratio (MinkowskiEngine itself is not run here: there is
no MinkowskiEngine backend yet, see the README).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ME_REFERENCE_S = {20000: 2.6, 60000: 11.0, 180000: 62.0}


def make_inputs(n_points: int, seed: int = 0):
    import numpy as np
    import torch

    from lidar_completion.io import read_points

    scan = read_points(REPO.parent / "shared" / "data" / "semantickitti_08_000123.ply")
    rng = np.random.default_rng(seed)
    keep = np.linalg.norm(scan, axis=1)
    scan = scan[(keep > 3.5) & (keep < 50)]
    part = torch.from_numpy(scan[rng.choice(len(scan), n_points // 10, replace=False)]).float()
    gen = torch.Generator().manual_seed(seed)
    noisy = part.repeat(10, 1) + torch.randn(n_points, 3, generator=gen)
    return part, noisy


def run_one(ratio: float, n_points: int, threads: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    part, noisy = make_inputs(n_points)
    from lidar_completion.networks import Denoiser, ScanEncoder
    from lidar_completion.sparse import voxelize

    encoder, denoiser = ScanEncoder(ratio).eval(), Denoiser(ratio).eval()

    def forward():
        scan = encoder(voxelize(part, None, 0.05))
        return denoiser(voxelize(noisy, None, 0.05), scan, torch.tensor([500]))

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": min(times), "peak_rss_mib": peak / 1024, "delta_rss_mib": (peak - rss_before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points", type=int, nargs="+", default=[20000, 60000, 180000])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("RATIO", "POINTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        ratio, points = args.one
        print(json.dumps(run_one(float(ratio), int(points), args.threads, args.repeats)))
        return
    print(f"denoiser forward (encoder included), CPU, {args.threads} threads, best of {args.repeats}")
    header = "| ratio | points | torch s | peak RSS MiB | MinkowskiEngine ref s (cr=1) | torch / ref |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for ratio in args.ratios:
        for points in args.points:
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats), "--one", str(ratio), str(points)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            ref = ME_REFERENCE_S.get(points) if ratio == 1.0 else None
            ratio_text = f"{row['seconds'] / ref:.2f}" if ref else "-"
            print(f"| {ratio:g} | {points} | {row['seconds']:.2f} | {row['peak_rss_mib']:.0f} | {ref or '-'} | {ratio_text} |", flush=True)


if __name__ == "__main__":
    main()
