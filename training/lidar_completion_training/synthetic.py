"""Procedural street world and spinning multi-beam LiDAR that write SemanticKITTI sequences.

Why: every path real SemanticKITTI data takes (scans, labels, poses, calib, ground-truth
maps, dataset, metrics) runs in CI on a CPU, on data whose geometry is known exactly.

The world (z up, road surface z = 0, road along +x centred on y = 0) is a set of analytic
solids -- boxes, capped cylinders, ellipsoids -- plus the ground plane. Each solid is the
image of a unit shape under ``x = center + axes @ u`` (moving cars add ``velocity * t``).
An affine map keeps the ray parameter, so a ray hits a solid at the same ``t`` at which
the mapped ray hits the unit shape: one small kernel per shape serves every object.

The sensor fires one ray per (beam, azimuth step) from its origin, 1.73 m above the road
as on the KITTI car. Every ray is tested against the solids whose bounding box can
subtend it (a conservative azimuth/elevation window on the range image) and keeps its
nearest hit, so occlusion is exact. Range noise, random dropout and a maximum range
follow; scans are motion-compensated (no rolling shutter).

Files follow KITTI conventions, see :mod:`lidar_completion_training.kitti`: points in the
velodyne frame, ``poses.txt`` holds *camera* poses ``Tr @ T_v0_vi @ inv(Tr)`` so that
``inv(Tr) @ pose_i @ Tr`` is the velodyne pose of scan ``i`` in the velodyne frame of scan 0.
"""

from __future__ import annotations

import argparse
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import kitti

__all__ = [
    "CAR", "ROAD", "SIDEWALK", "BUILDING", "FENCE", "VEGETATION", "TRUNK", "TERRAIN", "POLE", "MOVING_CAR",
    "SEMANTIC_IDS", "BOX", "CYLINDER", "ELLIPSOID",
    "Lidar", "PRESETS", "Primitives", "SceneBuilder", "EgoPath", "Street", "Hits",
    "make_street", "raycast", "simulate_scan", "write_sequence", "main",
]

# SemanticKITTI class ids
CAR, ROAD, SIDEWALK, BUILDING, FENCE = 10, 40, 48, 50, 51
VEGETATION, TRUNK, TERRAIN, POLE, MOVING_CAR = 70, 71, 72, 80, 252
SEMANTIC_IDS = frozenset({CAR, ROAD, SIDEWALK, BUILDING, FENCE, VEGETATION, TRUNK, TERRAIN, POLE, MOVING_CAR})

# Rough reflectivity per class id for the remission channel (not a physical model).
_REFLECTIVITY = np.zeros(MOVING_CAR + 1)
_REFLECTIVITY[[CAR, ROAD, SIDEWALK, BUILDING, FENCE, VEGETATION, TRUNK, TERRAIN, POLE, MOVING_CAR]] = (
    0.45, 0.22, 0.32, 0.38, 0.30, 0.50, 0.35, 0.42, 0.55, 0.45)

BOX, CYLINDER, ELLIPSOID = 0, 1, 2
"""Unit shapes: [-1, 1]^3; x^2 + y^2 <= 1 with |z| <= 1; |u| <= 1."""

_EPS = 1e-9
_CHUNK = 1 << 19  # ray/solid pairs per vectorised batch (bounds peak memory)

# KITTI odometry sequence 00 calibration: pinhole cameras and velodyne -> cam0.
_KITTI_CALIB = {
    "P0": [718.856, 0, 607.1928, 0, 0, 718.856, 185.2157, 0, 0, 0, 1, 0],
    "P1": [718.856, 0, 607.1928, -386.1448, 0, 718.856, 185.2157, 0, 0, 0, 1, 0],
    "P2": [718.856, 0, 607.1928, 45.38225, 0, 718.856, 185.2157, -0.1130887, 0, 0, 1, 0.003779761],
    "P3": [718.856, 0, 607.1928, -337.2877, 0, 718.856, 185.2157, 2.369057, 0, 0, 1, 0.004915215],
    "Tr": [4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02,
           -7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02,
           9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01],
}


# --------------------------------------------------------------------------- sensor


