"""Procedural street worlds and spinning multi-beam LiDARs that write SemanticKITTI sequences.

Why: every path real SemanticKITTI data takes (scans, labels, poses, calib, ground-truth
maps, dataset, metrics) runs in CI on a CPU, on data whose geometry is known exactly; and a
model trained on it should meet real streets: other sensors, curbs, slopes, bends, trees.

Two worlds (z up), both deterministic in ``(seed, sequence)``:

* ``urban`` (the default): a road whose centreline bends (:class:`Centreline`), a height
  field ground (:class:`Terrain`: longitudinal/lateral grade, long undulations, low bumps,
  a cambered road, sidewalks raised by a curb, parking bays, sometimes a cross street or a
  T junction), building facades with recesses, doors, balconies, alleys and varied
  setbacks, trees, bushes, hedges, street lights, signs, fences, parked cars, vans, trucks
  and bicycles, standing people, and moving cars, vans, trucks, buses, cyclists and
  pedestrians following the road. The sensor (one of :data:`PRESETS`) sits on a car that
  drives a lane of that road, pitched and rolled by the ground, with a per-sequence
  mounting height, pitch and roll jitter; range noise grows with range and far, dark
  returns drop out more often.
* ``classic``: the straight street on the plane z = 0 the shipped models were trained on,
  reproduced bit for bit (``make_street``, ``EgoPath``; a test pins it).

Solids are analytic -- boxes, capped cylinders, ellipsoids -- each the image of a unit
shape under ``x = center + axes @ u`` (moving solids add ``velocity * t``, and may only
exist in a time window, so that road users follow a bending road piecewise). An affine
map keeps the ray parameter, so a ray hits a solid at the same ``t`` at which the mapped
ray hits the unit shape: one small kernel per shape serves every object.

The sensor fires one ray per (beam, azimuth step) from its origin. Every ray is tested
against the solids whose bounding box can subtend it (a conservative azimuth/elevation
window on the range image) and keeps its nearest hit, so occlusion is exact. The classic
ground is the plane z = 0, intersected analytically; the urban height field is intersected
by marching each ray inside the interval where a quadratic bound on the terrain says the
ray can meet it, then bisection and a final secant step (vectorised over all rays). Range
noise, dropout and a maximum range follow; scans are motion-compensated (no rolling shutter).

Files follow KITTI conventions, see :mod:`lidar_completion_training.kitti`: points in the
velodyne frame, ``poses.txt`` holds *camera* poses ``Tr @ T_v0_vi @ inv(Tr)`` so that
``inv(Tr) @ pose_i @ Tr`` is the velodyne pose of scan ``i`` in the velodyne frame of scan 0.
``synthetic.json`` beside them records the world, the sensor and its mounting.
"""

from __future__ import annotations

import argparse
import json
import math
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import kitti

__all__ = [
    "CAR", "BICYCLE", "TRUCK", "OTHER_VEHICLE", "PERSON", "BICYCLIST", "ROAD", "PARKING", "SIDEWALK", "BUILDING",
    "FENCE", "VEGETATION", "TRUNK", "TERRAIN", "POLE", "TRAFFIC_SIGN", "MOVING_CAR", "MOVING_BICYCLIST",
    "MOVING_PERSON", "MOVING_TRUCK", "MOVING_OTHER_VEHICLE",
    "SEMANTIC_IDS", "CLASSIC_IDS", "THING_IDS", "MOVING_IDS", "BOX", "CYLINDER", "ELLIPSOID",
    "Lidar", "PRESETS", "MIXED", "WORLDS", "Primitives", "SceneBuilder", "EgoPath", "Street", "Hits",
    "Centreline", "Terrain", "RoadPath",
    "make_street", "make_urban", "make_world", "raycast", "simulate_scan", "write_sequence",
    "sequence_presets", "preset_name", "main",
]

# SemanticKITTI class ids (semantic-kitti.yaml)
CAR, BICYCLE, TRUCK, OTHER_VEHICLE, PERSON, BICYCLIST = 10, 11, 18, 20, 30, 31
ROAD, PARKING, SIDEWALK, BUILDING, FENCE = 40, 44, 48, 50, 51
VEGETATION, TRUNK, TERRAIN, POLE, TRAFFIC_SIGN = 70, 71, 72, 80, 81
MOVING_CAR, MOVING_BICYCLIST, MOVING_PERSON, MOVING_TRUCK, MOVING_OTHER_VEHICLE = 252, 253, 254, 258, 259
CLASSIC_IDS = frozenset({CAR, ROAD, SIDEWALK, BUILDING, FENCE, VEGETATION, TRUNK, TERRAIN, POLE, MOVING_CAR})
"""The classes of the classic world."""
MOVING_IDS = frozenset({MOVING_CAR, MOVING_BICYCLIST, MOVING_PERSON, MOVING_TRUCK, MOVING_OTHER_VEHICLE})
"""Moving variants (ids >= 252): ``kitti.static_mask`` keeps them out of ground-truth maps."""
THING_IDS = frozenset({CAR, BICYCLE, TRUCK, OTHER_VEHICLE, PERSON, BICYCLIST}) | MOVING_IDS
"""Classes whose points carry instance ids (SemanticKITTI's vehicle and human categories)."""
SEMANTIC_IDS = CLASSIC_IDS | THING_IDS | frozenset({PARKING, TRAFFIC_SIGN})

# Rough reflectivity per class id for the remission channel (not a physical model).
_REFLECTIVITY = np.zeros(max(SEMANTIC_IDS) + 1)
_REFLECTIVITY[[CAR, ROAD, SIDEWALK, BUILDING, FENCE, VEGETATION, TRUNK, TERRAIN, POLE, MOVING_CAR]] = (
    0.45, 0.22, 0.32, 0.38, 0.30, 0.50, 0.35, 0.42, 0.55, 0.45)
_REFLECTIVITY[[BICYCLE, TRUCK, OTHER_VEHICLE, PERSON, BICYCLIST, PARKING, TRAFFIC_SIGN]] = (
    0.40, 0.48, 0.48, 0.30, 0.32, 0.24, 0.90)
_REFLECTIVITY[[MOVING_BICYCLIST, MOVING_PERSON, MOVING_TRUCK, MOVING_OTHER_VEHICLE]] = (0.32, 0.30, 0.48, 0.48)

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


def _even(top: float, bottom: float, beams: int) -> tuple[float, ...]:
    return tuple(np.round(np.linspace(top, bottom, beams), 4))


PRESETS: dict[str, Lidar] = {
    # ~2000 azimuth steps x 64 beams: about the 120k points of a KITTI scan (Velodyne HDL-64E, 1.73 m).
    "hdl64": Lidar(_hdl64_elevations(), azimuth_step_deg=0.18),
    # Velodyne HDL-32E as on the nuScenes car: +10.67..-30.67 deg, 1084 columns (20 Hz), 1.84 m, ~70 m.
    "hdl32": Lidar(_even(10.67, -30.67, 32), azimuth_step_deg=360 / 1084, max_range=70.0, dropout=0.05, height=1.84),
    # Velodyne VLP-16 (Puck): 16 beams every 2 deg over +-15 deg, 0.2 deg at 10 Hz, 3 cm, 100 m.
    "vlp16": Lidar(_even(15.0, -15.0, 16), azimuth_step_deg=0.2, max_range=100.0, range_noise=0.03, height=1.80),
    # Ouster OS1-128: 128 beams over +-22.5 deg, 1024 columns at 10 Hz, 3 cm.
    "os128": Lidar(_even(22.5, -22.5, 128), azimuth_step_deg=360 / 1024, max_range=100.0, range_noise=0.03,
                   height=1.85),
    # HDL-64E field of view, 32 beams at 0.6 deg: ~17k points, for fast CPU tests.
    "lite": Lidar(_even(2.0, -24.8, 32), azimuth_step_deg=0.6),
}
MIXED = ("hdl64", "hdl32", "vlp16", "os128")
"""``--preset mixed``: sequence ``k`` uses ``MIXED[k % 4]``."""
WORLDS = ("urban", "classic")


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
    window: np.ndarray | None = None  # (P, 2): the solid exists for window[0] <= t < window[1]; None: always

    def __len__(self) -> int:
        return len(self.kind)

    def at(self, time: float) -> Primitives:
        """The solids that exist at ``time``."""
        if self.window is None:
            return self
        live = (self.window[:, 0] <= time) & (time < self.window[:, 1])
        return Primitives(self.kind[live], self.center[live], self.axes[live], self.velocity[live],
                          self.semantic[live], self.instance[live], self.window[live])


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


_WHEEL_AXIS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # unit-cylinder z -> y


