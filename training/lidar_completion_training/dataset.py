"""(partial scan, ground-truth scene) pairs from a SemanticKITTI-layout root, as in LiDiff.

Why: the teacher, the student and every evaluation must see the same pairs, built the
same way from real SemanticKITTI or from the synthetic generator.

For scan ``i`` of a sequence, both clouds are in the scan's velodyne frame:

* **partial**: the scan's static points (labelled, not moving) inside the scan cut
  (:class:`lidar_completion.config.ScanCut`; published: 3.5 m < r < 50 m and z > -4 m),
  farthest-point sampled to its ``n_part`` (points repeated when there are fewer);
* **full**: the points of the sequence map (:mod:`.maps`) within the cut's ``max_range`` of
  the sensor, above its ``min_z``, kept only in the 10 m x/y cells the partial scan occupies,
  randomly sampled to ``n_full`` = ``n_part * repeat``.

Training may first cut both clouds to a random field-of-view sector (``fov_crop``), and
scales the point counts to the scan's surface (``surface_cells``) so a cropped scan reaches
the model at a whole scan's density. Augmentation then moves both clouds together: a random z-rotation, a mirror (p 0.5),
a scale in [0.95, 1.05], then per-point jitter (sigma 0.06 m, clipped at 0.18 m).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lidar_completion.config import PUBLISHED_CUT, ScanCut
from lidar_completion.points import (density_matched_count, farthest_point_sample, in_range, pack_cells,
                                     surface_cells, voxel_keys)

from .kitti import KittiSequence, static_mask
from .maps import load_map

__all__ = ["PairConfig", "CompletionDataset", "augment_pair", "crop_sector", "random_sample", "mean_surface_cells"]


@dataclass(frozen=True)
class PairConfig:
    """How a (partial, full) pair is made: the core scan cut (ranges, height floor, ``n_part``,
    ``repeat``; the exported model records the same one) and the training-only settings.
    Defaults are the published LiDiff ones."""

    cut: ScanCut = PUBLISHED_CUT
    cell: float = 10.0  # ground truth is kept in the x/y cells of this size that the scan touches
    jitter: float = 0.06
    jitter_clip: float = 0.18
    scale: tuple[float, float] = (0.95, 1.05)
    fov_crop: float = 0.0  # probability of a random field-of-view sector crop (training only)
    fov_deg: tuple[float, float] = (60.0, 270.0)  # sector widths drawn from
    # Occupied 0.5 m voxels of a whole scan: the scan reaches the model at n_part points per
    # this much surface (a crop gets fewer points, its ground truth proportionally fewer);
    # None: always n_part.
    surface_cells: int | None = None

    @property
    def n_part(self) -> int:
        return self.cut.n_part

    @property
    def n_full(self) -> int:
        """Ground-truth points of a whole scan: ``n_part * repeat`` (:meth:`ScanCut.for_training`)."""
        return self.cut.n_part * self.cut.repeat


def _repeat_to(points: np.ndarray, n: int) -> np.ndarray:
    return np.resize(points, (n, points.shape[1]))


def random_sample(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct random points; all of them, repeated, when there are fewer."""
    if len(points) <= n:
        return _repeat_to(points[rng.permutation(len(points))], n)
    return points[rng.choice(len(points), n, replace=False)]


