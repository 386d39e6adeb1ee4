"""The GPU table of ``scripts/gpu_check.sh`` (issue 14, item 4): one CUDA device, every row
measured here and now.

    python benchmarks/gpu_check.py [--device cuda:0] [--repeats 5] [--node-scans 10] [--train-seconds 60]

Rows: the full-scale denoiser forward (encoder included, 180k points, channel ratio 1) in
fp32, under bf16 / fp16 autocast and on the ``torch-bf16`` backend (bfloat16 GEMMs, float32
elsewhere) with its peak GPU memory (``bench_denoiser.measure``, one fresh process each); the
1-step student end to end per frame (``SceneCompleter``, as ``bench_pipeline``; backends
``torch`` and ``torch-bf16``) at full scale (channel ratio 1, 18,000 scan points -> 180,000, 50 m;
random weights: no full-scale model is shipped, and weights do not change the time) and at
the shipped preset (the shipped student at its own budget, read from its config); the ROS
node's own overhead per scan with the model on the GPU (``bench_node``); then two training
bursts at full scale (issue 27), each ``--train-seconds`` long in a fresh process: the teacher
(``config/training/teacher_semantickitti.yaml``: channel ratio 1, batch 2, 18,000 -> 180,000
points, 50 m, fp32, its 4 loader workers) and the Distillation-DPO student
(``distill_dpo_semantickitti.yaml``, batch 1, from a random full-width teacher), on one GPU, on
generated HDL-64 scans (``lidar-synth --preset hdl64``, 16 scans and their map: data loading
does the same work per item as on SemanticKITTI). Each reports ms per step and steps/s with
data loading (after 3 warm-up steps) and compute only, peak GPU memory (allocated; reserved in
the note), and the configured run's length at that rate. A row that fails says why in its
note; the others still run. Without a CUDA device: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

FULL = {"channel_ratio": 1.0}  # with the published cut (config.PUBLISHED_CUT: 18,000 points, 50 m)
REPO = Path(__file__).resolve().parents[1]
BURSTS = {"teacher": "teacher_semantickitti", "distill_dpo": "distill_dpo_semantickitti"}
WARMUP_STEPS = 3


def _short(err: BaseException) -> str:
    """One line: a failed subprocess's last stderr line, else the exception."""
    stderr = getattr(err, "stderr", None)
    if stderr and stderr.strip():
        return " ".join(stderr.strip().splitlines()[-1].split())[:200]
    return f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"


def make_burst_data(root: Path, scans: int = 16) -> Path:
    """One generated HDL-64 sequence of the urban world and its ground-truth map."""
    from lidar_completion_training import maps, synthetic

    if synthetic.main(["--out", str(root), "--sequences", "1", "--scans", str(scans), "--seed", "3", "--preset", "hdl64"]):
        raise RuntimeError("lidar-synth failed")
    if maps.main(["--root", str(root)]):
        raise RuntimeError("lidar-build-maps failed")
    return root


def burst_config(kind: str, root: Path, out: Path, teacher: Path | None = None, overrides: dict | None = None):
    """The shipped full-scale config of ``kind`` on ``root`` (sequence 00), one device, no
    diagnostics, stopped by time rather than by steps; ``overrides`` last (the CPU test)."""
    from lidar_completion_training.run_config import load_run_config

    values = {"data.root": str(root), "data.train_sequences": ["00"], "data.val_sequences": [],
              "trainer.out_dir": str(out), "trainer.devices": 1, "trainer.strategy": "auto",
              "trainer.max_steps": 10**6, "trainer.checkpoint_every": 10**6, "trainer.diagnose_every": 0,
              "trainer.log_every": 10}
    if teacher is not None:
        values["distill.teacher"] = str(teacher)
    return load_run_config(REPO / "config" / "training" / f"{BURSTS[kind]}.yaml", values | (overrides or {}))