class SceneBuilder:
    """Collects solids (sizes are full extents, yaw about z) into :class:`Primitives`."""

    def __init__(self) -> None:
        self._rows: list[tuple] = []
        self._windows: list[tuple[float, float]] = []

    def _add(self, kind: int, center, half, rotation: np.ndarray, semantic: int, instance: int, velocity) -> None:
        axes = rotation * np.asarray(half, dtype=np.float64)  # scale the columns
        self.solid(kind, center, axes, semantic=semantic, instance=instance, velocity=velocity)

    def solid(self, kind: int, center, axes, *, semantic: int, instance: int = 0, velocity=(0, 0, 0),
              window: tuple[float, float] = (-np.inf, np.inf)) -> None:
        """Any solid: ``axes`` columns are its half-extent vectors; it exists for ``window[0] <= t < window[1]``."""
        self._rows.append((kind, np.asarray(center, float), np.asarray(axes, float), np.asarray(velocity, float),
                           semantic, instance))
        self._windows.append(window)

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
        window = np.array(self._windows, dtype=np.float64)
        return Primitives(np.array(kind, np.int8), np.array(center), np.array(axes), np.array(velocity),
                          np.array(semantic, np.uint16), np.array(instance, np.uint16),
                          window if np.isfinite(window).any() else None)


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
    """A world: solids, the road half-width, the ego path and the ground.

    ``ground=None`` is the classic plane z = 0 (road within ``road_half_width`` of y = 0,
    terrain outside); otherwise a :class:`Terrain` height field.
    """

    primitives: Primitives
    road_half_width: float
    ego: EgoPath | RoadPath
    ground: Terrain | None = None
    world: str = "classic"


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


# --------------------------------------------------------------------------- urban world


