"""Per-stage time and frame rate of the whole completion pipeline: teacher (50 steps, guidance 6)
vs student (8/4/2/1 steps), at the shipped model's own point budget, 2 CPU threads.

    python benchmarks/bench_pipeline.py                              # the models' own budget, CPU, 2 threads
    python benchmarks/bench_pipeline.py --teacher 0 0 --student-steps 1 --repeats 5   # the node's setting
    python benchmarks/bench_pipeline.py --device cuda --preset full  # published scale on a GPU
    python benchmarks/bench_pipeline.py --teacher 0 0 --student-steps 2 --backend torch-bf16   # bfloat16 GEMMs

Every row completes the same input (the real SemanticKITTI scan in ``shared/data``) through
:class:`~lidar_completion.completer.SceneCompleter`, after one warm-up completion per model;
a stage's time is the median over ``--repeats``, the frame rate is 1000 / median total ms.
By default (``--preset model``) each model runs at the point budget and radius it was
trained with, read from its config (``n_part``, ``max_range``), as the node and the CLI do;
``lite`` / ``full`` force 2,000 / 18,000 scan points. Refinement is off unless ``--refine``
(the node's default). Models: the shipped ``src/lidar_completion/models/{teacher,student}_lite``
(``_<preset>`` first when it exists), else randomly initialised ones of the same architecture
(channel ratio 0.25, with the x6 refinement net), which time the same as trained ones but
complete nothing useful; the output says which. A last line times farthest-point sampling
alone on the full scan (target < 0.5 s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import lidar_completion
from lidar_completion.checkpoints import load_model
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.completer import SceneCompleter, resolve_device
from lidar_completion.points import farthest_point_sample
from lidar_completion.config import BACKENDS, MODEL_PRESET, PRESETS, load_config
from lidar_completion.io import read_points

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO.parent / "shared" / "data" / "semantickitti_08_000123.ply"
MODELS = Path(lidar_completion.__file__).resolve().parent / "models"
STAGES = ("preprocess", "encode", "sample", "postprocess", "refine", "free_space", "compose", "total")
PRESET_CHOICES = (MODEL_PRESET, *sorted(PRESETS))


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


def make_completer(model, preset: str, device: str, steps: int, guidance: float, refine: bool,
                   backend: str = "torch") -> SceneCompleter:
    """``preset`` "model": the model's own ``n_part`` and ``max_range`` (its config); else a
    fixed budget. The range is always capped at the model's radius by the completer."""
    overrides = {"data.preset": preset, "device": device, "sampling.steps": steps, "sampling.guidance": guidance,
                 "refine": refine and model.refiner is not None, "backend": backend}
    if preset != MODEL_PRESET:
        overrides["data.n_part"] = PRESETS[preset]["n_part"]
    if model.config.max_range:
        overrides["data.max_range"] = model.config.max_range
    return SceneCompleter(model, load_config(**overrides))


def time_row(model, preset, device, steps, guidance, scan, repeats, refine=False,
             backend="torch") -> tuple[dict[str, float], int, int]:
    completer = make_completer(model, preset, device, steps, guidance, refine, backend)
    runs = [completer.complete(scan) for _ in range(repeats)]
    medians = {s: statistics.median(r.timings_ms.get(s, 0.0) for r in runs) for s in STAGES}
    return medians, runs[-1].nfe, len(runs[-1].points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--preset", choices=PRESET_CHOICES, default=MODEL_PRESET,
                        help="point budget: model (each model's own, default), lite 2000, full 18000")
    parser.add_argument("--repeats", type=int, default=3, help="timed completions per row (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; 0: torch's)")
    parser.add_argument("--refine", action="store_true", help="run the x6 refinement net (when the model has one)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="sparse convolutions (torch-bf16: GEMMs in bfloat16; spconv, minkowski: if installed)")
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
    print(f"input: {args.scan.name}, {len(scan):,} points; preset {args.preset}; device {args.device}; backend {args.backend}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; median of {args.repeats}")
    budgets = {}
    for kind, (model, origin) in models.items():
        completer = make_completer(model, args.preset, args.device, 1, 0.0, args.refine, args.backend)
        budgets[kind] = completer.n_part
        refine = ("on" if args.refine else "off (--refine)") if model.refiner is not None else "off (none in checkpoint)"
        print(f"{kind}: {origin}; channel ratio {model.config.channel_ratio:g}; {completer.n_part:,} scan points x "
              f"{completer.config.data.repeat} -> {completer.n_part * completer.config.data.repeat:,} completed, "
              f"range {completer.config.data.min_range:g}-{completer.max_range:g} m "
              f"(model config: n_part {model.config.n_part}, max_range {model.config.max_range}); refinement {refine}")
        completer.complete(scan)  # warm-up

    header = (f"{'setting':<22}{'NFE':>5}" + "".join(f"{s:>13}" for s in STAGES)
              + f"{'Hz':>8}{'points':>10}{'speed-up':>10}")
    print("\ntimes in ms\n" + header + "\n" + "-" * len(header))
    reference = None  # speed-up is relative to the first row (the teacher unless left out)
    for kind, steps, guidance in settings:
        ms, nfe, count = time_row(models[kind][0], args.preset, args.device, steps, guidance, scan, args.repeats,
                                  args.refine, args.backend)
        reference = reference or ms["total"]
        label = f"{kind} {steps} step{'s' * (steps > 1)}" + (f" w={guidance:g}" if guidance else "")
        print(f"{label:<22}{nfe:>5}" + "".join(f"{ms[s]:>13.1f}" for s in STAGES)
              + f"{1000 / ms['total']:>8.2f}{count:>10,}{reference / ms['total']:>9.1f}x", flush=True)

    for count in sorted({*budgets.values(), PRESETS["full"]["n_part"]}):
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
