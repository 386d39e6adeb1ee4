"""Point-cloud utilities every layer shares: KITTI ``.bin`` files, farthest-point sampling,
packed voxel keys and range filters. NumPy only (no torch), written once here and used by
the point files (:mod:`.io`), the bag converter (:mod:`.bags`), the completer, and the
training package's KITTI reader, dataset, maps and metrics.

(The sparse convolutions pack ``(batch, x, y, z)`` torch rows into their own sortable keys,
:func:`lidar_completion.sparse.pack`: another layout, on the device, with a batch field.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["KEY_BITS", "read_kitti_bin", "write_kitti_bin", "farthest_point_sample", "pack_cells", "voxel_keys",
           "in_range", "seen_through", "SURFACE_CELL", "surface_cells", "density_matched_count", "near_measured", "supported"]

# --- KITTI .bin ------------------------------------------------------------------------


def read_kitti_bin(path: str | os.PathLike) -> np.ndarray:
    """(N, 4) float32 x, y, z, remission of a KITTI ``.bin`` scan (little-endian float32).

    ``FileNotFoundError`` when there is no such file, ``ValueError`` naming the file when
    its size is not a whole number of 16-byte points."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    if size % 16:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of 16 (x, y, z, remission float32)")
    return np.fromfile(path, dtype="<f4").reshape(-1, 4).astype(np.float32, copy=False)


def write_kitti_bin(path: str | os.PathLike, points: np.ndarray) -> Path:
    """Write (N, 4) x, y, z, remission, or (N, 3) x, y, z with remission 0, as a KITTI ``.bin``."""
    path = Path(path)
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] not in (3, 4):
        raise ValueError(f"{path}: expected (N, 3) or (N, 4) points, got {points.shape}")
    if points.shape[1] == 3:
        points = np.hstack([points, np.zeros((len(points), 1))])
    np.ascontiguousarray(points, dtype="<f4").tofile(path)
    return path


# --- sampling --------------------------------------------------------------------------


def farthest_point_sample(points: np.ndarray, count: int, start: int | np.random.Generator = 0) -> np.ndarray:
    """``count`` points by farthest-point sampling (fpsample's KD-tree "QuickFPS"), starting
    at row ``start``, or at a row drawn from ``start`` when it is a random generator (the
    training data's augmentation); repeats points when there are fewer than ``count``."""
    import fpsample

    n = len(points)
    if isinstance(start, np.random.Generator):
        start = int(start.integers(n))
    if n <= count:
        return points[np.resize(np.arange(n), count)]  # every point once, then wrap around
    height = 3 if n < 20_000 else 7 if n < 200_000 else 9  # bucket height per fpsample's guide
    index = fpsample.bucket_fps_kdline_sampling(points, count, h=height, start_idx=start)
    return points[np.sort(index.astype(np.int64))]


# --- packed voxel keys -----------------------------------------------------------------

KEY_BITS = 21  # per axis: +-2^20 cells, i.e. +-104 km at 0.1 m voxels


def pack_cells(cells: np.ndarray) -> np.ndarray:
    """One int64 per row of integer cell indices (N, D <= 3), ``KEY_BITS`` per axis, the first
    axis most significant: equal cells get equal keys and sorting keys sorts the cells
    lexicographically. The last axis is ``key & (2**KEY_BITS - 1)`` (shift it away with
    ``key >> KEY_BITS`` to key the remaining axes). ``ValueError`` when a cell does not fit."""
    cells = np.asarray(cells, dtype=np.int64)
    half = 1 << (KEY_BITS - 1)
    if not 1 <= cells.shape[1] <= 3:
        raise ValueError(f"can pack 1 to 3 axes, got {cells.shape[1]}")
    if cells.size and (cells.min() < -half or cells.max() >= half):
        raise ValueError(f"cell indices outside [-{half}, {half}): cannot pack them into {KEY_BITS} bits per axis")
    keys = np.zeros(len(cells), dtype=np.int64)
    for axis in range(cells.shape[1]):
        keys = (keys << KEY_BITS) | (cells[:, axis] + half)
    return keys


def voxel_keys(points: np.ndarray, voxel: float, axes: int = 3) -> np.ndarray:
    """One int64 per point naming the ``voxel``-sized cell (``floor(p / voxel)``) of its first
    ``axes`` coordinates (3: x, y, z; 2: the x/y column)."""
    cells = np.floor(np.asarray(points)[:, :axes] / voxel).astype(np.int64)
    try:
        return pack_cells(cells)
    except ValueError:
        raise ValueError(f"points span more than +-{(1 << (KEY_BITS - 1)) * voxel:.0f} m; "
                         f"cannot key voxels of {voxel} m") from None


# --- range filters ---------------------------------------------------------------------


def in_range(points: np.ndarray, min_range: float = float("-inf"), max_range: float = float("inf")) -> np.ndarray:
    """Mask of the points with ``min_range < |p| < max_range`` (metres, from the origin; norm
    in float64, so garbage values neither overflow nor pass; NaN rows are outside)."""
    r = np.linalg.norm(np.asarray(points)[:, :3].astype(np.float64), axis=1)
    return (r > min_range) & (r < max_range)


# --- the density the model was trained at -----------------------------------------------

# Cell size (m) of the surface measure below: coarse enough that a sensor's own ring and
# azimuth spacing does not change the count, fine enough that a cropped field of view or a
# scan of a few tall structures covers proportionally fewer cells.
SURFACE_CELL = 0.5


