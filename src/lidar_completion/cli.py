"""``lidar-complete``: complete LiDAR scans offline, one file or a whole directory.

    lidar-complete scan.bin                          # -> ./completed/scan.ply
    lidar-complete velodyne/ --out dense/ --format npy --steps 4
    lidar-complete scan.ply --out dense.ply --render scan.png

Inputs: KITTI ``.bin``, nuScenes ``.pcd.bin``, ``.ply``, ``.pcd``, ``.npy`` (a directory: every
such file in it, not recursive, in name order; ``--layout kitti|nuscenes`` declares the fields of
raw ``.bin`` files, refused when their values do not fit). Outputs ``.ply`` or ``.npy``: the
whole scan (every finite point, its intensity, ``measured`` 1) plus the completed points that
add to it inside the model's radius (``measured`` 0); ``--completion-only`` writes the completed
points alone. ``--render`` writes input vs output pictures (measured and completed points in
two colours): a path ending in ``.png`` gets one picture (for a directory, of the first scan
completed); any other path is a directory that gets ``<scan>.png`` per scan.

Unusable scans are reported on stderr in one line naming the file and skipped; a scan outside
the model's domain (its noise predictions mostly clipped, or nothing completed) is written
with a warning and not counted as completed. Output and picture locations are checked
(created, written to) before any work starts. Exit status: 0 all completed, 1 some skipped or
outside the domain (or a picture could not be written), 2 nothing completed or a usage /
checkpoint / config / output-location error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import BACKENDS

__all__ = ["build_parser", "default_checkpoint", "main"]

PROG = "lidar-complete"
WHOLE_RANGE_M = 50.0  # the --render panel of the whole output (the scan passes through beyond the radius)
INPUT_SUFFIXES = (".bin", ".ply", ".pcd", ".npy")  # == io.SUPPORTED_SUFFIXES, kept import-free
LAYOUTS = ("kitti", "nuscenes")  # == io.LAYOUT_NAMES, kept import-free
OUTPUT_FORMATS = ("ply", "npy")
CONFIG_NAME = "completion_config.yaml"


class UsageError(Exception):
    """Bad arguments, config or checkpoint: exit status 2 with a one-line message."""


def default_checkpoint() -> Path:
    """The shipped lite student, next to the package."""
    from .checkpoints import SHIPPED_MODELS

    return SHIPPED_MODELS / "student_lite"


def checkpoint_argument(given: Path | None) -> Path:
    """``--checkpoint`` as given, else the shipped lite student (UsageError when it is not
    there); :meth:`SceneCompleter.from_checkpoint` resolves a shipped model's name."""
    if given is not None:
        return given
    path = default_checkpoint()
    if not path.exists():
        raise UsageError(f"no shipped model at {path}; pass --checkpoint PATH")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Complete LiDAR scans offline with a diffusion model, one file or a whole directory.",
        epilog="Exit status: 0 all scans completed, 1 some skipped, 2 none completed or usage error.",
    )
    parser.add_argument("input", type=Path, help="a scan file (.bin .pcd.bin .ply .pcd .npy) or a directory of them")
    parser.add_argument("--layout", choices=LAYOUTS, help="fields of raw .bin scans: kitti = x y z intensity, "
                        "nuscenes = x y z intensity ring (float32); default: *.pcd.bin nuscenes, other .bin kitti")
    parser.add_argument("--out", type=Path, default=Path("completed"),
                        help="output file (single input, ending .ply/.npy) or directory (default: ./completed)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, help="output format (default: from --out, else ply)")
    parser.add_argument("--checkpoint", type=Path, help="model directory, .safetensors, published .ckpt, or the "
                        "name of a shipped model, e.g. teacher_lite (default: the shipped student_lite)")
    parser.add_argument("--refine-checkpoint", type=Path, metavar="PATH_OR_NAME",
                        help="a separate refinement net: the published refine_net.ckpt (prefix model_refine.) or "
                        "one of our models that has one; replaces the checkpoint's own and turns --refine on")
    parser.add_argument("--config", type=Path, help="completion YAML (keys data.*, sampling.*, refine, device, backend)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: config, else the checkpoint's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance weight; 0 or 1 = off")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                        help="x6 refinement net (default: config; off when the checkpoint has none)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: config (auto)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="sparse convolutions: torch (built in, default), torch-bf16 (GEMMs in bfloat16), "
                        "minkowski or spconv (if installed)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: config, 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads, 1 or more (default: torch's, one per core)")
    parser.add_argument("--preset", choices=("lite", "full"), help="point budget: lite 2000 (CPU), full 18000 (GPU)")
    parser.add_argument("--completion-only", action="store_true",
                        help="write the completed points alone (the model study); default: the whole scan "
                        "(measured = 1) plus the completed points that add to it (measured = 0)")
    parser.add_argument("--render", type=Path, metavar="PNG_OR_DIR",
                        help="input vs output picture (measured and completed points in two colours): "
                        "a .png path, or a directory for one PNG per scan")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Argument values argparse's types do not check; UsageError (one line, exit 2)."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be 1 or more")