def training_burst(config, seconds: float, warmup: int = WARMUP_STEPS) -> dict:
    """Train ``config`` for ``seconds`` and at least ``warmup`` + 1 steps (then stop after the
    current step) and time it: steps/s
    with data loading (wall time between the ends of the steps after ``warmup``) and compute
    only (batch start to batch end, after ``warmup``), and the peak GPU memory. No checkpoint
    is written."""
    import lightning as L
    import torch

    from lidar_completion_training import engine

    cuda = torch.cuda.is_available() and config.trainer.accelerator in ("gpu", "cuda", "auto")

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Burst(L.Callback):
        def __init__(self) -> None:
            self.start = self.began = None
            self.ends: list[float] = []
            self.compute: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            self.began = sync()
            self.start = self.start or self.began

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            now = sync()
            self.ends.append(now)
            self.compute.append(now - self.began)
            if now - self.start >= seconds and len(self.ends) > warmup:
                trainer.should_stop = True

    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    module = engine.build_module(config)
    trainer = engine.build_trainer(config, progress=False)
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, engine.AtomicCheckpoint)]
    burst = Burst()
    trainer.callbacks.append(burst)
    trainer.fit(module)
    steps = len(burst.ends) - warmup
    if steps < 1:  # the run ended by itself (max_steps) before the timed steps
        raise RuntimeError(f"only {len(burst.ends)} steps (warm-up {warmup})")
    wall = burst.ends[-1] - burst.ends[warmup - 1] if warmup else burst.ends[-1] - burst.start
    return {"steps": steps, "steps_per_s": steps / wall, "compute_steps_per_s": steps / sum(burst.compute[warmup:]),
            "seconds": burst.ends[-1] - burst.start,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None}


def random_teacher(root: Path, directory: Path, overrides: dict | None = None) -> Path:
    """A randomly initialised export shaped as the teacher config exports it (widths, sampler,
    point budget): what the distillation burst distils from (weights do not change its time)."""
    import torch

    from lidar_completion.checkpoints import save_model
    from lidar_completion.model import CompletionModel, ModelConfig

    config = burst_config("teacher", root, directory / "unused", overrides=overrides)
    m = config.model
    torch.manual_seed(0)
    return save_model(CompletionModel(ModelConfig(
        channel_ratio=m.channel_ratio, voxel_size=m.voxel_size, kind="teacher", sampler=m.sampler, t0=m.t0,
        prediction=m.prediction, default_guidance=m.guidance, cut=config.data.cut)), directory / "teacher")


