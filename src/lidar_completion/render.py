"""Pictures of point clouds: a bird's-eye view and a perspective view per cloud, side by side.

Shared by the CLI (``lidar-complete --render``), the benchmarks and evaluation. Colour is
height on one scale for all panels, so input and completion compare directly. Each panel
draws at most ``max_drawn`` points (a fixed random subset), which keeps a frame of 10^5-10^6
points to about a second and the PNG small.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["render_comparison"]


def _in_range(points: np.ndarray, max_range: float, max_drawn: int) -> np.ndarray:
    xyz = np.asarray(points, dtype=np.float32)[:, :3]
    xyz = xyz[np.isfinite(xyz).all(axis=1)]
    xyz = xyz[np.linalg.norm(xyz[:, :2], axis=1) < max_range]
    if len(xyz) > max_drawn:
        xyz = xyz[np.random.default_rng(0).choice(len(xyz), max_drawn, replace=False)]
    return xyz[np.argsort(xyz[:, 2])]  # high points last, so walls and trees stay visible


def render_comparison(
    panels: Sequence[tuple[str, np.ndarray]],
    out_path: str | Path,
    max_range: float = 50.0,
    max_drawn: int = 40_000,
    title: str = "",
) -> Path:
    """Write a PNG with one column per ``(name, points [N, >=3])``: bird's-eye view on top,
    perspective view (from behind and above the sensor) below, coloured by height."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [_in_range(points, max_range, max_drawn) for _, points in panels]
    heights = np.concatenate([d[:, 2] for d in drawn if len(d)] or [np.zeros(1)])
    low, high = np.percentile(heights, [1, 99])
    style = {"cmap": "viridis", "vmin": low, "vmax": max(high, low + 1), "linewidths": 0}

    columns = len(panels)
    fig = plt.figure(figsize=(6 * columns, 10.5), layout="constrained")
    grid = fig.add_gridspec(2, columns, height_ratios=(1, 0.75))
    art = None
    for col, ((name, points), xyz) in enumerate(zip(panels, drawn)):
        label = f"{name}: {len(points):,} points"
        bev = fig.add_subplot(grid[0, col])
        art = bev.scatter(xyz[:, 0], xyz[:, 1], s=0.4, c=xyz[:, 2], **style)
        bev.set(xlim=(-max_range, max_range), ylim=(-max_range, max_range), aspect="equal",
                xlabel="x (m, forward)", ylabel="y (m, left)", title=f"{label}\nbird's-eye view")

        view = fig.add_subplot(grid[1, col], projection="3d")
        view.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], s=0.3, depthshade=False, c=xyz[:, 2], **style)
        view.set_proj_type("persp", focal_length=0.5)
        view.view_init(elev=22, azim=-160)  # behind and to the right of the sensor, looking forward
        view.set(xlim=(-max_range, max_range), ylim=(-max_range, max_range), zlim=(low - 1, max(high, low + 1) + 1))
        view.set_box_aspect((1, 1, 0.2), zoom=2.1)
        view.set_title("perspective view")
        view.set_axis_off()
    if art is not None:
        fig.colorbar(art, ax=fig.axes, shrink=0.5, label="z (m)", location="bottom", pad=0.02)
    if title:
        fig.suptitle(title)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