def find_inputs(path: Path) -> list[Path]:
    """The scan files of ``path``; in a directory also the dangling symbolic links with a scan
    suffix, so that the run reports them as skipped instead of ignoring them."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if (p.is_file() or (p.is_symlink() and not p.exists()))
                       and p.suffix.lower() in INPUT_SUFFIXES)
        if not files:
            raise UsageError(f"{path}: no {' / '.join(INPUT_SUFFIXES)} files in this directory")
        return files
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise UsageError(f"{path}: unsupported suffix (use {', '.join(INPUT_SUFFIXES)})")
    return [path]


def output_paths(inputs: list[Path], out: Path, fmt: str | None, single: bool) -> tuple[list[Path], Path | None]:
    """Output file per input, and the output directory (None when ``out`` is a file)."""
    suffix = out.suffix.lower().lstrip(".")
    if single and suffix in OUTPUT_FORMATS:
        if fmt is not None and fmt != suffix:
            raise UsageError(f"--out {out} does not match --format {fmt}")
        return [out], None
    if suffix in OUTPUT_FORMATS or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} must be a directory when the input is a directory")
    fmt = fmt or "ply"
    stems = [p.stem for p in inputs]
    names = [f"{p.stem}_{p.suffix[1:]}" if stems.count(p.stem) > 1 else p.stem for p in inputs]
    return [out / f"{name}.{fmt}" for name in names], out


def render_path(render: Path, scan: Path, first: bool) -> Path | None:
    if render.suffix.lower() == ".png":
        return render if first else None
    return render / f"{scan.stem}.png"


def check_writable(directory: Path, what: str) -> None:
    """Create ``directory`` if needed and write a probe file into it; UsageError if either fails."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise UsageError(f"{what}: cannot write to {directory} ({err.strerror or type(err).__name__})") from None


def check_outputs(outputs: list[Path], out_dir: Path | None, render: Path | None) -> None:
    """Every place the run will write is creatable and writable, before any work starts."""
    if out_dir is not None:
        check_writable(out_dir, f"--out {out_dir}")
    else:
        out = outputs[0]
        if out.is_dir():
            raise UsageError(f"--out {out}: is a directory, not a file")
        check_writable(out.parent, f"--out {out}")
        if out.exists() and not os.access(out, os.W_OK):
            raise UsageError(f"--out {out}: file is not writable")
    if render is not None:
        if render.suffix.lower() == ".png":
            if render.is_dir():
                raise UsageError(f"--render {render}: is a directory, not a .png file")
            check_writable(render.parent, f"--render {render}")
        else:
            check_writable(render, f"--render {render}")


def load_completer(args: argparse.Namespace):
    """Config (defaults < YAML < flags), checkpoint and the completer; UsageError on any problem."""
    from .checkpoints import CheckpointError
    from .completer import SceneCompleter
    from .config import PRESETS, load_config

    refine = args.refine
    if refine is None and args.refine_checkpoint is not None:
        refine = True  # a separate refinement net is given to be used
    overrides = {
        "sampling.steps": args.steps,
        "sampling.guidance": args.guidance,
        "sampling.seed": args.seed,
        "refine": refine,
        "device": args.device,
        "backend": args.backend,
        "data.completion_only": True if args.completion_only else None,
    }
    if args.preset:  # the preset's own budget, also over an n_part set in the YAML
        overrides |= {"data.preset": args.preset, "data.n_part": PRESETS[args.preset]["n_part"]}
    if args.config is not None and not args.config.is_file():
        raise UsageError(f"--config {args.config}: no such file")
    try:
        config = load_config(args.config, **overrides)
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None

    # refine from the YAML (no --refine) is turned off, with a note, for a model without a refiner.
    soft_refine = config.refine and args.refine is None and args.refine_checkpoint is None
    try:
        completer = SceneCompleter.from_checkpoint(checkpoint_argument(args.checkpoint),
                                                   config.replace(refine=False) if soft_refine else config,
                                                   args.refine_checkpoint)
        checkpoint, note = completer.checkpoint, None
        if soft_refine:
            if completer.model.refiner is not None:
                completer = SceneCompleter(completer.model, config)
                completer.checkpoint = checkpoint
            else:
                note = f"note: {checkpoint} has no refinement net; completing without refinement"
        return completer, checkpoint, note
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    except (ValueError, RuntimeError) as err:  # the config does not fit the model, or no such device
        raise UsageError(str(err)) from None