@dataclass(frozen=True)
class Lidar:
    """A spinning multi-beam LiDAR: one ray per (beam elevation, azimuth step)."""

    elevations_deg: tuple[float, ...]
    azimuth_step_deg: float
    max_range: float = 80.0
    range_noise: float = 0.02  # 1-sigma, metres (HDL-64E spec: < 2 cm)
    dropout: float = 0.02  # probability that a return is lost
    height: float = 1.73  # above the road, as on the KITTI car

    @property
    def columns(self) -> int:
        return round(360.0 / self.azimuth_step_deg)

    @cached_property
    def elevations(self) -> np.ndarray:
        """Beam elevations in radians, ascending (the row order of the range image)."""
        return np.sort(np.deg2rad(np.asarray(self.elevations_deg, dtype=np.float64)))

    @cached_property
    def azimuths(self) -> np.ndarray:
        """Column azimuths in radians: column j looks at -pi + (j + 1/2) * step."""
        return -np.pi + (np.arange(self.columns) + 0.5) * (2 * np.pi / self.columns)

    @cached_property
    def directions(self) -> np.ndarray:
        """(beams * columns, 3) unit ray directions in the sensor frame, row-major."""
        el, az = np.meshgrid(self.elevations, self.azimuths, indexing="ij")
        return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)


def _hdl64_elevations() -> tuple[float, ...]:
    """HDL-64E: an upper block of 32 lasers at 1/3 deg spacing, a lower block at 1/2 deg."""
    return tuple(np.round(np.concatenate([np.linspace(2.0, -8.33, 32), np.linspace(-8.83, -24.8, 32)]), 4))


PRESETS: dict[str, Lidar] = {
    # ~2000 azimuth steps x 64 beams: about the 120k points of a KITTI scan.
    "hdl64": Lidar(_hdl64_elevations(), azimuth_step_deg=0.18),
    # Same field of view, 32 beams at 0.6 deg: ~17k points, for fast CPU tests.
    "lite": Lidar(tuple(np.round(np.linspace(2.0, -24.8, 32), 4)), azimuth_step_deg=0.6),
}


# --------------------------------------------------------------------------- world


@dataclass(frozen=True)
class Primitives:
    """Analytic solids: ``x = center + velocity * t + axes @ u`` for ``u`` in the unit shape ``kind``."""

    kind: np.ndarray  # (P,) int8
    center: np.ndarray  # (P, 3) at t = 0
    axes: np.ndarray  # (P, 3, 3) columns: the solid's half-extent vectors
    velocity: np.ndarray  # (P, 3) m/s
    semantic: np.ndarray  # (P,) uint16
    instance: np.ndarray  # (P,) uint16

    def __len__(self) -> int:
        return len(self.kind)


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


_WHEEL_AXIS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # unit-cylinder z -> y


class SceneBuilder:
    """Collects solids (sizes are full extents, yaw about z) into :class:`Primitives`."""

    def __init__(self) -> None:
        self._rows: list[tuple] = []

    def _add(self, kind: int, center, half, rotation: np.ndarray, semantic: int, instance: int, velocity) -> None:
        axes = rotation * np.asarray(half, dtype=np.float64)  # scale the columns
        self._rows.append((kind, np.asarray(center, float), axes, np.asarray(velocity, float), semantic, instance))

    def box(self, center, size, yaw: float = 0.0, *, semantic: int, instance: int = 0, velocity=(0, 0, 0)) -> None:
        self._add(BOX, center, np.asarray(size) / 2, _rot_z(yaw), semantic, instance, velocity)

    def cylinder(self, center, radius: float, height: float, *, semantic: int, instance: int = 0,
                 velocity=(0, 0, 0), rotation: np.ndarray | None = None) -> None:
        """Upright by default; ``rotation`` maps the cylinder's axis (local z) into the world."""
        rotation = np.eye(3) if rotation is None else rotation
        self._add(CYLINDER, center, (radius, radius, height / 2), rotation, semantic, instance, velocity)

    def ellipsoid(self, center, radii, yaw: float = 0.0, *, semantic: int, instance: int = 0,
                  velocity=(0, 0, 0)) -> None:
        self._add(ELLIPSOID, center, radii, _rot_z(yaw), semantic, instance, velocity)

    def car(self, x: float, y: float, yaw: float, rng: np.random.Generator, *, semantic: int, instance: int,
            velocity=(0, 0, 0)) -> None:
        """Body and cabin boxes on four wheels."""
        length, width = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9)
        rotation, base = _rot_z(yaw), np.array([x, y, 0.0])
        place = lambda local: base + rotation @ np.asarray(local)  # noqa: E731
        kw = dict(semantic=semantic, instance=instance, velocity=velocity)
        self.box(place([0, 0, 0.25 + 0.4]), (length, width, 0.8), yaw, **kw)
        cabin = rng.uniform(0.4, 0.6)
        self.box(place([-0.05 * length, 0, 1.05 + cabin / 2]), (0.55 * length, width - 0.16, cabin), yaw, **kw)
        for sx in (-1, 1):
            for sy in (-1, 1):
                centre = place([sx * (length / 2 - 0.8), sy * (width / 2 - 0.08), 0.31])
                self.cylinder(centre, 0.31, 0.22, rotation=rotation @ _WHEEL_AXIS, **kw)

    def build(self) -> Primitives:
        kind, center, axes, velocity, semantic, instance = zip(*self._rows, strict=True)
        return Primitives(np.array(kind, np.int8), np.array(center), np.array(axes), np.array(velocity),
                          np.array(semantic, np.uint16), np.array(instance, np.uint16))