def _burst_child(kind: str, root: Path, seconds: float) -> int:
    """``--burst KIND``: one burst in this (fresh) process; its last stdout line is JSON."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_check_burst_") as tmp:
        teacher = random_teacher(root, Path(tmp)) if kind != "teacher" else None
        result = training_burst(burst_config(kind, root, Path(tmp) / "run", teacher), seconds)
    print(json.dumps(result), flush=True)
    return 0


def burst_row(kind: str, root: Path, seconds: float, device: str) -> dict:
    """Run ``--burst kind`` in a fresh process on ``device`` (its own peak memory, and an out
    of memory there fails this row only)."""
    import json
    import os
    import subprocess

    env = dict(os.environ)
    if ":" in device:
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    try:
        done = subprocess.run([sys.executable, __file__, "--burst", kind, "--burst-root", str(root),
                               "--train-seconds", str(seconds)], capture_output=True, text=True,
                              timeout=seconds + 300, env=env, check=True)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no result within {seconds + 300:g} s") from None
    return json.loads(done.stdout.strip().splitlines()[-1])


def student_frame(model, device: str, repeats: int, scan, backend: str = "torch") -> dict:
    """Median wall ms per frame of the 1-step student (CUDA synchronised), its stages, peak GPU MiB."""
    import torch

    from bench_pipeline import make_completer

    completer = make_completer(model, "model", device, 1, 0.0, False, backend)
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
    parser.add_argument("--train-seconds", type=float, default=60,
                        help="length of each full-scale training burst (teacher, DPO student); 0: none")
    parser.add_argument("--burst", choices=sorted(BURSTS), help=argparse.SUPPRESS)  # one burst, in a child
    parser.add_argument("--burst-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (built with CUDA "
              f"{torch.version.cuda or 'none: a CPU build'}); nothing measured", file=sys.stderr)
        return 2
    if args.burst:
        return _burst_child(args.burst, args.burst_root, args.train_seconds)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    print(f"GPU: {name} ({total:.0f} GiB); torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)

    from bench_denoiser import measure
    from bench_pipeline import MODELS, SCAN

    from lidar_completion.checkpoints import load_model
    from lidar_completion.config import PUBLISHED_CUT
    from lidar_completion.model import CompletionModel, ModelConfig
    from lidar_completion.io import read_points

    rows: list[tuple[str, str, str, str]] = []

    def row(what: str, ms: float | None, mib: float | None, note: str) -> None:
        rows.append((what, "-" if ms is None else f"{ms:.1f}", "-" if mib is None else f"{mib:.0f}", note))
        print(f"  {what}: {rows[-1][1]} ms, {rows[-1][2]} MiB  {note}", flush=True)

    for backend, autocast in (("torch", "none"), ("torch", "bf16"), ("torch", "fp16"), ("torch-bf16", "none")):
        what = f"denoiser forward, 180k points, ratio 1, {'fp32' if autocast == 'none' else autocast + ' autocast'}"
        what += ", backend torch-bf16 (bfloat16 GEMMs)" if backend != "torch" else ""
        try:
            r = measure(backend, 1.0, 180_000, repeats=args.repeats, device=str(device), autocast=autocast, timeout=600)
            row(what, 1000 * r["seconds"], r["peak_rss_mib"], f"best of {args.repeats}, encoder included")
        except Exception as err:  # noqa: BLE001 - the table says what failed and goes on
            row(what, None, None, f"failed: {_short(err)}")

    scan = read_points(SCAN)
    torch.manual_seed(0)
    full = CompletionModel(ModelConfig(kind="student", default_steps=1, default_guidance=1.0, cut=PUBLISHED_CUT, **FULL))
    shipped = MODELS / "student_lite"
    for what, make, backend in (
            ("student 1 step end to end, full scale (ratio 1, random weights)", lambda: full, "torch"),
            ("student 1 step end to end, full scale (ratio 1, random weights), torch-bf16", lambda: full, "torch-bf16"),
            (f"student 1 step end to end, shipped preset ({shipped.name})", lambda: load_model(shipped), "torch"),
            (f"student 1 step end to end, shipped preset ({shipped.name}), torch-bf16", lambda: load_model(shipped), "torch-bf16")):
        try:
            r = student_frame(make(), str(device), args.repeats, scan, backend)
            row(what, r["ms"], r["mib"], f"median of {args.repeats}; {r['note']}")
        except Exception as err:  # noqa: BLE001
            row(what, None, None, f"failed: {_short(err)}")
    full = None  # free the full-scale model's GPU memory before what follows
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

    if args.train_seconds > 0:
        import tempfile

        import yaml

        with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as tmp:
            try:
                root = make_burst_data(Path(tmp))
            except Exception as err:  # noqa: BLE001
                root, why = None, _short(err)
            for kind, what in (("teacher", "training burst, teacher, full scale (ratio 1, batch 2, 18k -> 180k, fp32)"),
                               ("distill_dpo", "training burst, Distillation-DPO student, full scale (batch 1, 2 steps)")):
                if root is None:
                    row(what, None, None, f"failed: no data: {why}")
                    continue
                try:
                    r = burst_row(kind, root, args.train_seconds, str(device))
                    file = REPO / "config" / "training" / f"{BURSTS[kind]}.yaml"
                    trainer = yaml.safe_load(file.read_text())["trainer"]
                    hours = trainer["max_steps"] / r["steps_per_s"] / 3600
                    row(what, 1000 / r["steps_per_s"], r["peak_mib"],
                        f"{r['steps']} steps after {WARMUP_STEPS} warm-up in {r['seconds']:.0f} s: {r['steps_per_s']:.2f} steps/s "
                        f"with data loading, {r['compute_steps_per_s']:.2f} compute only; reserved {r['reserved_mib']:.0f} MiB; "
                        f"{file.name}'s {trainer['max_steps']:,} steps: {hours:.1f} h at this rate per process "
                        f"({trainer['devices']} GPUs with DDP: about that wall time if it scales)")
                except Exception as err:  # noqa: BLE001
                    row(what, None, None, f"failed: {_short(err)}")

    print("\n| what | ms | peak GPU MiB | notes |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