def summarise(timings: list[dict[str, float]]) -> str:
    stages = list(dict.fromkeys(k for t in timings for k in t))
    medians = " | ".join(f"{s} {statistics.median(t[s] for t in timings if s in t):.0f}" for s in stages)
    return f"median per scan (ms): {medians}"


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    inputs = find_inputs(args.input)
    single = not args.input.is_dir()
    outputs, out_dir = output_paths(inputs, args.out, args.format, single)
    check_outputs(outputs, out_dir, args.render)

    import yaml
    from tqdm import tqdm

    from .completer import ScanError
    from .io import PointFileError, read_points, write_points
    from .render import render_comparison

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    completer, checkpoint, note = load_completer(args)
    if note:
        print(note, file=sys.stderr)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        used = {"checkpoint": str(checkpoint), "version": __version__, "completion": completer.config.to_dict()}
        (out_dir / CONFIG_NAME).write_text(yaml.safe_dump(used, sort_keys=False))

    setting = (f"steps={completer.steps} guidance={completer.guidance:g} "
               f"refine={'on' if completer.config.refine else 'off'} n_part={completer.n_part} "
               f"device={completer.device} range={completer.config.data.min_range:g}-{completer.max_range:g} m")
    timings, skipped, no_picture, outside = [], [], [], []
    bar = tqdm(list(zip(inputs, outputs)), desc=PROG, unit="scan", disable=None, file=sys.stderr)
    for scan, out in bar:
        try:
            if out.resolve() == scan.resolve():
                raise PointFileError(f"{scan}: output would overwrite the input")
            points = read_points(scan, layout=args.layout, with_intensity=True)
            result = completer.complete(points)
            if len(result.points) == 0:
                raise ScanError("no completed point left after post-processing (range / height band)")
            write_points(out, result.points, result.intensity, result.measured.astype("uint8"))
        except PointFileError as err:
            reason = str(err)
        except (ScanError, OSError) as err:
            reason = f"{scan}: {err}"
        else:
            timings.append(result.timings_ms)
            picture = render_path(args.render, scan, len(timings) == 1) if args.render else None
            extra = ""
            if picture is not None:
                label = f"output ({completer.steps} step{'s' * (completer.steps > 1)})"
                try:
                    panels = [("input", points), (label, result.points, result.measured)]
                    if not completer.config.data.completion_only:  # the whole range, radius marked
                        panels.append(("output, whole range", result.points, result.measured))
                    render_comparison(panels, picture, max_range=[completer.max_range] * 2 + [WHOLE_RANGE_M],
                                      circle=completer.max_range, title=f"{scan.name}: {setting}")
                    extra = f", picture {picture}"
                except OSError as err:  # the completion is written; say what is missing
                    no_picture.append(picture)
                    tqdm.write(f"{PROG}: error: {picture}: picture not written ({err.strerror or err})",
                               file=sys.stderr)
            tqdm.write(f"{scan} -> {out}: {len(points):,} -> {len(result.points):,} points "
                       f"({result.completed_points:,} completed within {result.radius:g} m, "
                       f"{100 * result.clipped_fraction:.1f}% of noise predictions clipped) "
                       f"in {result.timings_ms['total'] / 1000:.2f} s{extra}", file=sys.stdout)
            if result.out_of_domain:
                why = result.domain_problem
                outside.append(f"{scan}: {why}")
                tqdm.write(f"{PROG}: warning: {scan} is outside the model's domain ({why}): the output is the "
                           f"scan with {result.completed_points:,} completed points, not a completion to trust",
                           file=sys.stderr)
            continue
        skipped.append(reason)
        tqdm.write(f"{PROG}: {'error' if single else 'skipped'}: {reason}", file=sys.stderr)
    bar.close()

    done = len(timings) - len(outside)
    print(f"completed {done} of {len(inputs)} scan(s) ({setting})"
          + (f"; {len(outside)} outside the model's domain" if outside else ""))
    if timings:
        print(summarise(timings))
    if skipped and not single:
        print(f"skipped {len(skipped)} scan(s):", file=sys.stderr)
        for reason in skipped:
            print(f"  {reason}", file=sys.stderr)
    return 0 if not skipped and not no_picture and not outside else 1 if done else 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
