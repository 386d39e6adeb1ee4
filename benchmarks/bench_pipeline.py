"""Per-stage time of the whole completion pipeline: teacher (50 steps, guidance 6) vs student (8/4/2/1 steps).

    python benchmarks/bench_pipeline.py                              # lite preset, CPU
    python benchmarks/bench_pipeline.py --device cuda --preset full  # published scale on a GPU

Every row completes the same input (the real SemanticKITTI scan in ``shared/data``) through
:class:`~lidar_completion.completer.SceneCompleter`, after one warm-up completion per model;
a stage's time is the median over ``--repeats``. Models: the shipped
``src/lidar_completion/models/{teacher,student}_<preset>`` (or ``_lite``) when present, else randomly
initialised ones of the same architecture (channel ratio 0.25, with the x6 refinement net),
which time the same as trained ones but complete nothing useful; the output says which.
A last line times farthest-point sampling alone on the full scan (target < 0.5 s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import lidar_completion
from lidar_completion.checkpoints import CompletionModel, ModelConfig, load_model
from lidar_completion.completer import SceneCompleter, farthest_point_sample, resolve_device
from lidar_completion.config import PRESETS, load_config
from lidar_completion.io import read_points

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO.parent / "shared" / "data" / "semantickitti_08_000123.ply"
MODELS = Path(lidar_completion.__file__).resolve().parent / "models"
STAGES = ("preprocess", "encode", "sample", "postprocess", "refine", "total")


def get_model(kind: str, preset: str, ratio: float, seed: int) -> tuple[CompletionModel, str]:
    """The shipped ``<kind>_<preset>`` model, else ``<kind>_lite``, else a random one."""
    names = list(dict.fromkeys((f"{kind}_{preset}", f"{kind}_lite")))
    for name in names:
        path = MODELS / name
        if path.exists():
            return load_model(path), f"shipped {path}"
    torch.manual_seed(seed)
    model = CompletionModel(ModelConfig(channel_ratio=ratio, refine_channel_ratio=ratio, kind=kind))
    return model, f"RANDOM INIT (no {' or '.join(names)} shipped), channel ratio {ratio}"


def time_row(model, preset, device, steps, guidance, scan, repeats) -> tuple[dict[str, float], int, int]:
    overrides = {"data.preset": preset, "data.n_part": PRESETS[preset]["n_part"], "device": device,
                 "sampling.steps": steps, "sampling.guidance": guidance, "refine": model.refiner is not None}
    completer = SceneCompleter(model, load_config(**overrides))
    runs = [completer.complete(scan) for _ in range(repeats)]
    medians = {s: statistics.median(r.timings_ms.get(s, 0.0) for r in runs) for s in STAGES}
    return medians, runs[-1].nfe, len(runs[-1].points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="lite")
    parser.add_argument("--repeats", type=int, default=1, help="timed completions per row (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--ratio", type=float, default=0.25, help="channel ratio of random-init models")
    parser.add_argument("--scan", type=Path, default=SCAN)
    parser.add_argument("--teacher", type=float, nargs=2, default=(50, 6.0), metavar=("STEPS", "GUIDANCE"),
                        help="teacher row (published: 50 6); STEPS 0 leaves it out")
    parser.add_argument("--student-steps", type=int, nargs="+", default=[8, 4, 2, 1])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        resolve_device(args.device)
    except RuntimeError as err:
        parser.error(str(err))
    teacher_steps, teacher_guidance = int(args.teacher[0]), args.teacher[1]
    # (model, steps, guidance): the teacher's published setting, then the student's, unguided.
    settings = [("teacher", teacher_steps, teacher_guidance)] * (teacher_steps > 0)
    settings += [("student", k, 0.0) for k in args.student_steps]

    scan = read_points(args.scan)
    kinds = dict.fromkeys(kind for kind, _, _ in settings)
    models = {kind: get_model(kind, args.preset, args.ratio, seed=kind == "student") for kind in kinds}
    n_part = PRESETS[args.preset]["n_part"]
    print(f"input: {args.scan.name}, {len(scan):,} points; preset {args.preset} (n_part {n_part}); "
          f"device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"median of {args.repeats}")
    for kind, (model, origin) in models.items():
        print(f"{kind}: {origin}; refinement {'on' if model.refiner is not None else 'off (none in checkpoint)'}")
        time_row(model, args.preset, args.device, 1, 0.0, scan, 1)  # warm-up

    header = f"{'setting':<22}{'NFE':>5}" + "".join(f"{s:>13}" for s in STAGES) + f"{'points':>10}{'speed-up':>10}"
    print("\ntimes in ms\n" + header + "\n" + "-" * len(header))
    reference = None  # speed-up is relative to the first row (the teacher unless left out)
    for kind, steps, guidance in settings:
        ms, nfe, count = time_row(models[kind][0], args.preset, args.device, steps, guidance, scan, args.repeats)
        reference = reference or ms["total"]
        label = f"{kind} {steps} step{'s' * (steps > 1)}" + (f" w={guidance:g}" if guidance else "")
        print(f"{label:<22}{nfe:>5}" + "".join(f"{ms[s]:>13.0f}" for s in STAGES)
              + f"{count:>10,}{reference / ms['total']:>9.1f}x", flush=True)

    for count in sorted({n_part, PRESETS["full"]["n_part"]}):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            farthest_point_sample(scan, count)
            times.append(time.perf_counter() - start)
        verdict = "ok" if statistics.median(times) < 0.5 else "OVER TARGET"
        print(f"FPS alone: {len(scan):,} -> {count:,} points in {statistics.median(times):.3f} s "
              f"(median of 3; target < 0.5 s: {verdict})")


if __name__ == "__main__":
    main()
