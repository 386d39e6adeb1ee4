"""Bird's-eye PNG of one scan beside its ground-truth scene, to check data by eye.

Usage: ``python -m lidar_completion_training.render --root DIR --sequence 00 --scan 0 --out scan_vs_gt.png``
(the sequence needs its map: ``lidar-build-maps --root DIR``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dataset import CompletionDataset, PairConfig

__all__ = ["render_pair", "main"]


def render_pair(partial: np.ndarray, full: np.ndarray, out: str | Path, title: str = "") -> Path:
    """Write a two-panel bird's-eye view (colour = height) of a partial scan and its ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = np.percentile(full[:, 2], [1, 99])
    fig, axes = plt.subplots(1, 2, figsize=(16, 8.4), sharex=True, sharey=True, layout="constrained")
    for ax, points, name in ((axes[0], partial, "partial scan"), (axes[1], full, "ground truth")):
        order = np.argsort(points[:, 2])  # draw high points last, so walls and trees stay visible
        art = ax.scatter(points[order, 0], points[order, 1], c=points[order, 2], s=0.3, cmap="viridis",
                         vmin=low, vmax=high, linewidths=0, rasterized=True)
        ax.set_title(f"{name}: {len(points):,} points")
        ax.set_aspect("equal")
        ax.set_xlabel("x (m, forward)")
    axes[0].set_ylabel("y (m, left)")
    fig.colorbar(art, ax=axes, shrink=0.8, label="z (m)")
    fig.suptitle(title)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lidar_completion_training.render",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--sequence", default="00")
    parser.add_argument("--scan", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("scan_vs_gt.png"))
    args = parser.parse_args(argv)
    dataset = CompletionDataset(args.root, [args.sequence], PairConfig())
    partial, full = dataset.pair(args.scan)
    path = render_pair(partial, full, args.out, f"sequence {args.sequence}, scan {args.scan}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