@dataclass(frozen=True)
class EgoPath:
    """The ego car drives along +x in its lane with a gentle sway (so poses rotate, too)."""

    x0: float
    speed: float  # m/s
    lane_y: float = -1.75
    sway: float = 0.4  # metres
    sway_period: float = 7.0  # seconds
    height: float = 1.73

    def pose(self, t: float) -> np.ndarray:
        """4x4 sensor-to-world transform at time ``t``."""
        w = 2 * np.pi / self.sway_period
        y = self.lane_y + self.sway * np.sin(w * t)
        yaw = np.arctan2(self.sway * w * np.cos(w * t), self.speed)
        pitch, roll = 0.004 * np.sin(1.3 * t), 0.003 * np.sin(0.7 * t)  # suspension
        cp, sp, cr, sr = np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
        ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
        rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
        pose = np.eye(4)
        pose[:3, :3] = _rot_z(yaw) @ ry @ rx
        pose[:3, 3] = (self.x0 + self.speed * t, y, self.height)
        return pose


@dataclass(frozen=True)
class Street:
    """A straight street: solids, the road half-width (ground hits inside it are road) and the ego path."""

    primitives: Primitives
    road_half_width: float
    ego: EgoPath


def _side(b: SceneBuilder, rng: np.random.Generator, side: int, length: float, half_width: float) -> None:
    """Curb, sidewalk, buildings with gaps and setbacks, fences, trees, poles, bushes, mounds."""
    curb = rng.uniform(0.12, 0.18)
    walk = rng.uniform(2.0, 4.0)
    for x in np.arange(0.0, length, 20.0):  # sidewalk tiles: tight bounding boxes for the ray culling
        b.box((x + 10, side * (half_width + walk / 2), (curb - 0.3) / 2), (20, walk, curb + 0.3), semantic=SIDEWALK)
    outer = half_width + walk
    x = rng.uniform(-10, 0)
    while x < length:
        if rng.random() < 0.3:  # gap: open terrain, maybe a fence, bushes, a mound
            gap = rng.uniform(4, 14)
            if rng.random() < 0.6:
                y, height = side * (outer + rng.uniform(0.3, 1.5)), rng.uniform(1.0, 1.8)
                b.box((x + gap / 2, y, height / 2), (gap - 0.5, 0.06, height), semantic=FENCE)
            for _ in range(rng.integers(0, 3)):
                r = rng.uniform(0.5, 1.3)
                b.ellipsoid((x + rng.uniform(0, gap), side * (outer + rng.uniform(2, 6)), 0.2),
                            (r, r * rng.uniform(0.7, 1.2), r * 0.8), rng.uniform(0, np.pi), semantic=VEGETATION)
            if rng.random() < 0.5:
                b.ellipsoid((x + gap / 2, side * (outer + rng.uniform(3, 8)), 0.0),
                            (rng.uniform(2, 5), rng.uniform(1, 2.5), rng.uniform(0.3, 0.8)), semantic=TERRAIN)
            x += gap
        else:  # building
            size = np.array([rng.uniform(10, 35), rng.uniform(8, 20), rng.uniform(6, 22)])
            setback = rng.choice([rng.uniform(0.3, 1.0), rng.uniform(2, 8)])
            b.box((x + size[0] / 2, side * (outer + setback + size[1] / 2), size[2] / 2), size, semantic=BUILDING)
            x += size[0] + rng.uniform(0.0, 1.5)
    for x in np.arange(rng.uniform(0, 10), length, 1.0):
        if rng.random() < 0.08:  # street tree on the sidewalk
            trunk = rng.uniform(2.5, 4.0)
            radii = np.array([rng.uniform(1.5, 2.8), rng.uniform(1.5, 2.8), rng.uniform(1.3, 2.3)])
            y = side * (half_width + 0.7)
            b.cylinder((x, y, trunk / 2), rng.uniform(0.1, 0.2), trunk, semantic=TRUNK)
            b.ellipsoid((x, y, trunk + 0.7 * radii[2]), radii, rng.uniform(0, np.pi), semantic=VEGETATION)
        elif rng.random() < 0.04:  # street light or sign post
            height = rng.choice([rng.uniform(6, 8.5), rng.uniform(2.5, 3.2)])
            b.cylinder((x, side * (half_width + 0.35), height / 2), rng.uniform(0.06, 0.12), height, semantic=POLE)