def crop_sector(partial: np.ndarray, full: np.ndarray, center: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Both clouds cut to the azimuth sector ``center +- width / 2`` (radians) seen from the
    sensor: a camera-field-of-view scan and the scene in that field of view only."""
    def inside(points: np.ndarray) -> np.ndarray:
        offset = np.angle(np.exp(1j * (np.arctan2(points[:, 1], points[:, 0]) - center)))
        return np.abs(offset) <= width / 2
    return partial[inside(partial)], full[inside(full)]


def augment_pair(
    partial: np.ndarray, full: np.ndarray, rng: np.random.Generator, config: PairConfig = PairConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about z, mirror, scale (one transform for both clouds), then jitter each point."""
    angle = rng.uniform(0.0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    mirror = np.diag([1.0, -1.0 if rng.random() < 0.5 else 1.0, 1.0])
    matrix = rng.uniform(*config.scale) * np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ mirror

    def move(points: np.ndarray) -> np.ndarray:
        jitter = np.clip(rng.normal(0.0, config.jitter, points.shape), -config.jitter_clip, config.jitter_clip)
        return (points @ matrix.T + jitter).astype(np.float32)

    return move(partial), move(full)


class _CellIndex:
    """Map points sorted by x/y cell, so a radius query reads only the cells near the sensor."""

    def __init__(self, points: np.ndarray, cell: float) -> None:
        keys = voxel_keys(points, cell, axes=2)
        order = np.argsort(keys, kind="stable")
        self.points, self.cell = points[order], cell
        self.keys, self.starts = np.unique(keys[order], return_index=True)
        self.ends = np.append(self.starts[1:], len(points))

    def within(self, center: np.ndarray, radius: float) -> np.ndarray:
        lo = np.floor((center[:2] - radius) / self.cell).astype(np.int64)
        hi = np.floor((center[:2] + radius) / self.cell).astype(np.int64)
        gx, gy = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        wanted = pack_cells(np.stack([gx.ravel(), gy.ravel()], axis=1))
        pos = np.clip(np.searchsorted(self.keys, wanted), 0, len(self.keys) - 1)
        pos = pos[self.keys[pos] == wanted]
        counts = self.ends[pos] - self.starts[pos]
        index = np.repeat(self.starts[pos] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        points = self.points[index]
        return points[np.linalg.norm(points - center, axis=1) < radius]


class CompletionDataset(Dataset):
    """Items ``{'partial': (n_part, 3), 'full': (n_full, 3), 'sequence': str, 'scan_index': int}``.

    Maps must exist (``lidar-build-maps``). Sampling is seeded by ``(seed, epoch, index)``:
    call :meth:`set_epoch` each epoch for fresh augmentation; evaluation (``augment=False``)
    is reproducible.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        sequences: Sequence[str],
        config: PairConfig = PairConfig(),
        *,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.config, self.augment, self.seed, self.epoch = config, augment, seed, 0
        self.sequences = [KittiSequence(root, name) for name in sequences]
        self._offsets = np.cumsum([0] + [len(s) for s in self.sequences])
        self._maps: dict[str, _CellIndex] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def locate(self, index: int) -> tuple[KittiSequence, int]:
        """(sequence, scan index) of dataset item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} scans")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.sequences[k], index - int(self._offsets[k])

    def _map(self, sequence: KittiSequence) -> _CellIndex:
        if sequence.name not in self._maps:
            self._maps[sequence.name] = _CellIndex(load_map(sequence).astype(np.float64), self.config.cell)
        return self._maps[sequence.name]

    def _above_floor(self, points: np.ndarray) -> np.ndarray:
        """Mask of the points above the cut's height floor (all of them when it has none)."""
        floor = self.config.cut.min_z
        return np.ones(len(points), bool) if floor is None else points[:, 2] > floor

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """All points of the partial scan and of its ground truth, before sampling and augmentation."""
        sequence, i = self.locate(index)
        cut, cell = self.config.cut, self.config.cell
        scan = sequence.scan(i)
        partial = scan[static_mask(sequence.labels(i, len(scan))), :3]
        partial = partial[in_range(partial, cut.min_range, cut.max_range) & self._above_floor(partial)]
        if len(partial) == 0:
            raise ValueError(f"{sequence.scan_paths[i]}: no static point within {cut.min_range}-{cut.max_range} m")
        pose = sequence.poses[i]
        full = (self._map(sequence).within(pose[:3, 3], cut.max_range) - pose[:3, 3]) @ pose[:3, :3]
        full = full[self._above_floor(full)]
        full = full[np.isin(voxel_keys(full, cell, axes=2), voxel_keys(partial, cell, axes=2))]
        if len(full) == 0:
            raise ValueError(f"{sequence.path}: the map has no point near scan {i}; was it built from these poses?")
        return partial.astype(np.float32), full.astype(np.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        partial, full = self.pair(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        c = self.config
        if self.augment and c.fov_crop and rng.random() < c.fov_crop:
            width = np.deg2rad(rng.uniform(*c.fov_deg))
            cropped = crop_sector(partial, full, rng.uniform(-np.pi, np.pi), width)
            if len(cropped[0]) >= 16 and len(cropped[1]):  # else (an empty sector): the whole scan
                partial, full = cropped
        n_part = density_matched_count(partial, c.n_part, c.surface_cells)
        partial = farthest_point_sample(partial, n_part, start=rng)  # from a random row
        full = random_sample(full, c.n_full * n_part // c.n_part, rng)
        if self.augment:
            partial, full = augment_pair(partial, full, rng, self.config)
        sequence, i = self.locate(index)
        return {"partial": partial, "full": full, "sequence": sequence.name, "scan_index": i}


def mean_surface_cells(dataset: "CompletionDataset", scans: int = 50) -> int:
    """Mean occupied 0.5 m voxels of up to ``scans`` whole scans of ``dataset`` (their range
    band): the surface the model's ``n_part`` points cover, recorded with the model."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(scans, len(dataset))).round().astype(int))
    return int(round(np.mean([surface_cells(dataset.pair(int(i))[0]) for i in picks])))
