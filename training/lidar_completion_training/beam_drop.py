"""Beam-drop: a check of the completer on real scans, which have no ground truth.

    lidar-evaluate beam-drop scan.ply [more scans] [--keep-every 2 4] [--fov-deg 360 90]
                             [--checkpoint student_lite] [--out out/beam_drop]

A real scan has no dense ground truth, but it is itself the ground truth of a sparser
sensor: keep one ring (beam) in ``k`` of it, complete that, and score the output against
the whole scan. Rings come from the file's ring field when it has one (a nuScenes
``.pcd.bin``; :mod:`lidar_completion.io` reads no ring from PLY / PCD / NPY files), else from
the scan's elevation bands (:func:`estimate_rings`), and are numbered from the top by
elevation; ring ``r`` is kept when ``r % k == 0``. ``--fov-deg`` crops both the full and the
dropped scan to a forward field of view (``x > 0``, ``|atan2(y, x)| < fov / 2``).

Scored inside the model's range band only (``min_range < |p| < max_range`` of the
completer, 3-D range as :func:`lidar_completion.points.in_range` and the pipeline use):

* completeness: mean distance (m) from each full-scan point in the band to the nearest
  output point;
* precision / recall / F-score at 10 cm: the share of output points in the band within
  10 cm of a full-scan point, of full-scan points in the band within 10 cm of an output
  point, and their harmonic mean;
* outliers: output points in the band more than 1 m from any full-scan point.

The points looked up (the "target" side) are never cut to the band, so a point just inside
the band is not penalised for a neighbour just outside it; this one-sided cut is why these
few lines are written here rather than taken from :mod:`.metrics`, whose functions compare
the two clouds they are given. Rows: the dropped scan itself (the line to beat), the
completer's output (``CompletionResult.points``: the pipeline as configured, the measured
scan plus the completed points that add), and the completed points alone
(``data.completion_only``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy.spatial import cKDTree

from lidar_completion.points import in_range

if TYPE_CHECKING:
    from lidar_completion.completer import SceneCompleter

__all__ = ["RingEstimate", "estimate_origin_height", "estimate_rings", "rings_from_field", "read_scan", "drop_rings",
           "fov_mask", "score", "beam_drop", "markdown_table", "main"]

F_THRESHOLD = 0.10  # m
OUTLIER_DISTANCE = 1.0  # m
DROPPED_ROW = "dropped scan (input)"
OUTPUT_ROW = "completer output"
COMPLETION_ONLY_ROW = "completion only (data.completion_only)"
HEADERS = ("file", "FOV", "keep 1 in k", "row", "points in band", "completeness (m) ↓", "precision@10cm ↑",
           "recall@10cm ↑", "F@10cm ↑", "> 1 m from scan ↓")


# --------------------------------------------------------------------------- rings


@dataclass
class RingEstimate:
    """Ring index per point (0 = the top ring; -1: not a usable point) and how it was found."""

    ring: np.ndarray
    origin_height: float  # m: height of the beams' origin above the scan's origin, estimated
    sector_deg: float
    split_deg: float  # elevation gap that separates two rings inside a sector
    source: str = "elevation"  # or "field": the file's ring field

    @property
    def rings(self) -> int:
        """Number of distinct rings found."""
        return len(np.unique(self.ring[self.ring >= 0]))

    def points_per_ring(self) -> np.ndarray:
        valid = self.ring[self.ring >= 0]
        return np.bincount(valid) if len(valid) else np.zeros(0, dtype=np.int64)


def _elevation_azimuth(xyz: np.ndarray, origin_height: float) -> tuple[np.ndarray, np.ndarray]:
    """Elevation (deg) from a point ``origin_height`` m above the origin, azimuth (deg, [0, 360))."""
    horizontal = np.hypot(xyz[:, 0], xyz[:, 1])
    elevation = np.degrees(np.arctan2(xyz[:, 2] - origin_height, horizontal))
    azimuth = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0
    return elevation, azimuth


def _conditional_entropy(elevation: np.ndarray, sector: np.ndarray, bin_deg: float) -> float:
    """Entropy of fine elevation bins given the azimuth sector: low when rings are sharp lines."""
    key = (sector.astype(np.int64) << 32) + np.floor(elevation / bin_deg).astype(np.int64)
    _, joint = np.unique(key, return_counts=True)
    _, marginal = np.unique(sector, return_counts=True)
    joint, marginal = joint / joint.sum(), marginal / marginal.sum()
    return float(-(joint * np.log(joint)).sum() + (marginal * np.log(marginal)).sum())


def estimate_origin_height(xyz: np.ndarray, heights: np.ndarray | None = None, *, sector_deg: float = 1.0,
                           bin_deg: float = 0.02, refine: bool = True) -> float:
    """Height (m) of the point the beams leave from, above the scan's origin.

    A beam at elevation ``e`` leaving from height ``h`` shows, seen from the origin, at
    ``e + h / r`` (radians) at horizontal range ``r``: near points smear its elevation band
    (KITTI's HDL-64 beams leave ~0.2 m above the velodyne frame's origin, which smears the
    rings within 10 m by more than their spacing). The height whose elevations are sharpest
    per azimuth sector (lowest conditional entropy of fine elevation bins) is the answer,
    searched over ``heights`` (default -0.5..0.5 m by 2 cm, then refined by 2.5 mm): 0 for
    a scan whose rays start at the origin (the synthetic sensor)."""
    heights = np.round(np.arange(-0.5, 0.5001, 0.02), 4) if heights is None else np.asarray(heights, dtype=np.float64)
    horizontal = np.hypot(xyz[:, 0], xyz[:, 1])
    sector = np.floor((np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0) / sector_deg)
    entropy = [_conditional_entropy(np.degrees(np.arctan2(xyz[:, 2] - h, horizontal)), sector, bin_deg) for h in heights]
    best = float(heights[int(np.argmin(entropy))])
    if refine and len(heights) > 1:
        step = float(np.min(np.abs(np.diff(heights))))
        fine = best + np.arange(-8, 9) * (step / 8)
        return estimate_origin_height(xyz, fine, sector_deg=sector_deg, bin_deg=bin_deg, refine=False)
    return round(best, 4)


def _valley(log_values: np.ndarray, bin_width: float = 0.05) -> float:
    """The middle of the low region between the two modes of ``log_values``: between the
    histogram's highest bin (the within-ring gaps, by far the most) and its 99th percentile
    (inside the between-ring mode), the bins within 5 % of the lowest count; their median.
    (Otsu's threshold fails here: the within-ring mode outnumbers the other many times.)"""
    edges = np.arange(log_values.min(), log_values.max() + 2 * bin_width, bin_width)
    hist = np.convolve(np.histogram(log_values, bins=edges)[0], np.ones(5) / 5, mode="same")
    centres = 0.5 * (edges[1:] + edges[:-1])
    low = int(np.argmax(hist))
    high = max(low, int(np.searchsorted(centres, np.quantile(log_values, 0.99))))
    segment = hist[low:high + 1]
    floor = segment.min() + 0.05 * (segment.max() - segment.min())
    return float(np.median(centres[low:high + 1][segment <= floor]))


def _local_spacing(mid: np.ndarray, gap: np.ndarray, bin_deg: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Ring spacing (deg) against elevation: median gap between neighbouring clusters per
    elevation bin (most neighbours are adjacent rings; a missing ring's double gap is rarer),
    bins without gaps filled from their neighbours. Returns bin centres and spacings."""
    if len(gap) == 0:
        return np.array([0.0]), np.array([1.0])
    low, high = np.floor(mid.min() / bin_deg), np.floor(mid.max() / bin_deg)
    centres = (np.arange(low, high + 1) + 0.5) * bin_deg
    index = (np.floor(mid / bin_deg) - low).astype(np.int64)
    spacing = np.full(len(centres), np.nan)
    for i in range(len(centres)):
        here = gap[index == i]
        if len(here) >= 3:
            spacing[i] = np.median(here)
    known = np.isfinite(spacing)
    if not known.any():
        spacing[:] = np.median(gap)
    else:
        spacing = np.interp(centres, centres[known], spacing[known])
    return centres, spacing


def estimate_rings(points: np.ndarray, *, sector_deg: float = 2.0, origin_height: float | None = None) -> RingEstimate:
    """Ring index of every point of one spinning-LiDAR scan, from its elevation bands.

    A single elevation histogram cannot separate the rings of a real scan: they wander in
    elevation with azimuth (motion compensation, sensor tilt) by more than their spacing over
    the turn (KITTI's lower rings by ~1 deg at 0.5 deg spacing), but little from one degree to
    the next. So the rings are found locally and joined:

    1. Elevation from the beams' origin (its height estimated, :func:`estimate_origin_height`),
       azimuth; the scan cut into ``sector_deg`` azimuth sectors.
    2. In each sector the points, sorted by elevation, split into clusters where consecutive
       elevations are further apart than ``split_deg`` (the valley between the within-ring
       and between-ring gaps of the whole scan): one cluster per ring and sector.
    3. Neighbouring clusters of a sector are one ring apart, or one ring split in two (a near
       object) when less than half a spacing apart, the spacing the scan's median gap between
       neighbouring clusters at that elevation.
    4. Tracks: a cluster joins the cluster of the neighbouring sector nearest in elevation when
       each is the other's nearest and they are within a quarter spacing (a ring followed round
       the turn; a jump, at the scan's seam or a near object, ends a track instead of
       switching to the next ring), closest pairs first, never joining two tracks that hold
       clusters of one sector.
    5. Ring numbers of the tracks: every pair of tracks neighbouring in some sector votes
       step 3's count (1 or 0) for the difference of their numbers; the most-voted difference
       of each pair, over a maximum spanning tree of the pairs (by votes), numbers every track,
       then a robust least-squares fit to all pairs (:func:`_refine_numbers`) corrects a group
       the tree hung off a wrong pair. A ring missing in some sectors is counted from the
       others; an irregular gap (the HDL-64's blocks are 0.8 deg apart, their rings 0.33 and
       0.5 deg) is one ring step.
    6. Numbers that got few points (stray clusters) join the nearest real ring; the rest are
       renumbered 0..R-1 from the top.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree

    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    ring = np.full(len(xyz), -1, dtype=np.int64)
    usable = np.isfinite(xyz).all(axis=1) & (np.hypot(xyz[:, 0], xyz[:, 1]) > 1e-6)
    if usable.sum() < 2:
        return RingEstimate(ring, 0.0, sector_deg, 0.0)
    pts = xyz[usable]
    height = estimate_origin_height(pts) if origin_height is None else float(origin_height)
    elevation, azimuth = _elevation_azimuth(pts, height)
    sector = np.floor(azimuth / sector_deg).astype(np.int64)
    order = np.lexsort((-elevation, sector))  # by sector, then top to bottom
    el, sec = elevation[order], sector[order]
    same_sector = sec[1:] == sec[:-1]
    drop = el[:-1] - el[1:]  # >= 0 inside a sector
    positive = drop[same_sector & (drop > 0)]
    split = 10 ** _valley(np.log10(positive)) if len(positive) > 16 else 0.1
    # 2. clusters
    new_cluster = np.concatenate([[True], ~same_sector | (drop > split)])
    cluster = np.cumsum(new_cluster) - 1
    starts = np.flatnonzero(new_cluster)
    n_clusters = len(starts)
    centre = np.array([np.median(c) for c in np.split(el, starts[1:])])
    size = np.diff(np.append(starts, len(el)))
    cluster_sector = sec[starts]
    # 3. steps between neighbouring clusters of a sector (0: a ring split in two; more than
    # 1 (a ring missing here) counts as 1, the missing ring being numbered from other sectors)
    inner = cluster_sector[1:] == cluster_sector[:-1]
    gaps, mids = (centre[:-1] - centre[1:])[inner], (0.5 * (centre[:-1] + centre[1:]))[inner]
    grid, spacing = _local_spacing(mids, gaps)
    local_spacing = np.interp(centre, grid, spacing)
    between = np.interp(0.5 * (centre[:-1] + centre[1:]), grid, spacing)
    steps = np.minimum(np.rint((centre[:-1] - centre[1:]) / between), 1).astype(np.int64)
    # 4. tracks: mutual nearest clusters of consecutive (non-empty) sectors, round the circle
    sector_ids, first = np.unique(cluster_sector, return_index=True)
    bounds = np.append(first, n_clusters)
    links: list[tuple[float, int, int]] = []  # (distance in spacings, cluster, cluster)
    for i in range(len(sector_ids)):
        j = (i + 1) % len(sector_ids)
        if j == i:
            break
        a, b = np.arange(bounds[i], bounds[i + 1]), np.arange(bounds[j], bounds[j + 1])
        distance = np.abs(centre[a][:, None] - centre[b][None, :])
        to_b, to_a = np.argmin(distance, axis=1), np.argmin(distance, axis=0)
        mutual = to_a[to_b] == np.arange(len(a))
        relative = distance[np.arange(len(a)), to_b] / local_spacing[a]
        good = mutual & (relative < 0.25)
        links += zip(relative[good], a[good], b[to_b[good]])
    # Closest links first; two tracks that both hold a cluster in one sector are two rings
    # (or one ring split there) and stay apart, which keeps a single wrong link from fusing
    # two rings round the whole turn.
    parent = np.arange(n_clusters)
    sectors_of = {c: {int(cluster_sector[c])} for c in range(n_clusters)}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, x, y in sorted(links):
        rx, ry = root(int(x)), root(int(y))
        if rx == ry or not sectors_of[rx].isdisjoint(sectors_of[ry]):
            continue
        if len(sectors_of[rx]) < len(sectors_of[ry]):
            rx, ry = ry, rx
        parent[ry] = rx
        sectors_of[rx] |= sectors_of.pop(ry)
    track = np.unique([root(c) for c in range(n_clusters)], return_inverse=True)[1]
    n_tracks = int(track.max()) + 1
    # 5. votes of neighbouring clusters for the difference of their tracks' numbers
    upper, lower = np.flatnonzero(inner), np.flatnonzero(inner) + 1
    ta, tb, d = track[upper], track[lower], steps[upper]
    keep = ta != tb
    ta, tb, d = ta[keep], tb[keep], d[keep]
    flip = ta > tb  # one orientation per pair: number(tb) - number(ta) = d
    ta, tb, d = np.where(flip, tb, ta), np.where(flip, ta, tb), np.where(flip, -d, d)
    number = np.zeros(n_tracks, dtype=np.int64)
    if len(d):
        votes, vote_count = np.unique(np.stack([ta, tb, d], axis=1), axis=0, return_counts=True)
        pair_start = np.flatnonzero(np.concatenate([[True], np.any(votes[1:, :2] != votes[:-1, :2], axis=1)]))
        best = np.array([s + np.argmax(vote_count[s:e]) for s, e in zip(pair_start, np.append(pair_start[1:], len(votes)))])
        pa, pb, pd, pw = votes[best, 0], votes[best, 1], votes[best, 2], vote_count[best]
        # maximum spanning tree by votes (scipy's minimum tree on 1 / votes)
        graph = coo_matrix((1.0 / pw, (pa, pb)), shape=(n_tracks, n_tracks)).tocsr()
        tree = minimum_spanning_tree(graph)
        tree = (tree + tree.T).tocsr()
        difference = coo_matrix((pd.astype(np.float64), (pa, pb)), shape=(n_tracks, n_tracks)).tocsr()
        track_size = np.bincount(track, weights=size, minlength=n_tracks)
        n_parts, part = connected_components(tree, directed=False)
        placed = np.zeros(n_tracks, dtype=bool)
        for c in np.argsort(-np.bincount(part, weights=track_size)):
            members = np.flatnonzero(part == c)
            anchor = members[np.argmax(track_size[members])]
            visit, predecessor = breadth_first_order(tree, anchor, directed=False)
            for node in visit[1:]:
                up = predecessor[node]
                step = difference[up, node] if up < node else -difference[node, up]
                number[node] = number[up] + int(step)
            if placed.any():  # a part without votes to the rest: placed by elevation
                number[members] += _offset_by_elevation(members, number, placed, track, centre, cluster_sector)
            placed[members] = True
        number = _refine_numbers(number, pa, pb, pd, pw)
    index = number[track]
    # 6. renumber: an index with few points is a stray cluster, not a ring
    index = index - index.min()
    per_index = np.bincount(index, weights=size)
    real = np.flatnonzero(per_index >= 0.1 * np.median(per_index[per_index > 0]))
    if len(real) > 1:
        slot = np.clip(np.searchsorted(real, index), 1, len(real) - 1)
        index = np.where(np.abs(index - real[slot - 1]) <= np.abs(real[slot] - index), slot - 1, slot)
    else:
        index = np.zeros_like(index)
    per_point = np.empty(len(el), dtype=np.int64)
    per_point[order] = index[cluster]
    ring[usable] = per_point
    return RingEstimate(ring, height, sector_deg, float(split))


def _refine_numbers(number: np.ndarray, a: np.ndarray, b: np.ndarray, d: np.ndarray, votes: np.ndarray,
                    rounds: int = 10) -> np.ndarray:
    """Track numbers fitted to every pair's vote ``number[b] - number[a] = d`` (weighted by its
    votes) rather than to the spanning tree's alone: robust least squares (a pair that
    disagrees with the fit by r numbers weighs 1 / (1 + (2r)^2) less), from the tree's numbers,
    rounded. A group of tracks the tree hung off one wrong pair (the rings of a stretch between
    two jumps) moves back to where most of its pairs put it."""
    from scipy.sparse import coo_matrix, vstack
    from scipy.sparse.linalg import lsqr

    n = len(number)
    x = number.astype(np.float64)
    rows = np.arange(len(a))
    for _ in range(rounds):
        residual = (x[b] - x[a]) - d
        weight = np.sqrt(votes / (1.0 + (2.0 * residual) ** 2))
        system = vstack([coo_matrix((np.concatenate([weight, -weight]), (np.concatenate([rows, rows]), np.concatenate([b, a]))),
                                    shape=(len(a), n)),
                         coo_matrix((np.full(n, 1e-2), (np.arange(n), np.arange(n))), shape=(n, n))]).tocsr()
        target = np.concatenate([weight * d, 1e-2 * np.rint(x)])
        fitted = np.rint(lsqr(system, target, x0=x, atol=1e-8, btol=1e-8)[0])
        if np.array_equal(fitted, np.rint(x)):
            break
        x = fitted
    return np.rint(x).astype(np.int64)


def _offset_by_elevation(members: np.ndarray, number: np.ndarray, placed: np.ndarray, track: np.ndarray,
                         centre: np.ndarray, cluster_sector: np.ndarray) -> int:
    """Shift of a group of tracks numbered on their own onto the numbered ones: the median, over
    their clusters, of the number of the nearest placed cluster in elevation in the same sector
    minus their own (0 when they share no sector)."""
    mine = np.isin(track, members)
    shifts = []
    for j in np.flatnonzero(mine):
        others = np.flatnonzero((cluster_sector == cluster_sector[j]) & placed[track])
        if len(others):
            k = others[np.argmin(np.abs(centre[others] - centre[j]))]
            shifts.append(number[track[k]] - number[track[j]])
    return int(np.median(shifts)) if shifts else 0


def drop_rings(ring: np.ndarray, keep_every: int) -> np.ndarray:
    """Mask of the points on the rings kept: ``ring % keep_every == 0`` (unassigned points dropped)."""
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    return (ring >= 0) & (ring % keep_every == 0)


def fov_mask(points: np.ndarray, fov_deg: float | None) -> np.ndarray:
    """Mask of the points inside a forward field of view: ``|atan2(y, x)| < fov / 2`` (and
    ``x > 0`` for a field of view up to 180 deg); ``None`` or >= 360: every point."""
    xyz = np.asarray(points)
    if fov_deg is None or fov_deg >= 360:
        return np.ones(len(xyz), dtype=bool)
    inside = np.abs(np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))) < fov_deg / 2
    return inside & (xyz[:, 0] > 0) if fov_deg <= 180 else inside


# --------------------------------------------------------------------------- scores


def score(output: np.ndarray, full: np.ndarray, min_range: float, max_range: float) -> dict[str, float]:
    """Completeness, precision / recall / F at 10 cm and outliers of ``output`` against the
    ``full`` scan, inside ``min_range < |p| < max_range`` (see the module doc)."""
    output = np.asarray(output, dtype=np.float64)[:, :3]
    full = np.asarray(full, dtype=np.float64)[:, :3]
    output = output[np.isfinite(output).all(axis=1)]
    full = full[np.isfinite(full).all(axis=1)]
    full_band = full[in_range(full, min_range, max_range)]
    out_band = output[in_range(output, min_range, max_range)]
    row = {"points_in_band": int(len(out_band)), "full_points_in_band": int(len(full_band))}
    if len(full_band) == 0:
        raise ValueError(f"no full-scan point between {min_range} and {max_range} m")
    if len(output) == 0:
        return row | {"completeness": float("inf"), "precision": 0.0, "recall": 0.0, "fscore": 0.0, "outliers": 0}
    to_output = cKDTree(output).query(full_band, workers=1)[0]
    to_full = cKDTree(full).query(out_band, workers=1)[0] if len(out_band) else np.zeros(0)
    precision = float((to_full < F_THRESHOLD).mean()) if len(out_band) else 0.0
    recall = float((to_output < F_THRESHOLD).mean())
    fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return row | {"completeness": float(to_output.mean()), "precision": precision, "recall": recall,
                  "fscore": fscore, "outliers": int((to_full > OUTLIER_DISTANCE).sum())}


# --------------------------------------------------------------------------- the check


def read_scan(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """xyz [N, 3] of a point file and its ring field [N] when the file has one. Of the formats
    :mod:`lidar_completion.io` reads, only a raw ``.bin`` whose layout has a ``ring`` field
    (nuScenes ``.pcd.bin``) carries one; its PLY / PCD / NPY readers return xyz (+ intensity)
    only, so those scans get their rings from :func:`estimate_rings`."""
    from lidar_completion.io import bin_layout, read_bin, read_points

    xyz = read_points(path)
    if Path(path).suffix.lower() == ".bin":
        layout = bin_layout(path)
        if "ring" in layout.fields:
            return xyz, read_bin(path, layout)[:, layout.fields.index("ring")]
    return xyz, None


def rings_from_field(points: np.ndarray, field: np.ndarray) -> RingEstimate:
    """Rings of a ring field, renumbered from the top by median elevation (a sensor's laser
    ids need not follow elevation), so keeping every k-th keeps every k-th beam."""
    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    field = np.asarray(field)
    ring = np.full(len(xyz), -1, dtype=np.int64)
    usable = np.isfinite(xyz).all(axis=1) & np.isfinite(field) & (np.hypot(xyz[:, 0], xyz[:, 1]) > 1e-6)
    if usable.any():
        ids, inverse = np.unique(field[usable].astype(np.int64), return_inverse=True)
        elevation = _elevation_azimuth(xyz[usable], 0.0)[0]
        median = np.array([np.median(elevation[inverse == i]) for i in range(len(ids))])
        rank = np.empty(len(ids), dtype=np.int64)
        rank[np.argsort(-median, kind="stable")] = np.arange(len(ids))
        ring[usable] = rank[inverse]
    return RingEstimate(ring, 0.0, 0.0, 0.0, source="field")


def beam_drop(points: np.ndarray, completers: dict[str, "SceneCompleter"], rings: RingEstimate, keep_every: int,
              fov_deg: float | None = None) -> dict[str, dict[str, float]]:
    """Rows of one scan at one ``keep_every`` and field of view: the dropped scan, then each
    completer's output on it (``{row name: completer}``; scored in the first one's band)."""
    xyz = np.asarray(points, dtype=np.float32)[:, :3]
    view = fov_mask(xyz, fov_deg)
    full = xyz[view & (rings.ring >= 0)]
    dropped = xyz[view & drop_rings(rings.ring, keep_every)]
    first = next(iter(completers.values()))
    low, high = first.cut.min_range, first.max_range
    rows = {DROPPED_ROW: score(dropped, full, low, high) | {"points": len(dropped), "completed_points": 0}}
    for name, completer in completers.items():
        result = completer.complete(dropped)
        rows[name] = score(result.points, full, low, high) | {
            "points": len(result.points), "completed_points": result.completed_points,
            "time_s": result.timings_ms["total"] / 1000}
    return rows


def _fov_name(fov: float | None) -> str:
    return "whole" if fov is None or fov >= 360 else f"{fov:g}°"


def markdown_table(records: list[dict]) -> str:
    """One line per (file, field of view, k, row)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in records:
        lines.append(f"| {r['file']} | {_fov_name(r['fov_deg'])} | {r['keep_every']} | {r['row']} | "
                     f"{r['points_in_band']:,} | {r['completeness']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['fscore']:.3f} | {r['outliers']:,} |")
    return "\n".join(lines)


def plot_rings(points: np.ndarray, rings: RingEstimate, path: Path) -> Path:
    """Elevation (from the estimated beam origin) against azimuth, coloured by ring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    ok = rings.ring >= 0
    elevation, azimuth = _elevation_azimuth(xyz[ok], rings.origin_height)
    fig, ax = plt.subplots(figsize=(16, 7), layout="constrained")
    ax.scatter(azimuth, elevation, s=0.2, c=rings.ring[ok] % 10, cmap="tab10", vmin=0, vmax=10, rasterized=True)
    ax.set_xlabel("azimuth (deg)")
    ax.set_ylabel(f"elevation from {rings.origin_height:+.3f} m (deg)")
    ax.set_title(f"{path.stem}: {rings.rings} rings from {rings.source} (colour: ring mod 10)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _build_completers(checkpoint: str | None, device: str, seed: int, completion_only: bool) -> tuple[dict[str, "SceneCompleter"], Path]:
    """The pipeline as configured (``OUTPUT_ROW``) and, when asked and the config knows it, the
    same with ``data.completion_only`` (``COMPLETION_ONLY_ROW``)."""
    from lidar_completion.checkpoints import SHIPPED_MODELS
    from lidar_completion.completer import SceneCompleter
    from lidar_completion.config import load_config

    overrides: dict[str, Any] = {"data.preset": "model", "sampling.seed": seed, "device": device}
    output = SceneCompleter.from_checkpoint(SHIPPED_MODELS / "student_lite" if checkpoint is None else checkpoint,
                                            load_config(**overrides))
    model, path = output.model, output.checkpoint
    assert path is not None
    completers = {OUTPUT_ROW: output}
    if completion_only:
        try:
            config = load_config(**(overrides | {"data.completion_only": True}))
        except ValueError:  # a pipeline without the option: no such row
            print("lidar-evaluate beam-drop: this pipeline has no data.completion_only; that row is left out", file=sys.stderr)
        else:
            completers[COMPLETION_ONLY_ROW] = SceneCompleter(model, config)
    return completers, path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lidar-evaluate beam-drop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="real scans (.bin .pcd.bin .ply .pcd .npy), sensor frame")
    parser.add_argument("--keep-every", type=int, nargs="+", default=[2, 4], metavar="K",
                        help="keep one ring in K (default: 2 4)")
    parser.add_argument("--fov-deg", type=float, nargs="+", default=[360.0], metavar="DEG",
                        help="forward field(s) of view, each scored on its own rows; 360 = the whole scan (default)")
    parser.add_argument("--checkpoint", help="model path or shipped name (default: the shipped student_lite)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rings", choices=("auto", "elevation"), default="auto",
                        help="auto: the file's ring field when it has one, else elevation bands; elevation: always estimate")
    parser.add_argument("--sector-deg", type=float, default=2.0, help="azimuth sector of the ring estimate (deg)")
    parser.add_argument("--no-completion-only", action="store_true", help="leave out the completion-only row")
    parser.add_argument("--out", type=Path, default=Path("out/beam_drop"))
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.keep_every):
        parser.error("--keep-every: K must be >= 1")
    if any(f <= 0 for f in args.fov_deg):
        parser.error("--fov-deg: must be > 0")

    from lidar_completion.completer import ScanError
    from lidar_completion.io import PointFileError

    completers, checkpoint = _build_completers(args.checkpoint, args.device, args.seed, not args.no_completion_only)
    first = next(iter(completers.values()))
    args.out.mkdir(parents=True, exist_ok=True)
    records, ring_checks, failed = [], {}, 0
    for path in args.files:
        try:
            points, field = read_scan(path)
        except PointFileError as err:
            print(f"lidar-evaluate beam-drop: {err}, skipped", file=sys.stderr)
            failed += 1
            continue
        if field is not None and args.rings == "auto":
            rings = rings_from_field(points, field)
        else:
            rings = estimate_rings(points, sector_deg=args.sector_deg)
        per_ring = rings.points_per_ring()
        ring_checks[str(path)] = {"source": rings.source, "rings": rings.rings, "origin_height_m": rings.origin_height,
                                  "split_deg": rings.split_deg, "points_per_ring": per_ring.tolist()}
        picture = plot_rings(points, rings, args.out / f"rings_{path.stem}.png")
        print(f"{path}: {len(points):,} points, {rings.rings} rings from {rings.source}"
              + (f" (beam origin {rings.origin_height:+.3f} m)" if rings.source == "elevation" else "")
              + f", points per ring min {per_ring.min()} / median {np.median(per_ring):.0f} / max {per_ring.max()}; {picture}")
        for fov in args.fov_deg:
            for k in args.keep_every:
                try:
                    rows = beam_drop(points, completers, rings, k, fov)
                except (ScanError, ValueError) as err:
                    print(f"lidar-evaluate beam-drop: {path} ({_fov_name(fov)}, k={k}): {err}, skipped", file=sys.stderr)
                    failed += 1
                    continue
                for name, row in rows.items():
                    records.append({"file": path.name, "path": str(path), "fov_deg": None if fov >= 360 else fov,
                                    "keep_every": k, "row": name, **row})
    if not records:
        print("lidar-evaluate beam-drop: nothing scored", file=sys.stderr)
        return 2
    table = markdown_table(records)
    band = f"{first.cut.min_range:g}–{first.max_range:g} m"
    note = (f"Checkpoint {checkpoint}, seed {args.seed}; scored inside {band} (3-D range); "
            f"precision / recall / F at {F_THRESHOLD * 100:.0f} cm; last column: output points in the band more than "
            f"{OUTLIER_DISTANCE:g} m from every full-scan point.")
    (args.out / "beam_drop.md").write_text(table + "\n\n" + note + "\n")
    (args.out / "beam_drop.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint), "seed": args.seed, "min_range": first.cut.min_range,
         "max_range": first.max_range, "f_threshold_m": F_THRESHOLD, "outlier_distance_m": OUTLIER_DISTANCE,
         "rings": ring_checks, "rows": records}, indent=2))
    print(table)
    print(note)
    print(f"lidar-evaluate beam-drop: {len(records)} rows; beam_drop.md, beam_drop.json and ring plots in {args.out}")
    return 1 if failed else 0