def make_street(rng: np.random.Generator, scans: int, lidar: Lidar, frame_period: float = 0.1) -> Street:
    """A random street long enough for ``scans`` frames plus the sensor's range at both ends."""
    speed = rng.uniform(7.0, 12.0)
    x0 = lidar.max_range + 20.0
    length = 2 * x0 + speed * frame_period * scans
    half_width = rng.uniform(5.5, 7.5)
    b = SceneBuilder()
    for side in (-1, 1):
        _side(b, rng, side, length, half_width)
    instance = 1
    for side in (-1, 1):  # parked cars along both curbs
        x = rng.uniform(0, 5)
        while x < length:
            if rng.random() < 0.6:
                yaw = rng.choice([0.0, np.pi]) + rng.uniform(-0.05, 0.05)
                b.car(x, side * (half_width - 1.1 - rng.uniform(0, 0.2)), yaw, rng, semantic=CAR, instance=instance)
                instance += 1
            x += rng.uniform(5.5, 8.0)
    for _ in range(rng.integers(3, 7)):  # oncoming traffic
        v = rng.uniform(8, 14)
        b.car(rng.uniform(0, length), 1.75, np.pi, rng, semantic=MOVING_CAR, instance=instance, velocity=(-v, 0, 0))
        instance += 1
    for _ in range(rng.integers(0, 3)):  # faster cars ahead in the ego lane, pulling away
        v = speed + rng.uniform(2, 5)
        b.car(x0 + rng.uniform(12, 40), -1.75, 0.0, rng, semantic=MOVING_CAR, instance=instance, velocity=(v, 0, 0))
        instance += 1
    return Street(b.build(), half_width, EgoPath(x0=x0, speed=speed, height=lidar.height))


# --------------------------------------------------------------------------- ray casting


def _box(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Slab test against [-1, 1]^3."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1, t2 = (-1.0 - o) * inv, (1.0 - o) * inv
    near, far = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
    return np.where((near <= far) & (near > _EPS), near, np.inf)


def _ellipsoid(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Nearest intersection with the unit sphere."""
    a, b, c = (d * d).sum(1), (o * d).sum(1), (o * o).sum(1) - 1.0
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _cylinder(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Nearest intersection with the capped unit cylinder (mantle or the cap facing the ray)."""
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
    disc = b * b - a * (o[:, 0] ** 2 + o[:, 1] ** 2 - 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        tc = (-np.sign(d[:, 2]) - o[:, 2]) / d[:, 2]
    side = (disc >= 0) & (a > 0) & (ts > _EPS) & (np.abs(o[:, 2] + ts * d[:, 2]) <= 1.0)
    xy = o[:, :2] + tc[:, None] * d[:, :2]
    cap = (tc > _EPS) & ((xy**2).sum(1) <= 1.0)
    return np.minimum(np.where(side, ts, np.inf), np.where(cap, tc, np.inf))


_KERNELS = {BOX: _box, CYLINDER: _cylinder, ELLIPSOID: _ellipsoid}
_CORNERS = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1], indexing="ij")).reshape(3, -1).T.astype(np.float64)