def surface_cells(points: np.ndarray, cell: float = SURFACE_CELL) -> int:
    """How much surface a scan shows: its occupied ``cell``-sized voxels."""
    return 0 if len(points) == 0 else len(np.unique(voxel_keys(points, cell)))


def density_matched_count(points: np.ndarray, n_part: int, reference_cells: int | None, minimum: int = 16) -> int:
    """Scan points to give the model so that they are as dense as in training.

    A model trained on ``n_part`` points spread over ``reference_cells`` occupied voxels of a
    whole scan sees a cropped field of view (or only the upper rings) at several times that
    density when it gets ``n_part`` points again: the convolutions sum more neighbours per
    voxel, activations grow level by level (x25 in the encoder, x10^6 in the denoiser on a
    90-degree crop of the real scan) and the sample runs away. Scaling the count by the
    scan's own surface keeps the trained density; never more than ``n_part`` (the latency
    budget), never fewer than ``minimum``. ``reference_cells`` None: ``n_part`` as given.
    """
    if reference_cells is None:
        return n_part
    scaled = round(n_part * surface_cells(points) / reference_cells)
    return int(min(n_part, max(minimum, scaled)))


# KD-tree queries of the composition stage run on two threads (the node's CPU budget).
QUERY_WORKERS = 2


def near_measured(points: np.ndarray, scan: np.ndarray, distance: float) -> np.ndarray:
    """Mask of ``points`` within ``distance`` (m) of a point of ``scan``: what the scan already
    shows there, so a completed point adds nothing. scipy's KD-tree (built on the scan points
    that can be that close, one vectorised query)."""
    from scipy.spatial import cKDTree

    if len(points) == 0 or len(scan) == 0 or distance <= 0:
        return np.zeros(len(points), dtype=bool)
    reach = np.linalg.norm(points, axis=1).max() + distance
    scan = scan[np.einsum("ij,ij->i", scan, scan) < reach * reach]
    if len(scan) == 0:
        return np.zeros(len(points), dtype=bool)
    tree = cKDTree(scan, balanced_tree=False, compact_nodes=False)
    nearest, _ = tree.query(points, k=1, distance_upper_bound=distance, workers=QUERY_WORKERS)
    return np.isfinite(nearest)


def supported(points: np.ndarray, radius: float, neighbours: int) -> np.ndarray:
    """Mask of the points with at least ``neighbours`` other points of the same cloud within
    ``radius``: a completed point its own completion backs up, not a stray one (the lite
    model scatters a few points into cells the scene does not have). scipy's KD-tree."""
    from scipy.spatial import cKDTree

    if neighbours <= 0 or len(points) == 0:
        return np.ones(len(points), dtype=bool)
    if len(points) <= neighbours:
        return np.zeros(len(points), dtype=bool)
    tree = cKDTree(points, balanced_tree=False, compact_nodes=False)
    # The (neighbours + 1)-th nearest (the point itself is the first) within the radius: a
    # bounded k-NN query, not a count of every point in the ball (dense clouds: many).
    distance, _ = tree.query(points, k=[neighbours + 1], distance_upper_bound=radius, workers=QUERY_WORKERS)
    return np.isfinite(distance[:, 0])


# --- free space ------------------------------------------------------------------------

# Direction bins of the free-space test: about one HDL-64 beam spacing. A bin no return fell
# in (between the beams of a sparser sensor, or the sky) never removes a point.
FREE_SPACE_BIN_DEG = 0.5


def _direction_bins(points: np.ndarray, bin_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """Range of each point from the origin and one int64 key per (azimuth, elevation) bin."""
    p = np.asarray(points, dtype=np.float64)[:, :3]
    r = np.linalg.norm(p, axis=1)
    azimuth = np.arctan2(p[:, 1], p[:, 0])
    elevation = np.arcsin(np.clip(p[:, 2] / np.maximum(r, 1e-9), -1.0, 1.0))
    cells = np.stack([np.floor(azimuth / bin_rad), np.floor(elevation / bin_rad)], axis=1)
    return r, pack_cells(cells)


def seen_through(points: np.ndarray, scan: np.ndarray, margin: float, bin_deg: float = FREE_SPACE_BIN_DEG) -> np.ndarray:
    """Mask of ``points`` lying in space the sensor saw through: more than ``margin`` metres in
    front of the nearest return of ``scan`` in their direction bin (both clouds in the sensor
    frame, origin at the sensor). A LiDAR ray that returned at range R crossed empty space up
    to R, so a completed point there is wrong; points behind a return (in its shadow) or in a
    direction without returns are kept. Hand-written: the libraries' ray casting (open3d)
    needs a mesh, and a range image of the scan itself is all this test needs."""
    if len(points) == 0 or len(scan) == 0:
        return np.zeros(len(points), dtype=bool)
    bin_rad = np.deg2rad(bin_deg)
    scan_range, scan_bins = _direction_bins(scan, bin_rad)
    order = np.argsort(scan_bins, kind="stable")
    bins, first = np.unique(scan_bins[order], return_index=True)
    nearest = np.minimum.reduceat(scan_range[order], first)
    point_range, point_bins = _direction_bins(points, bin_rad)
    slot = np.minimum(np.searchsorted(bins, point_bins), len(bins) - 1)
    return (bins[slot] == point_bins) & (point_range < nearest[slot] - margin)
