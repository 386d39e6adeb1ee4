"""The GPU table of ``scripts/gpu_check.sh`` (issue 14, item 4): one CUDA device, every row
measured here and now.

    python benchmarks/gpu_check.py [--device cuda:0] [--repeats 5] [--node-scans 10]

Rows: the full-scale denoiser forward (encoder included, 180k points, channel ratio 1) in
fp32 and under bf16 / fp16 autocast with its peak GPU memory (``bench_denoiser.measure``,
one fresh process each); the 1-step student end to end per frame (``SceneCompleter``, as
``bench_pipeline``) at full scale (channel ratio 1, 18,000 scan points -> 180,000, 50 m;
random weights: no full-scale model is shipped, and weights do not change the time) and at
the shipped preset (the shipped student at its own budget, read from its config); the ROS
node's own overhead per scan with the model on the GPU (``bench_node``). A row that fails
says why in its note; the others still run. Without a CUDA device: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

FULL = {"channel_ratio": 1.0, "n_part": 18000, "max_range": 50.0}


def _short(err: BaseException) -> str:
    """One line: a failed subprocess's last stderr line, else the exception."""
    stderr = getattr(err, "stderr", None)
    if stderr and stderr.strip():
        return " ".join(stderr.strip().splitlines()[-1].split())[:200]
    return f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"


def student_frame(model, device: str, repeats: int, scan) -> dict:
    """Median wall ms per frame of the 1-step student (CUDA synchronised), its stages, peak GPU MiB."""
    import torch

    from bench_pipeline import make_completer

    completer = make_completer(model, "model", device, 1, 0.0, False)
    completer.complete(scan)  # warm-up (allocator, kernels)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    walls, runs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        runs.append(completer.complete(scan))
        torch.cuda.synchronize(device)
        walls.append(1000 * (time.perf_counter() - start))
    stages = {s: statistics.median(r.timings_ms.get(s, 0.0) for r in runs) for s in ("preprocess", "encode", "sample", "postprocess")}
    return {"ms": statistics.median(walls), "mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "note": f"{completer.n_part:,} -> {len(runs[-1].points):,} points, {completer.max_range:g} m; "
                    + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (denoiser: best; student: median)")
    parser.add_argument("--node-scans", type=int, default=10, help="scans through the node (0: no node row)")
    parser.add_argument("--domain", type=int, default=160, help="ROS_DOMAIN_ID of the node row")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (built with CUDA "
              f"{torch.version.cuda or 'none: a CPU build'}); nothing measured", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    print(f"GPU: {name} ({total:.0f} GiB); torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)

    from bench_denoiser import measure
    from bench_pipeline import MODELS, SCAN

    from lidar_completion.checkpoints import load_model
    from lidar_completion.model import CompletionModel, ModelConfig
    from lidar_completion.io import read_points

    rows: list[tuple[str, str, str, str]] = []

    def row(what: str, ms: float | None, mib: float | None, note: str) -> None:
        rows.append((what, "-" if ms is None else f"{ms:.1f}", "-" if mib is None else f"{mib:.0f}", note))
        print(f"  {what}: {rows[-1][1]} ms, {rows[-1][2]} MiB  {note}", flush=True)

    for autocast in ("none", "bf16", "fp16"):
        what = f"denoiser forward, 180k points, ratio 1, {'fp32' if autocast == 'none' else autocast + ' autocast'}"
        try:
            r = measure("torch", 1.0, 180_000, repeats=args.repeats, device=str(device), autocast=autocast, timeout=600)
            row(what, 1000 * r["seconds"], r["peak_rss_mib"], f"best of {args.repeats}, encoder included")
        except Exception as err:  # noqa: BLE001 - the table says what failed and goes on
            row(what, None, None, f"failed: {_short(err)}")

    scan = read_points(SCAN)
    torch.manual_seed(0)
    full = CompletionModel(ModelConfig(kind="student", default_steps=1, default_guidance=1.0, **FULL))
    shipped = MODELS / "student_lite"
    for what, make in (("student 1 step end to end, full scale (ratio 1, random weights)", lambda: full),
                       (f"student 1 step end to end, shipped preset ({shipped.name})", lambda: load_model(shipped))):
        try:
            r = student_frame(make(), str(device), args.repeats, scan)
            row(what, r["ms"], r["mib"], f"median of {args.repeats}; {r['note']}")
        except Exception as err:  # noqa: BLE001
            row(what, None, None, f"failed: {_short(err)}")
    del full
    torch.cuda.empty_cache()

    if args.node_scans:
        what = "ROS node overhead per scan (model on the GPU, shipped student)"
        try:
            from bench_node import bench_node_overhead

            node = bench_node_overhead(args.node_scans, args.domain, "student_lite", str(device))
            med = node["stages_median"]
            row(what, med["overhead_ms"], None,
                f"median of {node['scans']}; p90 {node['overhead_ms_p90']:.1f}; model {med['model_ms']:.1f} ms, "
                f"processing {med['processing_ms']:.1f} ms ({1000 / med['processing_ms']:.1f} Hz)")
        except Exception as err:  # noqa: BLE001
            row(what, None, None, f"failed: {_short(err)}")

    print("\n| what | ms | peak GPU MiB | notes |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