def _candidate_pairs(lo: np.ndarray, hi: np.ndarray, lidar: Lidar) -> tuple[np.ndarray, np.ndarray]:
    """(solid, ray) pairs whose ray can hit the solid's sensor-frame bounding box [lo, hi].

    Each box subtends an azimuth interval and an elevation interval (bounded conservatively
    from its nearest and farthest horizontal distance), i.e. a rectangle of the range image.
    """
    n_cols, step = lidar.columns, 2 * np.pi / lidar.columns
    dx = np.maximum(np.maximum(lo[:, 0], -hi[:, 0]), 0.0)
    dy = np.maximum(np.maximum(lo[:, 1], -hi[:, 1]), 0.0)
    rho_min = np.hypot(dx, dy)
    rho_max = np.hypot(np.maximum(np.abs(lo[:, 0]), np.abs(hi[:, 0])), np.maximum(np.abs(lo[:, 1]), np.abs(hi[:, 1])))
    with np.errstate(divide="ignore", invalid="ignore"):
        el_hi = np.arctan2(hi[:, 2], np.where(hi[:, 2] > 0, rho_min, rho_max))
        el_lo = np.arctan2(lo[:, 2], np.where(lo[:, 2] < 0, rho_min, rho_max))
    row0 = np.searchsorted(lidar.elevations, el_lo, "left")
    row1 = np.searchsorted(lidar.elevations, el_hi, "right")
    xs = np.stack([lo[:, 0], hi[:, 0], hi[:, 0], lo[:, 0]], 1)
    ys = np.stack([lo[:, 1], lo[:, 1], hi[:, 1], hi[:, 1]], 1)
    mid = np.arctan2(lo[:, 1] + hi[:, 1], lo[:, 0] + hi[:, 0])
    rel = np.angle(np.exp(1j * (np.arctan2(ys, xs) - mid[:, None])))  # wrapped to (-pi, pi]
    col0 = np.ceil((mid + rel.min(1) + np.pi) / step - 0.5).astype(np.int64)
    col1 = np.floor((mid + rel.max(1) + np.pi) / step - 0.5).astype(np.int64) + 1
    around = rho_min == 0.0  # the sensor stands inside the box's footprint: every azimuth
    col0, col1 = np.where(around, 0, col0), np.where(around, n_cols, col1)
    n_c = np.clip(col1 - col0, 0, n_cols)
    n_r = np.clip(row1 - row0, 0, None)
    counts = np.where(rho_min <= lidar.max_range, n_c * n_r, 0)
    solid = np.repeat(np.arange(len(lo)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    row = row0[solid] + k // n_c[solid]
    col = (col0[solid] + k % n_c[solid]) % n_cols
    return solid, row * n_cols + col


@dataclass(frozen=True)
class Hits:
    """Noise-free nearest hit per ray: range (inf = no return), semantic id, instance id."""

    range: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray


def raycast(street: Street, pose: np.ndarray, lidar: Lidar, time: float, *, cull: bool = True) -> Hits:
    """Cast every ray of ``lidar`` from sensor pose ``pose`` (4x4 sensor-to-world) at ``time``.

    ``cull=False`` tests every ray against every solid (slow; a reference for the tests).
    """
    dirs, n_rays = lidar.directions, len(lidar.directions)
    rot, origin = pose[:3, :3], pose[:3, 3]
    p = street.primitives
    center = (p.center + p.velocity * time - origin) @ rot  # sensor frame
    axes = rot.T @ p.axes
    inv = np.linalg.inv(axes)  # sensor frame -> unit shape
    o_local = -np.einsum("pij,pj->pi", inv, center)
    if cull:
        corners = center[:, None, :] + np.einsum("pij,cj->pci", axes, _CORNERS)
        solid, ray = _candidate_pairs(corners.min(1), corners.max(1), lidar)
    else:
        solid, ray = np.repeat(np.arange(len(p)), n_rays), np.tile(np.arange(n_rays), len(p))

    best = np.full(n_rays, np.inf)
    found = []  # (ray, t, solid) of every hit within range, chunk by chunk
    for start in range(0, max(len(solid), 1), _CHUNK):  # at least one (maybe empty) chunk
        s, r = solid[start:start + _CHUNK], ray[start:start + _CHUNK]
        d_local = np.einsum("nij,nj->ni", inv[s], dirs[r])
        t = np.full(len(s), np.inf)
        for kind, kernel in _KERNELS.items():
            mask = p.kind[s] == kind
            t[mask] = kernel(o_local[s[mask]], d_local[mask])
        hit = t <= lidar.max_range
        np.minimum.at(best, r[hit], t[hit])
        found.append((r[hit], t[hit], s[hit]))
    hit_ray, hit_t, hit_solid = (np.concatenate(column) for column in zip(*found, strict=True))
    winner = np.full(n_rays, -1)
    nearest = hit_t == best[hit_ray]
    winner[hit_ray[nearest]] = hit_solid[nearest]

    semantic = np.where(winner >= 0, p.semantic[winner], 0).astype(np.uint16)
    instance = np.where(winner >= 0, p.instance[winner], 0).astype(np.uint16)

    # Ground plane z = 0: road inside the road's half-width, terrain outside.
    down = dirs @ rot[2]  # world z-component of each ray
    with np.errstate(divide="ignore"):
        t_ground = np.where(down < 0, -origin[2] / down, np.inf)
    ground = (t_ground < best) & (t_ground <= lidar.max_range)
    y_world = origin[1] + t_ground * (dirs @ rot[1])
    semantic[ground] = np.where(np.abs(y_world[ground]) <= street.road_half_width, ROAD, TERRAIN)
    instance[ground] = 0
    best[ground] = t_ground[ground]
    best[best > lidar.max_range] = np.inf
    return Hits(best, semantic, instance)


def simulate_scan(street: Street, lidar: Lidar, time: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scan at ``time``: (N, 4) float32 x, y, z, remission in the sensor frame and (N,) uint32 labels."""
    hits = raycast(street, street.ego.pose(time), lidar, time)
    n = len(hits.range)
    noisy = hits.range + rng.normal(0.0, lidar.range_noise, n)
    keep = np.isfinite(hits.range) & (rng.random(n) >= lidar.dropout) & (noisy > 0)
    remission = np.clip(_REFLECTIVITY[hits.semantic] + rng.normal(0.0, 0.05, n), 0.0, 1.0)
    xyz = lidar.directions[keep] * noisy[keep, None]
    points = np.column_stack([xyz, remission[keep]]).astype(np.float32)
    labels = hits.semantic[keep].astype(np.uint32) | (hits.instance[keep].astype(np.uint32) << 16)
    return points, labels


def write_sequence(
    directory: str | Path,
    *,
    scans: int,
    lidar: Lidar,
    seed: int,
    sequence: int = 0,
    frame_period: float = 0.1,
    on_scan: Callable[[], object] | None = None,
) -> Street:
    """Write one SemanticKITTI sequence directory; deterministic in ``(seed, sequence)``."""
    if scans < 1:
        raise ValueError(f"scans must be at least 1, got {scans}")
    directory = Path(directory)
    (directory / "velodyne").mkdir(parents=True, exist_ok=True)
    (directory / "labels").mkdir(exist_ok=True)
    street = make_street(np.random.default_rng([seed, sequence, 0]), scans, lidar, frame_period)
    times = np.arange(scans) * frame_period
    sensor_poses = np.stack([street.ego.pose(t) for t in times])  # sensor -> simulation world
    tr = np.vstack([np.reshape(_KITTI_CALIB["Tr"], (3, 4)), [0, 0, 0, 1]])
    velo_poses = np.linalg.inv(sensor_poses[0]) @ sensor_poses  # -> velodyne frame of scan 0
    kitti.write_poses(directory / "poses.txt", tr @ velo_poses @ np.linalg.inv(tr))
    kitti.write_calib(directory / "calib.txt", {k: np.reshape(v, (3, 4)) for k, v in _KITTI_CALIB.items()})
    kitti.write_times(directory / "times.txt", times)
    for i, t in enumerate(times):
        points, labels = simulate_scan(street, lidar, t, np.random.default_rng([seed, sequence, 1, i]))
        kitti.write_scan(directory / "velodyne" / f"{i:06d}.bin", points)
        kitti.write_labels(directory / "labels" / f"{i:06d}.label", labels)
        if on_scan is not None:
            on_scan()
    return street


def main(argv: Sequence[str] | None = None) -> int:
    """``lidar-synth``: write synthetic sequences 00, 01, ... under ``OUT/sequences``."""
    parser = argparse.ArgumentParser(prog="lidar-synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset root (gets sequences/NN/...)")
    parser.add_argument("--sequences", type=int, default=1, help="number of sequences")
    parser.add_argument("--scans", type=int, default=100, help="scans per sequence (10 Hz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="hdl64", help="sensor model")
    args = parser.parse_args(argv)
    if args.sequences < 1 or args.scans < 1:
        parser.error("--sequences and --scans must be at least 1")
    from tqdm import tqdm

    start = _time.perf_counter()
    with tqdm(total=args.sequences * args.scans, unit="scan", desc="lidar-synth") as bar:
        for k in range(args.sequences):
            write_sequence(args.out / "sequences" / f"{k:02d}", scans=args.scans, lidar=PRESETS[args.preset],
                           seed=args.seed, sequence=k, on_scan=bar.update)
    print(f"wrote {args.sequences} x {args.scans} scans to {args.out / 'sequences'} "
          f"in {_time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
