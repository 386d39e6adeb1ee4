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


MEASURED_COLOUR, COMPLETED_COLOUR = "#9a9a9a", "#e4572e"  # grey scan, orange completion


def _in_range(points: np.ndarray, max_range: float, max_drawn: int,
              measured: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    xyz = np.asarray(points, dtype=np.float32)[:, :3]
    keep = np.asarray(np.isfinite(xyz).all(axis=1))
    keep[keep] = np.linalg.norm(xyz[keep, :2], axis=1) < max_range
    xyz, measured = xyz[keep], (None if measured is None else np.asarray(measured, bool)[keep])
    if len(xyz) > max_drawn:
        pick = np.random.default_rng(0).choice(len(xyz), max_drawn, replace=False)
        xyz, measured = xyz[pick], (None if measured is None else measured[pick])
    order = np.argsort(xyz[:, 2]) if measured is None else np.lexsort((xyz[:, 2], ~measured))
    return xyz[order], (None if measured is None else measured[order])  # completed (and high) points last


def render_comparison(
    panels: Sequence[tuple],
    out_path: str | Path,
    max_range: float | Sequence[float] = 50.0,
    max_drawn: int = 40_000,
    title: str = "",
    circle: float | None = None,
) -> Path:
    """Write a PNG with one column per ``(name, points [N, >=3])`` or ``(name, points,
    measured [N] bool)``: bird's-eye view on top, perspective view (from behind and above the
    sensor) below. Coloured by height, or, where ``measured`` is given, measured points grey
    and completed points orange. ``max_range``: one radius for all panels, or one per panel;
    ``circle`` draws that radius (e.g. how far completion reaches) on every bird's-eye view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ranges = [float(max_range)] * len(panels) if isinstance(max_range, (int, float, np.number)) else [float(r) for r in max_range][:len(panels)]
    drawn = [_in_range(panel[1], r, max_drawn, panel[2] if len(panel) > 2 else None)
             for panel, r in zip(panels, ranges)]
    heights = np.concatenate([d[:, 2] for d, _ in drawn if len(d)] or [np.zeros(1)])
    low, high = np.percentile(heights, [1, 99])
    style = {"cmap": "viridis", "vmin": low, "vmax": max(high, low + 1), "linewidths": 0}

    columns = len(panels)
    fig = plt.figure(figsize=(6 * columns, 10.5), layout="constrained")
    grid = fig.add_gridspec(2, columns, height_ratios=(1, 0.75))
    art = None
    for col, (panel, (xyz, measured), radius) in enumerate(zip(panels, drawn, ranges)):
        name, points = panel[0], panel[1]
        label = f"{name}: {len(points):,} points"
        if measured is None:
            colours = {"c": xyz[:, 2], **style}
        else:
            colours = {"c": np.where(measured, MEASURED_COLOUR, COMPLETED_COLOUR), "linewidths": 0}
            label += f" ({np.count_nonzero(~np.asarray(panel[2], bool)):,} completed)"
        size = 0.4 * max(1.0, 50.0 / radius) ** 0.5
        bev = fig.add_subplot(grid[0, col])
        scatter = bev.scatter(xyz[:, 0], xyz[:, 1], s=size, **colours)
        art = scatter if measured is None else art
        if circle is not None and circle < radius:
            bev.add_patch(plt.Circle((0, 0), circle, fill=False, linestyle="--", color="black", linewidth=0.8))
        if measured is not None:
            bev.legend(handles=[Line2D([], [], marker="o", linestyle="", color=MEASURED_COLOUR, label="measured"),
                                Line2D([], [], marker="o", linestyle="", color=COMPLETED_COLOUR, label="completed")],
                       loc="upper right", fontsize=8)
        bev.set(xlim=(-radius, radius), ylim=(-radius, radius), aspect="equal",
                xlabel="x (m, forward)", ylabel="y (m, left)", title=f"{label}\nbird's-eye view")

        view = fig.add_subplot(grid[1, col], projection="3d")
        view.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], s=0.3 * size / 0.4, depthshade=False, **colours)
        view.set_proj_type("persp", focal_length=0.5)
        view.view_init(elev=22, azim=-160)  # behind and to the right of the sensor, looking forward
        view.set(xlim=(-radius, radius), ylim=(-radius, radius), zlim=(low - 1, max(high, low + 1) + 1))
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
