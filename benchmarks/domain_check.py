"""Does the model stay on the scene for any field of view and sensor? One row per scan: the
points the model was given (density-matched), its sampled points, how many of them end at the
sampler's bound (with the noise clip, and without it), the share of clipped noise predictions
and whether the scan is reported outside the model's domain; last, what the pipeline before
density matching and the clip (always ``n_part`` points, unbounded steps) left at the bound.

    python benchmarks/domain_check.py                                  # the real scan's crops
    python benchmarks/domain_check.py --root data/urban_eval --scans 0 5   # + each held-out sequence (one sensor each), whole and 90 deg

Scans: the real SemanticKITTI scan whole, its front half, a 90-degree camera crop, that crop
with one elevation band in four, its upper rings only (first 25,000 points) and a flat
ground-only copy; with ``--root``, scans of every sequence there, whole and cropped to 90
degrees. The raw sample (before post-processing) is what is counted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from lidar_completion.checkpoints import SHIPPED_MODELS
from lidar_completion.completer import SceneCompleter
from lidar_completion.config import CompletionConfig
from lidar_completion.io import read_points
from lidar_completion.points import read_kitti_bin

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO.parent / "shared" / "data" / "semantickitti_08_000123.ply"


def fov90(points: np.ndarray) -> np.ndarray:
    return points[(points[:, 0] > 0) & (np.abs(points[:, 1]) < points[:, 0])]


def scans(real: np.ndarray, root: Path | None, picks: list[int]) -> dict[str, np.ndarray]:
    crop = fov90(real)
    elevation = np.degrees(np.arctan2(crop[:, 2], np.hypot(crop[:, 0], crop[:, 1])))
    out = {"real, whole": real, "real, front half": real[real[:, 0] > 0], "real, 90 deg": crop,
           "real, 90 deg, 1 band in 4": crop[np.floor((elevation + 30) / 0.42).astype(int) % 4 == 0],
           "real, upper rings only": real[:25_000],
           "flat ground only": np.column_stack([real[:, :2], np.full(len(real), -1.73, np.float32)])}
    for sequence in sorted((root / "sequences").iterdir()) if root else []:
        meta = sequence / "synthetic.json"
        sensor = json.loads(meta.read_text())["preset"] if meta.is_file() else sequence.name
        for i in picks:
            scan = read_kitti_bin(sequence / "velodyne" / f"{i:06d}.bin")[:, :3]
            out[f"{sequence.name} ({sensor}) scan {i}"] = scan
            out[f"{sequence.name} ({sensor}) scan {i}, 90 deg"] = fov90(scan)
    return out


def at_bound(completer: SceneCompleter, scan: np.ndarray) -> int:
    """Sampled points (before post-processing) at the sampler's bounding box."""
    sample, _, _ = completer.sample_scans(completer.preprocess(scan)[0][None])
    return int((np.abs(sample) >= completer.sample_bound - 1e-3).any(-1).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(SHIPPED_MODELS / "student_lite"))
    parser.add_argument("--scan", type=Path, default=SCAN)
    parser.add_argument("--root", type=Path, help="a generated (or SemanticKITTI) root: scans of each sequence too")
    parser.add_argument("--scans", type=int, nargs="+", default=[0], help="scan indices per sequence")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = CompletionConfig(device="cpu").replace(**{"data.completion_only": True})
    clipped = SceneCompleter.from_checkpoint(args.checkpoint, config)
    unbounded = CompletionConfig.from_dict({**config.to_dict(), "sampling.noise_clip": None})
    unclipped = SceneCompleter(clipped.model, unbounded)
    # The pipeline before this release: always n_part points (no density matching), no clip.
    legacy_model = copy.copy(clipped.model)
    legacy_model.config = dataclasses.replace(clipped.model.config, surface_cells=None)
    legacy = SceneCompleter(legacy_model, unbounded)
    print(f"{args.checkpoint}: n_part {clipped.n_part}, surface_cells {clipped.model.config.surface_cells}, "
          f"noise_clip {config.sampling.noise_clip:g}, bound {clipped.sample_bound:g} m")
    print("| scan | points | model points | sampled | at the bound | at the bound, no clip | clipped | out of domain "
          "| before (n_part points, no clip): at the bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, scan in scans(read_points(args.scan), args.root, args.scans).items():
        result = clipped.complete(scan)
        print(f"| {name} | {len(scan):,} | {result.model_points:,} | {result.sampled_points:,} | "
              f"{at_bound(clipped, scan)} | {at_bound(unclipped, scan)} | {100 * result.clipped_fraction:.1f}% | "
              f"{'yes' if result.out_of_domain else 'no'} | {at_bound(legacy, scan)} of {legacy.n_part * 10:,} |",
              flush=True)


if __name__ == "__main__":
    main()