@dataclass(frozen=True)
class Centreline:
    """The main road's centreline ``y = c(x) = sum_j amp_j sin(freq_j x + phase_j)``: along +x, bending."""

    amp: tuple[float, ...]
    freq: tuple[float, ...]
    phase: tuple[float, ...]

    def eval(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """c, c' and c'' at ``x``."""
        x = np.asarray(x, dtype=np.float64)
        c, dc, ddc = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
        for a, f, ph in zip(self.amp, self.freq, self.phase, strict=True):
            arg = f * x + ph
            sin, cos = np.sin(arg), np.cos(arg)
            c += a * sin
            dc += (a * f) * cos
            ddc -= (a * f * f) * sin
        return c, dc, ddc

    def frame(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, 2) points on the centreline, unit tangents (towards +x) and unit normals (to the left)."""
        x = np.asarray(x, dtype=np.float64)
        c, dc, _ = self.eval(x)
        norm = np.sqrt(1.0 + dc * dc)
        return np.stack([x, c], -1), np.stack([1 / norm, dc / norm], -1), np.stack([-dc / norm, 1 / norm], -1)

    def lateral(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance from the centreline (positive to the left) and the x of the foot point.

        One Newton step from ``x`` towards the foot of the perpendicular, then the distance
        to the tangent there: exact to well under a centimetre within ~20 m of the road.
        """
        c, dc, ddc = self.eval(x)
        e = c - y
        slope2 = 1.0 + dc * dc
        foot = x - e * dc / np.maximum(slope2 + e * ddc, 0.5 * slope2)
        cf, dcf, _ = self.eval(foot)
        return ((y - cf) - (x - foot) * dcf) / np.sqrt(1.0 + dcf * dcf), foot

    def curvature(self, x: np.ndarray) -> np.ndarray:
        _, dc, ddc = self.eval(x)
        return np.abs(ddc) / (1.0 + dc * dc) ** 1.5


_BAY_STEP = 0.5  # metres of x per entry of Terrain.bays
_TABLE_STEP = 0.25  # metres of x per entry of the tabulated centreline (linear interpolation: < 1 mm off)
_COARSE_STEP = 2.0  # horizontal metres between samples of the smooth ground (first pass of the ground march)
_MARCH_STEP = 0.5  # then the full ground is sampled every _MARCH_STEP horizontal metres...
_MARCH_RISE = 0.08  # ...or every _MARCH_RISE metres of height relative to the ground, whichever is coarser,
_MARCH_SAMPLES = 40  # at most this many samples per ray
_SECANT_TOLERANCE = 0.005  # metres along the ray: a secant step that lands this close to the ground is the hit
_BISECTIONS = 5  # otherwise (curb faces) bisect, then a last secant step


@dataclass(frozen=True)
class Terrain:
    """The urban ground: a smooth height field with a cambered road, curbs, sidewalks and parking bays.

    Height: ``grade . (x, y) + sum(waves) + sum(bumps) - camber * min(|d|, half_width)``,
    plus ``curb`` off the road (sidewalks, and the terrain beyond them), where ``d`` is the
    signed distance from the :class:`Centreline`. Labels: road within ``half_width``,
    parking in the bays (at road level, cut into the sidewalk band), sidewalk up to
    ``half_width + band[side]``, terrain beyond. An optional straight cross street (its own
    road and sidewalks, on both sides of the main road or one: a T junction) joins at road level.
    """

    road: Centreline
    half_width: float
    band: tuple[float, float]  # sidewalk band width beyond the road edge (bays included), right (d < 0), left
    curb: float
    camber: float  # road crown: height lost per metre from the centreline
    grade: tuple[float, float]  # dz/dx, dz/dy of the plane
    waves: np.ndarray  # (W, 4) amplitude, kx, ky, phase: long undulations (bounded through their curvature)
    bumps: np.ndarray  # (B, 4) the same for low bumps (bounded by their amplitude)
    bay_x0: float
    bays: np.ndarray  # (2, N): parking-bay width at x = bay_x0 + i * _BAY_STEP, right and left
    cross: tuple[float, ...] | None = None  # px, py, ux, uy, half_width, walk, sides (0: both, +-1: that side of u)

    # -- height field

    def smooth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        z = self.grade[0] * x + self.grade[1] * y
        for a, kx, ky, ph in self.waves:
            z = z + a * np.sin(kx * x + ky * y + ph)
        return z

    def smooth_gradient(self, x: float, y: float) -> tuple[float, float]:
        gx, gy = self.grade
        for a, kx, ky, ph in self.waves:
            cos = np.cos(kx * x + ky * y + ph)
            gx, gy = gx + a * kx * cos, gy + a * ky * cos
        return float(gx), float(gy)

    @cached_property
    def _bounds(self) -> tuple[float, float, float]:
        """(Hessian norm bound of the smooth part, height above it at most, below it at most)."""
        hessian = float(np.sum(np.abs(self.waves[:, 0]) * (self.waves[:, 1] ** 2 + self.waves[:, 2] ** 2)))
        bumps = float(np.abs(self.bumps[:, 0]).sum())
        return hessian, bumps + self.curb, bumps + self.camber * self.half_width

    @cached_property
    def _table(self) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The centreline tabulated over the world (and 200 m beyond) for fast lookups."""
        x0 = self.bay_x0 - 200.0
        x = x0 + _TABLE_STEP * np.arange(int((self.bays.shape[1] * _BAY_STEP + 400.0) / _TABLE_STEP) + 2)
        c, dc, ddc = self.road.eval(x)
        return x0, c, np.diff(c, append=c[-1]), dc, np.diff(dc, append=dc[-1]), ddc, np.diff(ddc, append=ddc[-1])

    def _centre(self, x: np.ndarray, second: bool = True):
        x0, c, dc_, dc, ddc_, ddc, dddc_ = self._table
        u = np.clip((x - x0) * (1 / _TABLE_STEP), 0.0, len(c) - 1.0)
        i = u.astype(np.int64)
        f = u - i
        out = c[i] + f * dc_[i], dc[i] + f * ddc_[i]
        return (*out, ddc[i] + f * dddc_[i]) if second else out

    def lateral(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`Centreline.lateral` on the tabulated centreline."""
        c, dc, ddc = self._centre(x)
        e = c - y
        slope2 = 1.0 + dc * dc
        foot = x - e * dc / np.maximum(slope2 + e * ddc, 0.5 * slope2)
        cf, dcf = self._centre(foot, second=False)
        return ((y - cf) - (x - foot) * dcf) / np.sqrt(1.0 + dcf * dcf), foot

    def _bay(self, foot: np.ndarray, left: np.ndarray) -> np.ndarray:
        index = np.clip(((foot - self.bay_x0) * (1 / _BAY_STEP)).astype(np.int64), 0, self.bays.shape[1] - 1)
        return self.bays[left.astype(np.int64), index]

    def _cross(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """|distance| from the cross street's axis, and whether the point is on the street's side(s)."""
        assert self.cross is not None, "only called for worlds with a cross street"
        px, py, ux, uy, _, _, sides = self.cross
        rx, ry = x - px, y - py
        return np.abs(ux * ry - uy * rx), (sides == 0) | ((ux * rx + uy * ry) * sides > 0)

    def _layout(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per point: distance from the centreline, |d|, road level (no curb) and the bay width."""
        d, foot = self.lateral(x, y)
        ad = np.abs(d)
        bay = self._bay(foot, d > 0)
        level = ad <= self.half_width + bay
        if self.cross is not None:
            across, on_side = self._cross(x, y)
            level |= on_side & (across <= self.cross[4])
        return d, ad, level, bay

    def height(self, x: np.ndarray, y: np.ndarray, bumps: bool = True) -> np.ndarray:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        _, ad, level, _ = self._layout(x, y)
        z = self.smooth(x, y) - self.camber * np.minimum(ad, self.half_width) + np.where(level, 0.0, self.curb)
        if bumps:
            for a, kx, ky, ph in self.bumps:
                z = z + a * np.sin(kx * x + ky * y + ph)
        return z

    def classify(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """SemanticKITTI id of the ground at each point."""
        d, ad, level, bay = self._layout(x, y)
        band = np.where(d > 0, self.band[1], self.band[0])
        semantic = np.where(ad <= self.half_width + band, SIDEWALK, TERRAIN).astype(np.uint16)
        if self.cross is not None:
            across, on_side = self._cross(x, y)
            semantic[on_side & (across <= self.cross[4] + self.cross[5])] = SIDEWALK
        semantic[level] = np.where(ad[level] <= self.half_width, ROAD, PARKING)
        if self.cross is not None:
            semantic[level & on_side & (across <= self.cross[4])] = ROAD
        return semantic

    def clearance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance outside the cross street and its sidewalks (negative inside; inf without one)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if self.cross is None:
            return np.full(x.shape, np.inf)
        across, on_side = self._cross(x, y)
        return np.where(on_side, across - self.cross[4] - self.cross[5], np.inf)

    # -- ray casting

    def intersect(self, origin: np.ndarray, directions: np.ndarray, t_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First hit ``t`` (inf: none up to ``t_max``) and label of rays ``origin + t * directions`` (world frame).

        1. Along a ray the smooth part of the ground lies within ``s0 + g t -+ K t^2 / 2``
           (Taylor at the origin, K bounds its curvature); widened by the bumps, camber and
           curb, that gives the interval where the ray can meet the ground.
        2. That interval is sampled every ``_COARSE_STEP`` horizontal metres against the
           smooth part alone (cheap): the ground can only be met from the last sample where
           the ray is surely above the band of bumps, camber and curb to the first where it
           is surely below it.
        3. There the full height is sampled every ``_MARCH_STEP`` horizontal metres or
           ``_MARCH_RISE`` of height change, whichever is coarser: the first sample below
           ground brackets the hit; a secant step finishes smooth ground, bisection then a
           secant step what is left (curb faces).

        A ray that dips under a bump's crest and out again between two samples of step 3
        misses it (grazing rays only).
        """
        n = len(directions)
        t_hit, semantic = np.full(n, np.inf), np.zeros(n, np.uint16)
        hessian, above, below = self._bounds
        ox, oy, oz = (float(v) for v in origin)
        s0 = float(self.smooth(np.array(ox), np.array(oy)))
        gx, gy = self.smooth_gradient(ox, oy)
        dx, dy, dz = directions.T
        horizontal = np.hypot(dx, dy)
        rise = gx * dx + gy * dy - dz  # d/dt of (linearised ground - ray height)
        k = hessian * horizontal * horizontal
        c_hi, c_lo = oz - s0 - above, oz - s0 + below
        with np.errstate(divide="ignore", invalid="ignore"):
            if c_hi > 0:
                den = rise + np.sqrt(rise * rise + 2 * k * c_hi)
                t_start = np.where(den > 0, 2 * c_hi / den, np.inf)
            else:
                t_start = np.zeros(n)
            disc = rise * rise - 2 * k * c_lo
            t_end = np.where((disc >= 0) & (rise > 0), 2 * c_lo / (rise + np.sqrt(np.maximum(disc, 0))), np.inf)
        t_end = np.minimum(t_end, t_max)
        rays = np.flatnonzero(t_start < t_end)

        def ray_z(t: np.ndarray, ray: np.ndarray) -> np.ndarray:
            return oz + t * dz[ray]

        def gap(t: np.ndarray, ray: np.ndarray) -> np.ndarray:  # ray height above the ground
            return ray_z(t, ray) - self.height(ox + t * dx[ray], oy + t * dy[ray])

        # 2. coarse pass on the smooth part
        span = (t_end[rays] - t_start[rays]) * horizontal[rays]  # horizontal metres
        t, owner, offset = _samples(t_start[rays], t_end[rays], span / _COARSE_STEP, 64)
        ray = rays[owner]
        smooth_gap = ray_z(t, ray) - self.smooth(ox + t * dx[ray], oy + t * dy[ray])
        steps = np.diff(np.r_[offset, len(t)]) - 1
        slack = (hessian / 8 * (span / steps) ** 2)[owner]  # the smooth part between samples vs its chord
        entered = _first(smooth_gap <= above + slack, owner, len(rays))
        sunk = _first(smooth_gap < -below - slack, owner, len(rays))
        keep = entered >= 0
        lo = t[np.maximum(entered[keep] - 1, offset[keep])]  # the last sample surely above (or the first)
        hi = t[np.where(sunk[keep] >= 0, sunk[keep], offset[keep] + steps[keep])]
        rays = rays[keep]
        # 3. fine march on the full height
        fine = np.minimum((hi - lo) * horizontal[rays] / _MARCH_STEP, (hi - lo) * np.abs(rise[rays]) / _MARCH_RISE)
        t, owner, offset = _samples(lo, hi, fine, _MARCH_SAMPLES)
        f = gap(t, rays[owner])
        first = _first(f <= 0, owner, len(rays))
        hit = first >= 0
        at, rays = first[hit], rays[hit]
        start = at == offset[hit]
        t_hit[rays[start]] = t[at[start]]
        at, rays = at[~start], rays[~start]
        lo, hi, f_lo, f_hi = t[at - 1], t[at], f[at - 1], f[at]
        mid = lo + (hi - lo) * (f_lo / np.maximum(f_lo - f_hi, 1e-12))
        f_mid = gap(mid, rays)
        done = np.abs(f_mid) * (hi - lo) < _SECANT_TOLERANCE * np.maximum(f_lo - f_hi, 1e-12)  # ~ error in t
        t_hit[rays[done]] = mid[done]
        rest = ~done
        rays, lo, hi, f_lo, f_hi, mid, f_mid = (v[rest] for v in (rays, lo, hi, f_lo, f_hi, mid, f_mid))
        for _ in range(_BISECTIONS):
            down = f_mid <= 0
            hi, f_hi = np.where(down, mid, hi), np.where(down, f_mid, f_hi)
            lo, f_lo = np.where(down, lo, mid), np.where(down, f_lo, f_mid)
            mid = 0.5 * (lo + hi)
            f_mid = gap(mid, rays)
        down = f_mid <= 0
        hi, f_hi = np.where(down, mid, hi), np.where(down, f_mid, f_hi)
        lo, f_lo = np.where(down, lo, mid), np.where(down, f_lo, f_mid)
        t_hit[rays] = lo + (hi - lo) * (f_lo / np.maximum(f_lo - f_hi, 1e-12))
        found = np.flatnonzero(np.isfinite(t_hit))
        semantic[found] = self.classify(ox + t_hit[found] * dx[found], oy + t_hit[found] * dy[found])
        return t_hit, semantic


def _samples(t0: np.ndarray, t1: np.ndarray, steps: np.ndarray, most: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ceil(steps)`` (1 .. most) even steps from t0 to t1 per ray, flat: (t, owner, offset of each ray's first)."""
    steps = np.clip(np.ceil(steps), 1, most).astype(np.int64)
    counts = steps + 1
    offset = np.cumsum(counts) - counts
    owner = np.repeat(np.arange(len(t0)), counts)
    index = np.arange(counts.sum()) - offset[owner]
    return t0[owner] + (t1 - t0)[owner] * (index / steps[owner]), owner, offset


def _first(condition: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Per owner 0..n-1 (contiguous, ascending), the flat position of its first True sample, -1 if none."""
    result = np.full(n, -1, np.int64)
    where = np.flatnonzero(condition)
    if len(where):
        first = where[np.r_[True, owner[where][1:] != owner[where][:-1]]]
        result[owner[first]] = first
    return result


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _ground_frame(terrain: Terrain, xy: np.ndarray, heading: float, half_length: float,
                  half_width: float) -> tuple[float, np.ndarray]:
    """Ground height under a vehicle's centre and its rotation (yaw, then pitch and roll from its four contacts)."""
    c, s = np.cos(heading), np.sin(heading)
    fwd, left = np.array([c, s]) * half_length, np.array([-s, c]) * half_width
    contacts = xy + np.array([fwd + left, fwd - left, -fwd + left, -fwd - left])
    z = terrain.height(contacts[:, 0], contacts[:, 1], bumps=False)
    pitch = -np.arctan((z[0] + z[1] - z[2] - z[3]) / (4 * half_length))
    roll = np.arctan((z[0] + z[2] - z[1] - z[3]) / (4 * half_width))
    return float(z.mean()), _rot_z(heading) @ _rot_y(pitch) @ _rot_x(roll)


@dataclass(frozen=True)
class RoadPath:
    """The ego car drives a lane of the bending road at constant speed, tilted by the ground.

    Arclength ``s0 + speed * t`` along the centreline, lateral offset ``lane`` (negative:
    right of it) plus a gentle sway; the car pitches and rolls with the ground under its
    wheels (plus a little suspension motion), and the sensor is mounted ``height`` above
    the road, pitched and rolled by ``mount_pitch`` and ``mount_roll`` (radians) on the car.
    """

    terrain: Terrain
    s0: float
    speed: float
    lane: float
    height: float
    mount_pitch: float = 0.0
    mount_roll: float = 0.0
    sway: float = 0.3
    sway_period: float = 7.0
    x_range: tuple[float, float] = (-100.0, 1000.0)

    @cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.arange(self.x_range[0], self.x_range[1] + 0.25, 0.25)
        ds = np.sqrt(1.0 + self.terrain.road.eval(x)[1] ** 2)
        return x, np.concatenate([[0.0], np.cumsum(0.5 * (ds[1:] + ds[:-1]) * 0.25)])

    def x_at(self, s: np.ndarray) -> np.ndarray:
        """x of the centreline point at arclength ``s`` (measured from ``x_range[0]``)."""
        x, arc = self._table
        return np.interp(s, arc, x)

    def s_at(self, x: np.ndarray) -> np.ndarray:
        xs, arc = self._table
        return np.interp(x, xs, arc)

    def pose(self, t: float) -> np.ndarray:
        """4x4 sensor-to-world transform at time ``t``."""
        w = 2 * np.pi / self.sway_period
        x = self.x_at(np.array([self.s0 + self.speed * t]))
        point, tangent, normal = (v[0] for v in self.terrain.road.frame(x))
        xy = point + (self.lane + self.sway * np.sin(w * t)) * normal
        heading = np.arctan2(tangent[1], tangent[0]) + np.arctan2(self.sway * w * np.cos(w * t), self.speed)
        z, vehicle = _ground_frame(self.terrain, xy, heading, 1.35, 0.8)
        vehicle = vehicle @ _rot_y(0.004 * np.sin(1.3 * t)) @ _rot_x(0.003 * np.sin(0.7 * t))  # suspension
        pose = np.eye(4)
        pose[:3, :3] = vehicle @ _rot_y(self.mount_pitch) @ _rot_x(self.mount_roll)
        pose[:3, 3] = np.array([xy[0], xy[1], z]) + vehicle @ np.array([0.0, 0.0, self.height])
        return pose


# Object templates: parts in the object's frame (x forward, y left, z up, origin on the ground),
# each (kind, centre, axes, semantic or None for the object's own class).
_Part = tuple[int, np.ndarray, np.ndarray, "int | None"]
_DISC_AXIS = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # unit-cylinder z -> x


def _box_part(center, size, rotation: np.ndarray | None = None, semantic: int | None = None) -> _Part:
    rotation = np.eye(3) if rotation is None else rotation
    return BOX, np.asarray(center, float), rotation * (np.asarray(size, float) / 2), semantic


def _cyl_part(center, radius: float, height: float, rotation: np.ndarray | None = None,
              semantic: int | None = None) -> _Part:
    rotation = np.eye(3) if rotation is None else rotation
    return CYLINDER, np.asarray(center, float), rotation * np.array([radius, radius, height / 2]), semantic


def _ell_part(center, radii, rotation: np.ndarray | None = None, semantic: int | None = None) -> _Part:
    rotation = np.eye(3) if rotation is None else rotation
    return ELLIPSOID, np.asarray(center, float), rotation * np.asarray(radii, float), semantic


def _wheels(length_offsets, half_track: float, radius: float, width: float) -> list[_Part]:
    return [_cyl_part((x, sy * half_track, radius), radius, width, _WHEEL_AXIS)
            for x in length_offsets for sy in (-1, 1)]


VEHICLES = {"car": (CAR, MOVING_CAR), "van": (CAR, MOVING_CAR), "truck": (TRUCK, MOVING_TRUCK),
            "bus": (OTHER_VEHICLE, MOVING_OTHER_VEHICLE), "trailer": (OTHER_VEHICLE, MOVING_OTHER_VEHICLE)}
"""Vehicle kinds and their (parked, moving) SemanticKITTI ids: vans are cars in SemanticKITTI; buses, trailers
and caravans are other-vehicle."""
_TRAFFIC = (0.66, 0.14, 0.1, 0.1, 0.0)  # car, van, truck, bus, trailer
_PARKED = (0.74, 0.15, 0.04, 0.0, 0.07)


def _vehicle(rng: np.random.Generator, kind: str) -> tuple[list[_Part], float, float]:
    """Parts, length and width of a car, van, truck or bus."""
    if kind == "car":
        length, width, cabin = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9), rng.uniform(0.4, 0.6)
        parts = [_box_part((0, 0, 0.65), (length, width, 0.8)),
                 _box_part((-0.05 * length, 0, 1.05 + cabin / 2), (0.55 * length, width - 0.16, cabin))]
        return parts + _wheels((-(length / 2 - 0.8), length / 2 - 0.8), width / 2 - 0.08, 0.31, 0.22), length, width
    if kind == "van":
        length, width, height = rng.uniform(4.8, 5.6), rng.uniform(1.9, 2.05), rng.uniform(1.9, 2.4)
        parts = [_box_part((-0.45, 0, (0.3 + height) / 2), (length - 0.9, width, height - 0.3)),
                 _box_part((length / 2 - 0.45, 0, 0.75), (0.9, width - 0.1, 0.9))]
        return parts + _wheels((-(length / 2 - 0.9), length / 2 - 1.0), width / 2 - 0.1, 0.34, 0.24), length, width
    if kind == "truck":
        length, width, cargo = rng.uniform(7.0, 10.0), 2.45, rng.uniform(2.4, 3.0)
        box = length - 2.5
        parts = [_box_part((length / 2 - 1.1, 0, 1.7), (2.2, width, 2.4)),
                 _box_part((-length / 2 + box / 2, 0, 1.0 + cargo / 2), (box, width + 0.05, cargo)),
                 _box_part((0, 0, 0.75), (length - 0.4, 1.0, 0.35))]
        axles = (length / 2 - 1.2, -length / 2 + 1.4, -length / 2 + 2.7)
        return parts + _wheels(axles, width / 2 - 0.25, 0.5, 0.35), length, width
    if kind == "trailer":  # a caravan or box trailer on one axle, with its drawbar
        length, width, height = rng.uniform(2.5, 5.0), rng.uniform(1.7, 2.3), rng.uniform(1.2, 2.5)
        parts = [_box_part((0, 0, 0.45 + height / 2), (length, width, height)),
                 _box_part((length / 2 + 0.6, 0, 0.45), (1.2, 0.1, 0.1))]
        return parts + _wheels((0.0,), width / 2 - 0.15, 0.3, 0.2), length, width
    length, width, height = rng.uniform(10.0, 12.5), 2.55, rng.uniform(2.9, 3.2)  # bus
    parts = [_box_part((0, 0, (0.35 + height) / 2), (length, width, height - 0.35))]
    return parts + _wheels((length / 2 - 2.5, -length / 2 + 3.0), width / 2 - 0.25, 0.5, 0.3), length, width


def _vehicle_kind(rng: np.random.Generator, weights=_TRAFFIC) -> str:
    return str(rng.choice(list(VEHICLES), p=weights))


def _person(rng: np.random.Generator, walking: bool) -> list[_Part]:
    """Legs, torso, arms and head; a walker's legs are apart."""
    height, shoulders = rng.uniform(1.55, 1.92), rng.uniform(0.36, 0.46)
    leg = 0.47 * height
    stride = rng.uniform(0.15, 0.3) if walking else 0.0
    parts = [_cyl_part((sx * stride / 2, sy * 0.1, leg / 2), 0.075, leg) for sx, sy in ((1, 1), (-1, -1))]
    parts.append(_ell_part((0, 0, leg + 0.19 * height), (0.13, shoulders / 2, 0.2 * height)))
    parts += [_cyl_part((0, sy * (shoulders / 2 + 0.05), leg + 0.19 * height), 0.045, 0.33 * height) for sy in (-1, 1)]
    parts.append(_ell_part((0, 0, height - 0.115), (0.1, 0.085, 0.115)))
    return parts


def _bicycle(rng: np.random.Generator) -> list[_Part]:
    radius, base = rng.uniform(0.31, 0.36), rng.uniform(1.0, 1.12)
    return [_cyl_part((sx * base / 2, 0, radius), radius, 0.05, _WHEEL_AXIS) for sx in (-1, 1)] + [
        _box_part((0, 0, radius + 0.2), (0.75 * base, 0.05, 0.35)),
        _box_part((base / 2 - 0.1, 0, radius + 0.58), (0.08, 0.56, 0.05)),
        _box_part((-0.15, 0, radius + 0.5), (0.25, 0.12, 0.06))]


def _cyclist(rng: np.random.Generator) -> list[_Part]:
    """A bicycle with its rider, leaning forward (all of it is 'bicyclist' in SemanticKITTI)."""
    lean = _rot_y(rng.uniform(0.3, 0.6))
    return _bicycle(rng) + [
        _ell_part((0.0, 0, 1.25), (0.13, 0.2, 0.3), lean),
        _ell_part((0.2, 0, 1.62), (0.1, 0.085, 0.115)),
        *[_cyl_part((-0.05, sy * 0.12, 0.75), 0.07, 0.6, _rot_y(0.25)) for sy in (-1, 1)]]


def _tree(rng: np.random.Generator) -> list[_Part]:
    """Trunk and a broadleaf canopy (one to three ellipsoids) or a conifer."""
    trunk, radius = rng.uniform(2.0, 4.5), rng.uniform(0.1, 0.28)
    if rng.random() < 0.2:  # conifer
        cone = (rng.uniform(1.0, 1.7), rng.uniform(1.0, 1.7), rng.uniform(2.5, 4.0))
        top = 0.5 * trunk + cone[2]
        return [_cyl_part((0, 0, top / 2), radius, top, semantic=TRUNK),
                _ell_part((0, 0, top), cone, _rot_z(rng.uniform(0, np.pi)), semantic=VEGETATION)]
    radii = np.array([rng.uniform(1.5, 3.2), rng.uniform(1.5, 3.2), rng.uniform(1.3, 2.6)])
    centre = trunk + 0.7 * radii[2]
    parts = [_cyl_part(((0, 0, (trunk + radii[2]) / 2)), radius, trunk + radii[2], semantic=TRUNK),
             _ell_part((0, 0, centre), radii, _rot_z(rng.uniform(0, np.pi)), semantic=VEGETATION)]
    for _ in range(rng.integers(0, 3)):
        offset = rng.uniform(-0.6, 0.6, 3) * radii
        parts.append(_ell_part((offset[0], offset[1], centre + offset[2]), radii * rng.uniform(0.45, 0.75),
                               _rot_z(rng.uniform(0, np.pi)), semantic=VEGETATION))
    return parts


def _street_light(rng: np.random.Generator) -> list[_Part]:
    """Mast and an arm reaching over the road (towards -y)."""
    height, arm = rng.uniform(6.0, 9.0), rng.uniform(1.0, 2.2)
    return [_cyl_part((0, 0, height / 2), rng.uniform(0.07, 0.12), height),
            _box_part((0, -arm / 2, height - 0.1), (0.1, arm, 0.1)),
            _box_part((0, -arm, height - 0.2), (0.3, 0.5, 0.15))]


def _sign(rng: np.random.Generator) -> list[_Part]:
    """A post (pole) with a plate or disc facing along the road (traffic-sign)."""
    height = rng.uniform(2.2, 3.1)
    parts = [_cyl_part((0, 0, height / 2), rng.uniform(0.035, 0.06), height, semantic=POLE)]
    size = rng.uniform(0.5, 0.85)
    if rng.random() < 0.5:
        parts.append(_cyl_part((0.05, 0, height - size / 2), size / 2, 0.03, _DISC_AXIS, semantic=TRAFFIC_SIGN))
    else:
        parts.append(_box_part((0.05, 0, height - size / 2), (0.03, size, size * rng.uniform(0.8, 1.4)),
                               semantic=TRAFFIC_SIGN))
    if rng.random() < 0.3:  # a second, smaller plate below
        parts.append(_box_part((0.05, 0, height - size - 0.25), (0.03, 0.5, 0.3), semantic=TRAFFIC_SIGN))
    return parts


def _traffic_light(rng: np.random.Generator) -> list[_Part]:
    height = rng.uniform(3.0, 4.0)
    return [_cyl_part((0, 0, height / 2), 0.08, height, semantic=POLE),
            _box_part((0.1, 0, height + 0.45), (0.3, 0.35, 0.9), semantic=TRAFFIC_SIGN)]


def _building(rng: np.random.Generator, length: float, depth: float, height: float, bottom: float) -> list[_Part]:
    """A block whose facade (the plane y = 0, facing -y) has recessed bays, doors and balconies.

    ``bottom`` (negative) buries the block so that it meets sloping ground.
    """
    mid, tall = (bottom + height) / 2, height - bottom
    if rng.random() < 0.3:
        return [_box_part((0, depth / 2, mid), (length, depth, tall))]
    recess = rng.uniform(0.4, 1.5)
    parts = [_box_part((0, (recess + depth) / 2, mid), (length, depth - recess, tall))]
    edges = np.concatenate([[-length / 2], np.sort(rng.uniform(-length / 2, length / 2, max(1, int(length / 4)))),
                            [length / 2]])
    balconies = rng.random() < 0.4
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        width, centre = b - a, (a + b) / 2
        if width < 0.8:
            continue
        style = rng.random()
        if style < 0.55:  # flush facade
            parts.append(_box_part((centre, recess / 2, mid), (width, recess, tall)))
        elif style < 0.8 and height > 4.0:  # a door or passage, recessed under the facade above it
            door = rng.uniform(2.3, 3.3)
            parts.append(_box_part((centre, recess / 2, (door + height) / 2), (width, recess, height - door)))
        # else: a bay recessed over the full height
        if balconies and style < 0.8 and width > 1.5:
            for floor in np.arange(3.2, height - 1.5, 3.0):
                parts.append(_box_part((centre, -0.5, floor + 0.5), (min(width - 0.3, 3.0), 1.0, 1.0)))
    return parts


def _place(b: SceneBuilder, parts: list[_Part], rotation: np.ndarray, origin: np.ndarray, *, semantic: int,
           instance: int = 0, velocity=(0.0, 0.0, 0.0), window: tuple[float, float] = (-np.inf, np.inf)) -> None:
    """Add an object's parts, posed by ``rotation`` and ``origin``; ``origin`` is where it is at t = 0."""
    for kind, centre, axes, own in parts:
        b.solid(kind, origin + rotation @ centre, rotation @ axes, semantic=semantic if own is None else own,
                instance=instance if own is None else 0, velocity=velocity, window=window)


class _Frame:
    """A street's local frames: ``frame(u)`` -> (point, unit tangent, unit left normal) along its axis."""

    def __init__(self, frame: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
                 curvature: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self._frame, self._curvature = frame, curvature

    def at(self, u: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        point, tangent, normal = self._frame(np.array([u], dtype=np.float64))
        return point[0], tangent[0], normal[0]

    def curvature(self, u: float) -> float:
        return 0.0 if self._curvature is None else float(self._curvature(np.array([u]))[0])


def _side_rotation(tangent: np.ndarray, outward: np.ndarray) -> np.ndarray:
    """Columns: along the street, away from it, up (a reflection on the right-hand side; the unit shapes don't mind)."""
    return np.array([[tangent[0], outward[0], 0.0], [tangent[1], outward[1], 0.0], [0.0, 0.0, 1.0]])


class _Urban:
    """Builds one urban world; ``_next`` hands out instance ids."""

    def __init__(self, rng: np.random.Generator, terrain: Terrain, ego: RoadPath, b: SceneBuilder) -> None:
        self.rng, self.terrain, self.ego, self.b = rng, terrain, ego, b
        self._instance = 0

    def _next(self) -> int:
        self._instance += 1
        return self._instance

    def ground(self, xy: np.ndarray) -> float:
        return float(self.terrain.height(np.array([xy[0]]), np.array([xy[1]]), bumps=False)[0])

    def _free(self, points: np.ndarray, avoid: Callable[[np.ndarray], np.ndarray], margin: float) -> bool:
        return bool(np.all(avoid(points) > margin))

    def frontage(self, frame: _Frame, u0: float, u1: float, side: int, outer: float,
                 avoid: Callable[[np.ndarray], np.ndarray]) -> None:
        """Lots along one side of a street from ``outer`` metres off its axis: facades, alleys, yards."""
        rng, b = self.rng, self.b
        u = u0 - rng.uniform(0, 5)
        while u < u1:
            if rng.random() < 0.22:  # alley or yard: fence, hedge, bushes, a mound, a building behind
                gap = rng.uniform(2.5, 12.0)
                point, tangent, normal = frame.at(u + gap / 2)
                out = side * normal
                rotation = _side_rotation(tangent, out)

                def put(parts: list[_Part], offset: float, along: float = 0.0, semantic: int = VEGETATION) -> None:
                    xy = point + tangent * along + out * offset
                    if self._free(xy[None], avoid, 0.5):
                        _place(b, parts, rotation, np.array([*xy, self.ground(xy)]), semantic=semantic)

                if rng.random() < 0.45:
                    h = rng.uniform(1.0, 2.0)
                    put([_box_part((0, 0, h / 2 - 0.2), (gap - 0.4, 0.06, h + 0.4))], outer + rng.uniform(0.1, 0.8),
                        semantic=FENCE)
                elif rng.random() < 0.3:
                    h = rng.uniform(0.8, 1.8)
                    put([_box_part((0, 0, h / 2 - 0.2), (gap - 0.4, rng.uniform(0.6, 1.2), h + 0.4))],
                        outer + rng.uniform(0.5, 1.5))
                for _ in range(rng.integers(0, 3)):
                    r = rng.uniform(0.5, 1.3)
                    put([_ell_part((0, 0, 0.1), (r, r * rng.uniform(0.7, 1.2), r * 0.8))], outer + rng.uniform(2, 6),
                        rng.uniform(-gap / 2, gap / 2))
                if rng.random() < 0.3:
                    put([_ell_part((0, 0, -0.1), (rng.uniform(2, 4), rng.uniform(1, 2.5), rng.uniform(0.3, 0.7)))],
                        outer + rng.uniform(4, 8), semantic=TERRAIN)
                if rng.random() < 0.5:  # seen through the gap
                    self.building(frame, u + gap / 2, side, outer + rng.uniform(12, 25), rng.uniform(8, 20), avoid)
                u += gap
            else:
                length = rng.uniform(8.0, 28.0)
                curvature = frame.curvature(u + length / 2)
                if curvature > 0:  # keep the straight facade off the sidewalk of a bend
                    length = min(length, max(6.0, np.sqrt(2.4 / curvature)))
                setback = rng.choice([0.0, 0.0, rng.uniform(0.3, 1.0), rng.uniform(2.0, 7.0)])
                if self.building(frame, u + length / 2, side, outer + setback, length, avoid) and setback > 2:
                    point, tangent, normal = frame.at(u + length / 2)  # front yard
                    for _ in range(rng.integers(0, 4)):
                        xy = point + tangent * rng.uniform(-length / 2, length / 2) + \
                            side * normal * (outer + rng.uniform(0.6, setback - 0.6))
                        r = rng.uniform(0.4, 1.1)
                        _place(b, [_ell_part((0, 0, 0.15), (r, r * rng.uniform(0.7, 1.3), r * 0.8))], np.eye(3),
                               np.array([*xy, self.ground(xy)]), semantic=VEGETATION)
                u += length + rng.uniform(0.0, 1.5)

    def building(self, frame: _Frame, u: float, side: int, offset: float, length: float,
                 avoid: Callable[[np.ndarray], np.ndarray]) -> bool:
        rng = self.rng
        depth, height = rng.uniform(8.0, 18.0), rng.uniform(5.0, 24.0)
        point, tangent, normal = frame.at(u)
        out = side * normal
        front = point + out * offset
        along = np.linspace(-length / 2, length / 2, 5)
        footprint = np.concatenate([front + tangent * along[:, None], front + tangent * along[:, None] + out * depth,
                                    [front + out * depth / 2]])
        if not self._free(footprint, avoid, 0.5):
            return False
        z = self.terrain.height(footprint[:, 0], footprint[:, 1], bumps=False)
        base = self.ground(front)
        parts = _building(rng, length, depth, height, float(z.min()) - base - 0.5)
        _place(self.b, parts, _side_rotation(tangent, out), np.array([*front, base]), semantic=BUILDING)
        return True

    def furniture(self, frame: _Frame, u0: float, u1: float, side: int, inner: float, outer: float,
                  avoid: Callable[[np.ndarray], np.ndarray]) -> None:
        """Trees, street lights, signs, parked bicycles and people on a sidewalk between ``inner`` and ``outer``."""
        rng, b = self.rng, self.b
        u = u0 + rng.uniform(0, 8)
        while u < u1:
            point, tangent, normal = frame.at(u)
            out = side * normal
            rotation = _side_rotation(tangent, out)
            r = rng.random()
            if r < 0.34:
                parts, offset, semantic, instance = _tree(rng), inner + rng.uniform(0.5, 0.9), VEGETATION, 0
            elif r < 0.48:
                parts, offset, semantic, instance = _street_light(rng), inner + 0.4, POLE, 0
            elif r < 0.6:
                parts, offset, semantic, instance = _sign(rng), inner + 0.35, POLE, 0
                if rng.random() < 0.5:  # facing the other way
                    rotation = rotation @ _rot_z(np.pi)
            elif r < 0.68 and outer - inner > 1.6:
                parts, offset, semantic, instance = _bicycle(rng), outer - 0.5, BICYCLE, self._next()
                rotation = rotation @ _rot_z(np.pi / 2 + rng.uniform(-0.3, 0.3))
            elif r < 0.78 and outer - inner > 1.2:
                parts, offset, semantic, instance = _person(rng, False), rng.uniform(inner + 0.5, outer - 0.4), \
                    PERSON, self._next()
                rotation = rotation @ _rot_z(rng.uniform(0, 2 * np.pi))
            elif r < 0.81 and outer - inner > 1.6:  # someone standing with their bicycle: 'bicyclist'
                parts = _bicycle(rng) + [(kind, centre + np.array([0.0, 0.45, 0.0]), axes, own)
                                         for kind, centre, axes, own in _person(rng, False)]
                offset, semantic, instance = rng.uniform(inner + 0.6, outer - 0.7), BICYCLIST, self._next()
                rotation = rotation @ _rot_z(rng.choice([0.0, np.pi]))
            else:
                u += rng.uniform(3, 8)
                continue
            xy = point + out * offset
            if self._free(xy[None], avoid, 0.4):
                _place(b, parts, rotation, np.array([*xy, self.ground(xy)]), semantic=semantic, instance=instance)
            u += rng.uniform(4.0, 13.0)

    def parked(self, x0: float, x1: float, side: int, offset: float) -> None:
        """Vehicles parked nose to tail in a bay from x0 to x1, centred ``offset`` off the centreline."""
        rng, road = self.rng, self.terrain.road
        s, s1 = self.ego.s_at(np.array([x0, x1]))
        s += rng.uniform(0.3, 2.0)
        while True:
            kind = _vehicle_kind(rng, _PARKED)
            parts, length, width = _vehicle(rng, kind)
            if s + length > s1:
                break
            if rng.random() < 0.8:
                x = self.ego.x_at(np.array([s + length / 2]))
                point, tangent, normal = (v[0] for v in road.frame(x))
                xy = point + normal * side * offset
                heading = np.arctan2(tangent[1], tangent[0]) + (np.pi if rng.random() < 0.3 else 0.0) + \
                    rng.uniform(-0.04, 0.04)
                z, rotation = _ground_frame(self.terrain, xy, heading, length / 2 - 0.6, width / 2 - 0.2)
                _place(self.b, parts, rotation, np.array([*xy, z]), semantic=VEHICLES[kind][0], instance=self._next())
            s += length + rng.uniform(0.6, 2.5)

    def travel(self, parts: list[_Part], *, s: float, lateral: float, speed: float, duration: float,
               semantic: int, half_length: float, half_width: float, dt: float = 1.0) -> None:
        """A road user at ``lateral`` metres off the centreline whose arclength runs ``s + speed * t``.

        Straight segments of ``dt`` seconds, each a solid that exists only in its time
        window, follow the bending, sloping road.
        """
        segments = max(1, math.ceil(duration / dt))
        times = np.arange(segments + 1) * dt
        x = self.ego.x_at(s + speed * times)
        point, tangent, normal = self.terrain.road.frame(x)
        xy = point + lateral * normal
        heading = np.arctan2(tangent[:, 1], tangent[:, 0]) + (np.pi if speed < 0 else 0.0)
        frames = [_ground_frame(self.terrain, xy[k], heading[k], half_length, half_width) for k in range(segments + 1)]
        position = np.column_stack([xy, [z for z, _ in frames]])
        instance = self._next()
        for k in range(segments):
            velocity = (position[k + 1] - position[k]) / dt
            window = (-np.inf if k == 0 else times[k], np.inf if k == segments - 1 else times[k + 1])
            _place(self.b, parts, frames[k][1], position[k] - velocity * times[k], semantic=semantic,
                   instance=instance, velocity=velocity, window=window)


def make_urban(rng: np.random.Generator, scans: int, lidar: Lidar, frame_period: float = 0.1) -> Street:
    """A random urban world (see :class:`Terrain`) for ``scans`` frames plus the sensor's range at both ends."""
    duration = scans * frame_period
    speed = rng.uniform(6.0, 12.0)
    x0 = lidar.max_range + 20.0
    length = 2 * x0 + speed * duration + 10.0
    # Road: bends (or not), lanes, sidewalks, bays.
    if rng.random() < 0.8:
        amp = (rng.uniform(3.0, 14.0), rng.uniform(0.0, 4.0))
        freq = (2 * np.pi / rng.uniform(180, 400), 2 * np.pi / rng.uniform(80, 160))
    else:
        amp, freq = (0.0, 0.0), (0.0, 0.0)
    road = Centreline(amp, freq, tuple(rng.uniform(0, 2 * np.pi, 2)))
    lanes, lane_width = int(rng.choice([1, 1, 2])), rng.uniform(3.0, 3.6)
    shoulder = rng.uniform(0.2, 1.5)  # from 0.6 m on, cyclists ride there
    half_width = lanes * lane_width + shoulder
    walk = rng.uniform(2.0, 4.5, 2)
    bay = np.where(rng.random(2) < 0.6, rng.uniform(2.2, 2.5, 2), 0.0)
    if not bay.any():  # parking on one side at least
        bay[rng.integers(0, 2)] = rng.uniform(2.2, 2.5)
    curb = rng.uniform(0.10, 0.16)
    # Ground: a plane, long undulations and low bumps.
    grade = (rng.uniform(-0.04, 0.04), rng.uniform(-0.02, 0.02))
    waves = []  # grade changes: up to ~4 % more or less
    for _ in range(2):
        k, angle = 2 * np.pi / rng.uniform(100, 400), rng.uniform(0, np.pi)
        waves.append((rng.uniform(0.1, 1.0), k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * np.pi)))
    bumps = []  # low bumps and dips, up to ~3 cm
    for _ in range(2):
        k, angle = 2 * np.pi / rng.uniform(3, 12), rng.uniform(0, np.pi)
        bumps.append((rng.uniform(0.005, 0.015), k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * np.pi)))
    cross = None
    if rng.random() < 0.55:  # a cross street (or T junction) the drive passes
        xc = rng.uniform(x0 - 20, x0 + speed * duration + 40)
        point, tangent, _ = (v[0] for v in road.frame(np.array([xc])))
        angle = np.arctan2(tangent[1], tangent[0]) + np.pi / 2 + rng.uniform(-0.35, 0.35)
        cross = (float(point[0]), float(point[1]), float(np.cos(angle)), float(np.sin(angle)),
                 float(rng.uniform(3.2, 5.5)), float(rng.uniform(1.5, 3.5)), float(rng.choice([0, 0, 1, -1])))
    bay_x = np.arange(-20.0, length + 20.0, _BAY_STEP)
    bays = np.zeros((2, len(bay_x)))
    terrain = Terrain(road, half_width, tuple(bay + walk), curb, rng.uniform(0.01, 0.02), grade,
                      np.array(waves), np.array(bumps), -20.0, bays, cross)
    for i, side in enumerate((-1, 1)):  # bay stretches, none near the cross street
        if bay[i] == 0:
            continue
        x = rng.uniform(-10, 10)
        while x < length:
            run = rng.uniform(12, 60)
            bays[i, (bay_x >= x) & (bay_x < x + run)] = bay[i]
            x += run + rng.uniform(5, 20)
        point, _, normal = road.frame(bay_x)
        edge = point + normal * side * (half_width + bay[i] / 2)
        bays[i, terrain.clearance(edge[:, 0], edge[:, 1]) < 3.0] = 0.0
    mount = lidar.height + rng.uniform(-0.1, 0.1)
    lane = -(rng.integers(0, lanes) + 0.5) * lane_width
    ego = RoadPath(terrain, 0.0, speed, lane, mount, np.deg2rad(rng.uniform(-1.5, 1.5)),
                   np.deg2rad(rng.uniform(-1.5, 1.5)), x_range=(-100.0, length + 100.0))
    ego = RoadPath(terrain, float(ego.s_at(np.array([x0]))[0]), speed, lane, mount, ego.mount_pitch, ego.mount_roll,
                   x_range=ego.x_range)
    b = SceneBuilder()
    world = _Urban(rng, terrain, ego, b)

    def main_road_distance(points: np.ndarray) -> np.ndarray:
        d, _ = road.lateral(points[:, 0], points[:, 1])
        return np.abs(d) - half_width - np.where(d > 0, terrain.band[1], terrain.band[0])

    def off_cross(points: np.ndarray) -> np.ndarray:
        return terrain.clearance(points[:, 0], points[:, 1])

    def off_cross_road(points: np.ndarray) -> np.ndarray:
        return off_cross(points) + cross[5] if cross is not None else off_cross(points)

    main = _Frame(road.frame, road.curvature)
    for i, side in enumerate((-1, 1)):
        world.frontage(main, -10.0, length, side, half_width + terrain.band[i], off_cross)
        world.furniture(main, -10.0, length, side, half_width + bay[i], half_width + terrain.band[i], off_cross_road)
        on = np.flatnonzero(np.diff(np.r_[0, bays[i] > 0, 0]))  # parked vehicles in the bays
        for start, stop in zip(on[::2], on[1::2], strict=True):
            world.parked(bay_x[start], bay_x[stop - 1] + _BAY_STEP, side, half_width + bay[i] / 2)
    if cross is not None:
        px, py, ux, uy, hw2, walk2, sides = cross
        axis = np.array([ux, uy])

        def cross_frame(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            a = np.asarray(a)[:, None]
            return np.array([px, py]) + a * axis, np.broadcast_to(axis, a.shape[:1] + (2,)), \
                np.broadcast_to(np.array([-uy, ux]), a.shape[:1] + (2,))

        frame = _Frame(cross_frame)
        reach = half_width + max(terrain.band) + 2.0
        for direction in ((1, -1) if sides == 0 else (int(sides),)):
            lo, hi = (reach, 90.0) if direction > 0 else (-90.0, -reach)
            for side in (-1, 1):
                world.frontage(frame, lo, hi, side, hw2 + walk2, main_road_distance)
                world.furniture(frame, lo, hi, side, hw2, hw2 + walk2, main_road_distance)
            corner = np.array([px, py]) + axis * direction * (reach - 1.0)
            for side in (-1, 1):  # signs and traffic lights at the corners
                xy = corner + np.array([-uy, ux]) * side * (hw2 + 0.5)
                parts = _traffic_light(rng) if rng.random() < 0.5 else _sign(rng)
                _place(b, parts, _side_rotation(axis * -direction, np.array([-uy, ux]) * side),
                       np.array([*xy, world.ground(xy)]), semantic=POLE)
            # Cross traffic (right-hand): a car waiting at the junction, and cars driving away from it.
            away, left = axis * direction, np.array([-uy, ux]) * direction
            heading = float(np.arctan2(away[1], away[0]))
            if rng.random() < 0.6:
                kind = _vehicle_kind(rng, (0.8, 0.15, 0.05, 0.0, 0.0))
                parts, vlength, vwidth = _vehicle(rng, kind)
                xy = np.array([px, py]) + away * (reach + vlength / 2 + rng.uniform(0, 1.5)) + left * hw2 / 2
                z, rotation = _ground_frame(terrain, xy, heading + np.pi, vlength / 2 - 0.6, vwidth / 2 - 0.2)
                _place(b, parts, rotation, np.array([*xy, z]), semantic=VEHICLES[kind][0], instance=world._next())
            v, a = rng.uniform(5.0, 12.0), reach + rng.uniform(0.0, 15.0)
            for _ in range(rng.integers(0, 3)):
                kind = _vehicle_kind(rng)
                parts, vlength, vwidth = _vehicle(rng, kind)
                a += vlength / 2
                xy0 = np.array([px, py]) + away * a - left * hw2 / 2
                xy1 = xy0 + away * v * max(duration, 1.0)
                z0, rotation = _ground_frame(terrain, xy0, heading, vlength / 2 - 0.6, vwidth / 2 - 0.2)
                z1, _ = _ground_frame(terrain, xy1, heading, vlength / 2 - 0.6, vwidth / 2 - 0.2)
                velocity = (np.array([*xy1, z1]) - np.array([*xy0, z0])) / max(duration, 1.0)
                _place(b, parts, rotation, np.array([*xy0, z0]), semantic=VEHICLES[kind][1], instance=world._next(),
                       velocity=velocity)
                a += vlength / 2 + rng.uniform(8.0, 30.0)
    # Moving road users along the main road.
    s_ego, s_far = ego.s0, ego.s0 + speed * duration
    direction_lanes = [(k + 0.5) * lane_width for k in range(lanes)]
    for offset in direction_lanes:  # oncoming traffic, one speed per lane
        v = rng.uniform(7.0, 14.0)
        s = s_ego + rng.uniform(-20, 10)
        while s < s_far + v * duration + 60:
            kind = _vehicle_kind(rng)
            parts, vlength, vwidth = _vehicle(rng, kind)
            s += vlength + rng.uniform(10, 60)
            world.travel(parts, s=s, lateral=offset, speed=-v, duration=duration, semantic=VEHICLES[kind][1],
                         half_length=vlength / 2 - 0.6, half_width=vwidth / 2 - 0.2)
    for offset in direction_lanes:  # our direction: faster ahead of the ego, slower behind it; any in other lanes
        ours = abs(offset + lane) < 0.1
        for ahead in (True, False):
            v = speed + rng.uniform(1.5, 4.0) if ahead else max(2.0, speed - rng.uniform(1.5, 3.0))
            if not ours:
                v = rng.uniform(6.0, 14.0)
            s = s_ego + (rng.uniform(12, 25) if ahead else -rng.uniform(12, 25))
            for _ in range(rng.integers(0, 3)):
                kind = _vehicle_kind(rng)
                parts, vlength, vwidth = _vehicle(rng, kind)
                world.travel(parts, s=s + (vlength / 2 if ahead else -vlength / 2), lateral=-offset, speed=v,
                             duration=duration, semantic=VEHICLES[kind][1], half_length=vlength / 2 - 0.6,
                             half_width=vwidth / 2 - 0.2)
                s += (1 if ahead else -1) * (vlength + rng.uniform(10, 40))
    for i, sign in enumerate((-1, 1)):  # cyclists with the traffic of their side: on the shoulder, or a bike path
        if shoulder >= 0.6:
            lateral = lanes * lane_width + shoulder / 2
        elif terrain.band[i] - bay[i] >= 2.5:  # in the sidewalk band
            lateral = half_width + bay[i] + 0.8
        else:
            continue
        for _ in range(rng.integers(1, 3)):
            start = s_ego + (rng.uniform(-30, 20) if sign < 0 else rng.uniform(0, speed * duration + 70))
            world.travel(_cyclist(rng), s=start, lateral=sign * lateral,
                         speed=-sign * rng.uniform(3.0, 6.5), duration=duration, semantic=MOVING_BICYCLIST,
                         half_length=0.5, half_width=0.25)
    for _ in range(rng.integers(2, 9)):  # pedestrians walking along the sidewalks
        i = int(rng.integers(0, 2))
        side = (-1, 1)[i]
        inner, outer = half_width + bay[i] + 0.3, half_width + terrain.band[i] - 0.3
        if outer <= inner:
            continue
        world.travel(_person(rng, True), s=s_ego + rng.uniform(-40, speed * duration + 50),
                     lateral=side * rng.uniform(inner, outer), speed=rng.choice([-1, 1]) * rng.uniform(1.0, 1.7),
                     duration=duration, semantic=MOVING_PERSON, half_length=0.15, half_width=0.15)
    return Street(b.build(), half_width, ego, terrain, "urban")


def make_world(world: str, rng: np.random.Generator, scans: int, lidar: Lidar, frame_period: float = 0.1) -> Street:
    """``world`` is one of :data:`WORLDS`."""
    if world == "classic":
        return make_street(rng, scans, lidar, frame_period)
    if world == "urban":
        return make_urban(rng, scans, lidar, frame_period)
    raise ValueError(f"unknown world {world!r}; choose from {', '.join(WORLDS)}")



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
    p = street.primitives.at(time)
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

    if street.ground is None:
        # Ground plane z = 0: road inside the road's half-width, terrain outside.
        down = dirs @ rot[2]  # world z-component of each ray
        with np.errstate(divide="ignore"):
            t_ground = np.where(down < 0, -origin[2] / down, np.inf)
        ground = (t_ground < best) & (t_ground <= lidar.max_range)
        y_world = origin[1] + t_ground * (dirs @ rot[1])
        semantic[ground] = np.where(np.abs(y_world[ground]) <= street.road_half_width, ROAD, TERRAIN)
    else:
        t_ground, ground_semantic = street.ground.intersect(origin, dirs @ rot.T, np.minimum(best, lidar.max_range))
        ground = (t_ground < best) & (t_ground <= lidar.max_range)
        semantic[ground] = ground_semantic[ground]
    instance[ground] = 0
    best[ground] = t_ground[ground]
    best[best > lidar.max_range] = np.inf
    return Hits(best, semantic, instance)


_MIN_RANGE = 1.0  # urban world: returns closer than this (the ego car's own body) are dropped


def simulate_scan(street: Street, lidar: Lidar, time: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scan at ``time``: (N, 4) float32 x, y, z, remission in the sensor frame and (N,) uint32 labels.

    Classic world: Gaussian range noise ``range_noise`` and uniform ``dropout``. Urban
    world, closer to real sensors: the noise grows with range (x2 at ``max_range``),
    returns are lost more often far away and on dark surfaces (up to ``dropout`` + 30 %),
    remission fades with range, and nothing closer than 1 m returns.
    """
    hits = raycast(street, street.ego.pose(time), lidar, time)
    n = len(hits.range)
    if street.world != "classic":
        return _realistic_returns(hits, lidar, rng)
    noisy = hits.range + rng.normal(0.0, lidar.range_noise, n)
    keep = np.isfinite(hits.range) & (rng.random(n) >= lidar.dropout) & (noisy > 0)
    remission = np.clip(_REFLECTIVITY[hits.semantic] + rng.normal(0.0, 0.05, n), 0.0, 1.0)
    xyz = lidar.directions[keep] * noisy[keep, None]
    points = np.column_stack([xyz, remission[keep]]).astype(np.float32)
    labels = hits.semantic[keep].astype(np.uint32) | (hits.instance[keep].astype(np.uint32) << 16)
    return points, labels


def _realistic_returns(hits: Hits, lidar: Lidar, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = len(hits.range)
    finite = np.isfinite(hits.range)
    fraction = np.where(finite, hits.range, 0.0) / lidar.max_range
    reflectivity = _REFLECTIVITY[hits.semantic]
    noisy = hits.range + rng.normal(0.0, 1.0, n) * lidar.range_noise * (1.0 + fraction)
    lost = lidar.dropout + 0.3 * fraction**2 * (1.0 - reflectivity)
    keep = finite & (rng.random(n) >= lost) & (noisy > _MIN_RANGE)
    remission = np.clip(reflectivity * (1.0 - 0.3 * fraction) + rng.normal(0.0, 0.05, n), 0.0, 1.0)
    xyz = lidar.directions[keep] * noisy[keep, None]
    points = np.column_stack([xyz, remission[keep]]).astype(np.float32)
    labels = hits.semantic[keep].astype(np.uint32) | (hits.instance[keep].astype(np.uint32) << 16)
    return points, labels


def preset_name(lidar: Lidar) -> str | None:
    return next((name for name, preset in PRESETS.items() if preset == lidar), None)


def write_sequence(
    directory: str | Path,
    *,
    scans: int,
    lidar: Lidar,
    seed: int,
    sequence: int = 0,
    frame_period: float = 0.1,
    on_scan: Callable[[], object] | None = None,
    world: str = "classic",
) -> Street:
    """Write one SemanticKITTI sequence directory; deterministic in ``(seed, sequence)`` (and ``world``, ``lidar``).

    ``world`` defaults to ``classic`` here so that existing callers keep their data; ``lidar-synth``
    defaults to ``urban``.
    """
    if scans < 1:
        raise ValueError(f"scans must be at least 1, got {scans}")
    directory = Path(directory)
    street = make_world(world, np.random.default_rng([seed, sequence, 0]), scans, lidar, frame_period)
    (directory / "velodyne").mkdir(parents=True, exist_ok=True)
    (directory / "labels").mkdir(exist_ok=True)
    times = np.arange(scans) * frame_period
    sensor_poses = np.stack([street.ego.pose(t) for t in times])  # sensor -> simulation world
    tr = np.vstack([np.reshape(_KITTI_CALIB["Tr"], (3, 4)), [0, 0, 0, 1]])
    velo_poses = np.linalg.inv(sensor_poses[0]) @ sensor_poses  # -> velodyne frame of scan 0
    kitti.write_poses(directory / "poses.txt", tr @ velo_poses @ np.linalg.inv(tr))
    kitti.write_calib(directory / "calib.txt", {k: np.reshape(v, (3, 4)) for k, v in _KITTI_CALIB.items()})
    kitti.write_times(directory / "times.txt", times)
    ego = street.ego
    info = {"world": world, "preset": preset_name(lidar), "seed": seed, "sequence": sequence,
            "beams": len(lidar.elevations_deg), "columns": lidar.columns, "max_range": lidar.max_range,
            "mount_height": round(float(ego.height), 4),
            "mount_pitch_deg": round(float(np.rad2deg(getattr(ego, "mount_pitch", 0.0))), 4),
            "mount_roll_deg": round(float(np.rad2deg(getattr(ego, "mount_roll", 0.0))), 4)}
    (directory / "synthetic.json").write_text(json.dumps(info, indent=1) + "\n")
    for i, t in enumerate(times):
        points, labels = simulate_scan(street, lidar, t, np.random.default_rng([seed, sequence, 1, i]))
        kitti.write_scan(directory / "velodyne" / f"{i:06d}.bin", points)
        kitti.write_labels(directory / "labels" / f"{i:06d}.label", labels)
        if on_scan is not None:
            on_scan()
    return street


def sequence_presets(preset: str = "hdl64", presets: Sequence[str] | None = None, sequences: int = 1) -> list[str]:
    """The preset of each sequence: ``presets`` (or :data:`MIXED` for ``preset='mixed'``) in turn, else ``preset``."""
    cycle = list(presets) if presets else list(MIXED) if preset == "mixed" else [preset]
    unknown = sorted(set(cycle) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(sorted(PRESETS))}")
    return [cycle[k % len(cycle)] for k in range(sequences)]


def main(argv: Sequence[str] | None = None) -> int:
    """``lidar-synth``: write synthetic sequences 00, 01, ... under ``OUT/sequences``."""
    parser = argparse.ArgumentParser(prog="lidar-synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset root (gets sequences/NN/...)")
    parser.add_argument("--sequences", type=int, default=1, help="number of sequences")
    parser.add_argument("--scans", type=int, default=100, help="scans per sequence (10 Hz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", choices=WORLDS, default="urban",
                        help="urban (default): bends, slopes, curbs, junctions, many classes; "
                             "classic: the straight flat street of the shipped models")
    parser.add_argument("--preset", choices=[*sorted(PRESETS), "mixed"], default="hdl64",
                        help=f"sensor model; mixed: {', '.join(MIXED)} in turn, one per sequence")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), metavar="PRESET",
                        help="sensor models used in turn, one per sequence (overrides --preset)")
    args = parser.parse_args(argv)
    if args.sequences < 1 or args.scans < 1:
        parser.error("--sequences and --scans must be at least 1")
    from tqdm import tqdm

    names = sequence_presets(args.preset, args.presets, args.sequences)
    start = _time.perf_counter()
    with tqdm(total=args.sequences * args.scans, unit="scan", desc="lidar-synth") as bar:
        for k, name in enumerate(names):
            write_sequence(args.out / "sequences" / f"{k:02d}", scans=args.scans, lidar=PRESETS[name],
                           seed=args.seed, sequence=k, on_scan=bar.update, world=args.world)
    sensors = names[0] if len(set(names)) == 1 else ", ".join(f"{k:02d}: {n}" for k, n in enumerate(names))
    print(f"wrote {args.sequences} x {args.scans} scans ({args.world} world, {sensors}) to "
          f"{args.out / 'sequences'} in {_time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
