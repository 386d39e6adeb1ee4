"""Sparse 3D convolution in pure PyTorch with MinkowskiEngine 0.5.4 semantics.

Why hand-written: the published LiDiff / Distillation-DPO weights are MinkowskiEngine
models, and MinkowskiEngine neither installs on current Python/CUDA nor runs without a
compiled extension. spconv/torchsparse use other kernel layouts and output-coordinate
rules. This module reproduces exactly what MinkowskiEngine computes (see
``shared/REFERENCE.md``) with plain tensor ops, so the same code runs on CPU and CUDA.

Coordinates are ``(batch, x, y, z)`` int64 rows at the original scale: a tensor of stride
``s`` has coordinates that are multiples of ``s``. Every coordinate set is stored sorted by
a packed 64-bit key, so neighbour look-ups are a ``searchsorted`` (no hash table, no Python
loop over points) and row order is deterministic (lexicographic in batch, x, y, z).

All tensors that share one voxelised input share one :class:`CoordinateManager`, which
caches coordinate sets per stride and the kernel maps between them (a U-Net reuses each
map several times). It is this module's implementation of :class:`Coordinates`, the
contract every backend's coordinate sets keep; :class:`TorchBackend` is this module's
entry in :mod:`lidar_completion.backends` (MinkowskiEngine's is :mod:`lidar_completion.minkowski`).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "Coordinates",
    "CoordinateManager",
    "TorchBackend",
    "SparseTensor",
    "PointField",
    "voxelize",
    "SparseConv",
    "SparseConvTranspose",
    "SparseBatchNorm",
    "SparseReLU",
    "cat",
    "kernel_offsets",
]

# Packed key layout: 9 bits batch | 18 bits x | 18 bits y | 18 bits z (63 bits, positive).
# Batch is most significant, then x, y, z, so sorting keys sorts coordinates
# lexicographically. 18 bits cover +-131071 voxels: +-6.5 km at 5 cm voxels.
_COORD_BITS = 18
_COORD_BIAS = 1 << (_COORD_BITS - 1)
_COORD_MASK = (1 << _COORD_BITS) - 1
_MAX_BATCH = (1 << (63 - 3 * _COORD_BITS)) - 1


def _check_coordinate_range(coords: torch.Tensor, margin: int = 0) -> None:
    """Raise unless every x, y, z of ``(batch, x, y, z)`` rows, moved by up to ``margin``
    voxels, still fits the packed key."""
    lo, hi = -_COORD_BIAS + margin, _COORD_BIAS - 1 - margin
    if coords.numel() and (int(coords[:, 1:].min()) < lo or int(coords[:, 1:].max()) > hi):
        raise ValueError(
            f"voxel coordinates outside [{lo}, {hi}]: the scan is too large for the voxel "
            "size (check units and the range filter)"
        )


def pack(coords: torch.Tensor) -> torch.Tensor:
    """Pack int64 ``(batch, x, y, z)`` rows into sortable int64 keys."""
    if coords.numel() == 0:
        return coords.new_zeros(0)
    _check_coordinate_range(coords)
    if bool((coords[:, 0] < 0).any() or (coords[:, 0] > _MAX_BATCH).any()):
        raise ValueError(f"batch index outside [0, {_MAX_BATCH}]")
    key = coords[:, 0]
    for axis in range(1, 4):
        key = (key << _COORD_BITS) | (coords[:, axis] + _COORD_BIAS)
    return key


def unpack(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    cols = []
    rest = keys
    for _ in range(3):
        cols.append((rest & _COORD_MASK) - _COORD_BIAS)
        rest = rest >> _COORD_BITS
    cols.append(rest)
    return torch.stack(cols[::-1], dim=1)


def lookup(sorted_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Row index of each query key in ``sorted_keys``, or -1 where absent."""
    if sorted_keys.numel() == 0:
        return torch.full_like(query, -1)
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=sorted_keys.numel() - 1)
    return torch.where(sorted_keys[pos] == query, pos, torch.full_like(pos, -1))


def kernel_offsets(kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """MinkowskiEngine kernel offsets, x fastest: [K, 3] int64.

    k=3: offsets in {-1,0,1}^3, index (dx+1) + 3(dy+1) + 9(dz+1);
    k=2: offsets in {0,1}^3, index dx + 2dy + 4dz; k=1: the origin.
    """
    start = -(kernel_size // 2) if kernel_size % 2 else 0
    r = torch.arange(start, start + kernel_size, device=device)
    dz, dy, dx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([dx.flatten(), dy.flatten(), dz.flatten()], dim=1)


class KernelMap:
    """Every (input row, output row) pair a kernel connects, flat and grouped by offset:
    ``src[starts[k]:starts[k+1]]`` / ``dst[...]`` are offset k's pairs (``counts[k]`` of
    them, each output row at most once per offset). The offset ``identity`` (a
    submanifold map's centre tap, every row to itself) is left out of the flat arrays: it
    is one dense GEMM. ``dst_once``: every output row has exactly one pair (a transposed
    stride-2 map), so outputs are written, not summed.

    A map is built once per coordinate set and stride (:class:`CoordinateManager` caches
    it) and serves every layer on those coordinates; what layers derive from it (the
    neighbour table, the offset groups of :meth:`groups`) is cached on it too.
    """

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, counts: list[int], num_in: int, num_out: int,
                 identity: int | None = None, dst_once: bool = False):
        self.src, self.dst, self.counts = src, dst, counts
        self.num_in, self.num_out, self.identity, self.dst_once = num_in, num_out, identity, dst_once
        self._table: torch.Tensor | None = None
        self._groups: dict[int, list] = {}
        self._transposed: KernelMap | None = None

    @property
    def starts(self) -> list[int]:
        return [0, *itertools.accumulate(self.counts)]

    @property
    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input rows, output rows) per offset, the centre tap's included (for inspection)."""
        out, starts = [], self.starts
        for k in range(len(self.counts)):
            if k == self.identity:
                rows = torch.arange(self.num_out, device=self.src.device)
                out.append((rows, rows))
            else:
                out.append((self.src[starts[k] : starts[k + 1]], self.dst[starts[k] : starts[k + 1]]))
        return out

    @property
    def num_pairs(self) -> int:
        """Pairs in the flat arrays plus the centre tap's."""
        return self.src.numel() + (self.num_out if self.identity is not None else 0)

    @property
    def table(self) -> torch.Tensor:
        """Neighbour table [num_out, K]: the input row each output reads through each offset,
        ``num_in`` (a zero row) where there is none (built on first use)."""
        if self._table is None:
            volume, device = len(self.counts), self.src.device
            offset = torch.repeat_interleave(torch.arange(volume, device=device),
                                             torch.tensor(self.counts, device=device), output_size=self.src.numel())
            table = torch.full((self.num_out * volume,), self.num_in, dtype=torch.long, device=device)
            table[self.dst * volume + offset] = self.src
            table = table.view(self.num_out, volume)
            if self.identity is not None:
                table[:, self.identity] = torch.arange(self.num_out, device=device)
            self._table = table
        return self._table

    def transposed(self) -> "KernelMap":
        """The same pairs read the other way (the transposed convolution's map)."""
        if self._transposed is None:
            once = self.identity is None and self.src.numel() == self.num_in > 0
            self._transposed = KernelMap(self.dst, self.src, self.counts, self.num_out, self.num_in,
                                         self.identity, dst_once=once)
        return self._transposed

    def groups(self, row_bytes: int) -> list["OffsetGroup"]:
        """The offsets (the identity left out) in groups for batched GEMMs: each group's pairs
        padded to its longest offset (input row 0, output row ``num_out``: a scratch row),
        at most about :data:`_GROUP_BYTES` of gathered rows of ``row_bytes`` each. One
        gather, one ``bmm`` and one scatter per group instead of per offset (their fixed
        cost dominates narrow layers); wide layers stay bounded in memory. Cached per size."""
        limit = max(1, _GROUP_BYTES // max(1, row_bytes))
        if limit not in self._groups:
            starts = self.starts
            groups: list[list[int]] = []
            members: list[int] = []
            for k in sorted((k for k, c in enumerate(self.counts) if c and k != self.identity),
                            key=lambda k: -self.counts[k]):  # similar lengths together: less padding
                if members and (len(members) + 1) * self.counts[members[0]] > limit:
                    groups.append(members)
                    members = []
                members.append(k)
            if members:
                groups.append(members)
            self._groups[limit] = [OffsetGroup.pad(self, g, starts) for g in groups]
        return self._groups[limit]


@dataclass
class OffsetGroup:
    """Kernel offsets whose pairs run as one batched GEMM: ``src`` / ``dst`` [G * L], offset
    ``offsets[g]``'s pairs at ``g * L``, padded to L with input row 0 -> scratch row ``num_out``."""

    offsets: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    length: int

    @classmethod
    def pad(cls, kmap: KernelMap, members: list[int], starts: list[int]) -> "OffsetGroup":
        device = kmap.src.device
        counts = torch.tensor([kmap.counts[k] for k in members], device=device)
        first = torch.tensor([starts[k] for k in members], device=device)
        length = int(counts.max())
        slot = torch.arange(length, device=device)
        valid = slot[None, :] < counts[:, None]  # [G, L]
        flat = torch.where(valid, first[:, None] + slot[None, :], 0).reshape(-1)
        valid = valid.reshape(-1)
        src = torch.where(valid, kmap.src.index_select(0, flat), 0)
        dst = torch.where(valid, kmap.dst.index_select(0, flat), kmap.num_out)
        return cls(torch.tensor(members, device=device), src, dst, length)


def _packed_shifts(offsets: torch.Tensor) -> torch.Tensor:
    """Key differences of xyz shifts: ``pack(c + o) == pack(c) + shift(o)`` as long as every
    shifted coordinate stays in the packed range (no carry between fields)."""
    return (offsets[:, 0] << (2 * _COORD_BITS)) + (offsets[:, 1] << _COORD_BITS) + offsets[:, 2]


# The k=3 offsets whose neighbours are searched: the (dx, dy) columns (1, -1), (1, 0), (1, 1),
# (0, 1) at dz = -1, 0, 1 (MinkowskiEngine index (dx+1) + 3(dy+1) + 9(dz+1)). The other
# columns are their mirrors, and the (0, 0) column needs no search.
_SEARCHED_COLUMNS = ((1, -1), (1, 0), (1, 1), (0, 1))
_SEARCHED = [9 * dz + 3 * (dy + 1) + dx + 1 for dz in range(3) for dx, dy in _SEARCHED_COLUMNS]
_CENTRE = 13


def submanifold_pairs(keys: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every (input row, output row) pair of a k=3 submanifold map of sorted packed ``keys``
    at tensor stride ``stride``: flat ``src``, ``dst`` grouped by offset (MinkowskiEngine
    order) and the count per offset, the centre tap left out.

    Four ``searchsorted`` of N queries, not 26: (1) neighbours are symmetric, so the pairs of
    offset -o are those of o swapped, and only half the offsets are searched; (2) keys sort
    z fastest and a stride-s set has no key strictly between ``q`` and ``q + s`` (z is a
    multiple of s), so once ``q``'s place ``pos`` is known its z-neighbours can only be at
    ``pos - 1`` and at ``pos`` or ``pos + 1``: one search per (dx, dy) column; (3) the (0, 0)
    column's z-neighbours are adjacent rows.
    """
    device = keys.device
    sentinel = keys.new_full((1,), -1)  # keys are positive: never a match
    ext = torch.cat([sentinel, keys, sentinel])  # ext[i + 1] == keys[i]
    columns = torch.tensor(_SEARCHED_COLUMNS, device=device) * stride
    query = keys[None, :] + ((columns[:, 0] << (2 * _COORD_BITS)) + (columns[:, 1] << _COORD_BITS))[:, None]  # [4, N]
    pos = torch.searchsorted(keys, query)
    at = ext[pos + 1] == query
    above = pos + at  # where q + s sits if present
    found = torch.cat([
        torch.where(ext[pos] == query - stride, pos - 1, -1),
        torch.where(at, pos, -1),
        torch.where(ext[above + 1] == query + stride, above, -1),
    ])  # [12, N]: the row read through offset _SEARCHED[j], -1 where absent
    hit = found >= 0
    src = found[hit]
    which, dst = hit.nonzero().unbind(1)  # row-major, like src
    counts = torch.bincount(which, minlength=len(_SEARCHED)).tolist()
    rows = torch.nonzero(ext[2:] == keys + stride).squeeze(1)  # row i + 1 is row i's z + s neighbour
    segments = {9 * 2 + 4: (rows + 1, rows), 4: (rows, rows + 1)}  # offsets (0, 0, +1) and (0, 0, -1)
    start = 0
    for k, count in zip(_SEARCHED, counts):
        pair = (src[start : start + count], dst[start : start + count])
        segments[k], segments[26 - k] = pair, pair[::-1]
        start += count
    order = [k for k in range(27) if k != _CENTRE]
    return (torch.cat([segments[k][0] for k in order]), torch.cat([segments[k][1] for k in order]),
            [0 if k == _CENTRE else segments[k][0].numel() for k in range(27)])


@runtime_checkable
class Coordinates(Protocol):
    """What a :class:`SparseTensor` holds as its ``manager``: the coordinate sets of one
    voxelised input, per tensor stride, and the convolutions between them. Convolution
    modules ask the tensor's manager to run them, so the same networks and weights run on
    any backend that provides these three methods (:class:`CoordinateManager` here,
    ``lidar_completion.minkowski.MinkowskiCoordinates`` on MinkowskiEngine)."""

    def coordinates(self, stride: int) -> torch.Tensor:
        """``(batch, x, y, z)`` int64 rows of the stride-``stride`` set, in row order."""
        ...

    def convolve(self, x: "SparseTensor", kernel: torch.Tensor, kernel_size: int, stride: int) -> "SparseTensor":
        """MinkowskiConvolution of ``x``: k=3/1 stride 1 keeps the coordinates, k=2 s=2 halves them."""
        ...

    def convolve_transpose(self, x: "SparseTensor", kernel: torch.Tensor) -> "SparseTensor":
        """MinkowskiConvolutionTranspose k=2 s=2 of ``x`` onto the finer set that already exists."""
        ...


@dataclass
class CoordinateManager:
    """Coordinate sets per tensor stride and cached kernel maps, shared by one forward: the
    pure-PyTorch :class:`Coordinates`.

    ``gemm_dtype`` (None: the features' own, exact) is the dtype float32 features and kernels
    are multiplied in: ``torch.bfloat16`` runs every convolution's gathers and GEMMs in
    bfloat16 (float32 in and out; the ``torch-bf16`` backend), about 3x faster on a CPU with
    bfloat16 instructions, each output within ~0.5% of the float32 one."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    coords: dict[int, torch.Tensor] = field(default_factory=dict)
    _maps: dict[tuple, KernelMap] = field(default_factory=dict)
    gemm_dtype: torch.dtype | None = None

    def add(self, stride: int, keys: torch.Tensor) -> None:
        self.keys[stride] = keys
        self.coords[stride] = unpack(keys)

    def coordinates(self, stride: int) -> torch.Tensor:
        """``(batch, x, y, z)`` int64 rows of the stride-``stride`` set, in row order."""
        return self.coords[stride]

    def _gemm_inputs(self, x: "SparseTensor", kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """Features and kernel as the GEMMs take them (autocast's dtype, else ``gemm_dtype``
        for float32 ones), and the dtype the output goes back to."""
        x, kernel = _autocast(x, kernel)
        feats = x.feats
        if self.gemm_dtype is None or feats.dtype != torch.float32:
            return feats, kernel, feats.dtype
        return feats.to(self.gemm_dtype), _cast_weight(kernel, self.gemm_dtype), feats.dtype

    def convolve(self, x: "SparseTensor", kernel: torch.Tensor, kernel_size: int, stride: int) -> "SparseTensor":
        """MinkowskiConvolution: k=3/1 stride 1 keeps the coordinates, k=2 s=2 halves them."""
        feats, kernel, dtype = self._gemm_inputs(x, kernel)
        if kernel_size == 1:
            return x.replace((feats @ kernel).to(dtype))
        if stride == 1:
            kmap = self.submanifold_map(x.stride, kernel_size)
            if _use_table(kmap, feats.shape[1], kernel.shape[-1], feats.dtype):
                return x.replace(_convolve_table(feats, kmap.table, kernel).to(dtype))
            return x.replace(_convolve(feats, kmap, kernel).to(dtype))
        kmap = self.downsample_map(x.stride)
        return SparseTensor(_convolve(feats, kmap, kernel).to(dtype), 2 * x.stride, self)

    def convolve_transpose(self, x: "SparseTensor", kernel: torch.Tensor) -> "SparseTensor":
        """MinkowskiConvolutionTranspose k=2 s=2 onto the finer set that already exists."""
        fine = x.stride // 2
        if fine < 1 or fine not in self.keys:
            raise ValueError(f"no stride-{fine} coordinates to transpose onto")
        feats, kernel, dtype = self._gemm_inputs(x, kernel)
        kmap = self.downsample_map(fine).transposed()
        return SparseTensor(_convolve(feats, kmap, kernel).to(dtype), fine, self)

    def submanifold_map(self, stride: int, kernel_size: int) -> KernelMap:
        """Neighbours within one coordinate set (stride-1 conv, output coords = input coords):
        :func:`submanifold_pairs`."""
        if kernel_size != 3:
            raise ValueError(f"submanifold maps are built for kernel_size 3, got {kernel_size}")
        cache_key = ("sub", stride, kernel_size)
        if cache_key not in self._maps:
            keys, coords = self.keys[stride], self.coords[stride]
            _check_coordinate_range(coords, margin=stride)
            src, dst, counts = submanifold_pairs(keys, stride)
            self._maps[cache_key] = KernelMap(src, dst, counts, keys.numel(), keys.numel(), identity=_CENTRE)
        return self._maps[cache_key]

    def downsample_map(self, stride: int) -> KernelMap:
        """k=2, s=2 map from stride ``s`` to ``2s``; creates the coarser coordinate set.

        Each fine voxel ``c`` feeds the coarse voxel ``floor(c / 2s) * 2s`` through the
        offset ``(c - parent) / s`` in {0,1}^3. The transposed conv uses the same pairs
        with input and output swapped (:meth:`KernelMap.transposed`).
        """
        cache_key = ("down", stride)
        if cache_key not in self._maps:
            coarse = 2 * stride
            coords = self.coords[stride]
            parent = coords.clone()
            parent[:, 1:] = torch.div(coords[:, 1:], coarse, rounding_mode="floor") * coarse
            parent_keys, inverse = torch.unique(pack(parent), sorted=True, return_inverse=True)
            if coarse not in self.keys:
                self.add(coarse, parent_keys)
            bits = (coords[:, 1:] - parent[:, 1:]) // stride
            offset_index = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]
            order = torch.argsort(offset_index, stable=True)  # offset-major, fine rows ascending
            counts = torch.bincount(offset_index, minlength=8).tolist()
            self._maps[cache_key] = KernelMap(order, inverse[order], counts, coords.shape[0], parent_keys.numel())
        return self._maps[cache_key]


def _cast_weight(kernel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``kernel.to(dtype)``, kept on the kernel while it is unchanged (same storage, same
    version) when no gradient can flow: a network's weights are cast once, not per call."""
    if kernel.requires_grad and torch.is_grad_enabled():
        return kernel.to(dtype)
    stamp = (kernel.data_ptr(), kernel._version, kernel.device, dtype)
    cached = getattr(kernel, "_gemm_cast", None)
    if cached is None or cached[0] != stamp:
        cached = (stamp, kernel.to(dtype))
        setattr(kernel, "_gemm_cast", cached)  # the weight's own cache: it dies with the weight
    return cached[1]


def _autocast(x: "SparseTensor", kernel: torch.Tensor) -> tuple["SparseTensor", torch.Tensor]:
    """Features and kernel in autocast's dtype when autocast is on (a GEMM of the lower
    precision, as autocast runs ``mm``), else unchanged; the gathers and scatters need one dtype."""
    device = x.feats.device.type
    if not torch.is_autocast_enabled(device):
        return x, kernel
    dtype = torch.get_autocast_dtype(device)
    return x.replace(x.feats.to(dtype)), kernel.to(dtype)


@dataclass
class SparseTensor:
    """Features on a sorted set of voxel coordinates at one tensor stride."""

    feats: torch.Tensor
    stride: int
    manager: Coordinates

    @property
    def coords(self) -> torch.Tensor:
        return self.manager.coordinates(self.stride)

    @property
    def batch(self) -> torch.Tensor:
        return self.coords[:, 0]

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        return SparseTensor(feats, self.stride, self.manager)

    def __mul__(self, other: torch.Tensor) -> "SparseTensor":
        """Row-wise product with a dense [N, C] tensor (per-voxel conditioning)."""
        return self.replace(self.feats * other)

    def __add__(self, other: "SparseTensor") -> "SparseTensor":
        _check_same_coords(self, other)
        return self.replace(self.feats + other.feats)


@dataclass
class PointField:
    """Points and the voxel each one fell into: read network outputs back per point."""

    points: torch.Tensor
    voxel_of_point: torch.Tensor
    sparse: SparseTensor

    def slice(self, tensor: SparseTensor) -> torch.Tensor:
        """Per-point features of a stride-1 tensor on this field's voxels."""
        if tensor.manager is not self.sparse.manager or tensor.stride != 1:
            raise ValueError("can only slice a stride-1 tensor built from this field")
        return tensor.feats.index_select(0, self.voxel_of_point)


def field_inputs(
    points: torch.Tensor, batch: torch.Tensor | None, feats: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(points, batch, feats)`` checked, with the defaults every backend's ``voxelize``
    uses: batch 0 for every point, the point position itself as the feature (LiDiff)."""
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    if batch is None:
        batch = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    return points, batch, points if feats is None else feats


def voxelize(
    points: torch.Tensor,
    batch: torch.Tensor | None,
    voxel_size: float,
    feats: torch.Tensor | None = None,
    gemm_dtype: torch.dtype | None = None,
) -> PointField:
    """Quantise points to ``round(p / voxel_size)`` and average features per voxel.

    This is MinkowskiEngine's ``TensorField(..., UNWEIGHTED_AVERAGE).sparse()`` as used by
    LiDiff: the default feature is the point position itself. The tensors it returns run
    their convolutions in pure PyTorch (GEMMs in ``gemm_dtype``: :class:`CoordinateManager`);
    ``lidar_completion.backends.voxelize`` picks a backend by name.
    """
    points, batch, feats = field_inputs(points, batch, feats)
    grid = torch.round(points / voxel_size).long()
    coords = torch.cat([batch.long().view(-1, 1), grid], dim=1)
    keys, inverse = torch.unique(pack(coords), sorted=True, return_inverse=True)
    manager = CoordinateManager(gemm_dtype=gemm_dtype)
    manager.add(1, keys)
    sums = feats.new_zeros(keys.numel(), feats.shape[1]).index_add_(0, inverse, feats)
    counts = torch.bincount(inverse, minlength=keys.numel()).clamp_(min=1)
    sparse = SparseTensor(sums / counts.unsqueeze(1).to(feats.dtype), 1, manager)
    return PointField(points, inverse, sparse)


class TorchBackend:
    """The built-in backend (a :class:`lidar_completion.backends.SparseBackend`): plain
    tensor ops, on any device torch runs on. ``gemm_dtype=torch.bfloat16`` is the
    ``torch-bf16`` backend: the same maps, convolutions multiplied in bfloat16."""

    def __init__(self, gemm_dtype: torch.dtype | None = None, name: str = "torch"):
        self.gemm_dtype, self.name = gemm_dtype, name

    def check_device(self, device: torch.device | str) -> None:
        """Float32 runs wherever torch does; bfloat16 GEMMs need hardware that has them
        (without, they are emulated and slower than float32)."""
        if self.gemm_dtype != torch.bfloat16:
            return
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"backend {self.name!r}: this GPU has no bfloat16; use backend: torch")
        if device.type == "cpu" and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            raise RuntimeError(f"backend {self.name!r}: this CPU has no bfloat16 instructions (AVX512-BF16 "
                               "or AMX), so it would be slower than float32; use backend: torch")

    def voxelize(self, points: torch.Tensor, batch: torch.Tensor | None, voxel_size: float,
                 feats: torch.Tensor | None = None) -> PointField:
        return voxelize(points, batch, voxel_size, feats, self.gemm_dtype)


# Offsets are processed in groups of about this many bytes of gathered inputs + products:
# one gather, one bmm and one scatter per group instead of per offset (their fixed cost
# dominates narrow layers), while a group stays near the caches (larger groups measured up to
# 1.5x slower per layer on this 2-core CPU: bench_backends.py, the real scan at the preset).
_GROUP_BYTES = 4 << 20


def _no_autocast(device: torch.device):
    """A context with autocast off when it is on (the convolution's inputs are already cast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _pairs_forward(feats: torch.Tensor, kmap: KernelMap, kernel: torch.Tensor) -> torch.Tensor:
    num_out, cout = kmap.num_out, kernel.shape[-1]
    out = feats.new_empty(num_out + 1, cout)  # the last row takes the padding's products
    if kmap.identity is not None:
        torch.mm(feats, kernel[kmap.identity], out=out[:num_out])
    elif not kmap.dst_once:
        out.zero_()
    for group in kmap.groups((feats.shape[1] + cout) * feats.element_size()):
        # index_select, not feats[src]: the same gather, several times faster on CPU.
        gathered = feats.index_select(0, group.src).view(len(group.offsets), group.length, -1)
        products = torch.bmm(gathered, kernel.index_select(0, group.offsets)).view(-1, cout)
        if kmap.dst_once:
            out.index_copy_(0, group.dst, products)
        else:
            out.index_add_(0, group.dst, products)
    return out[:num_out]


def _pairs_backward(grad_out: torch.Tensor, feats: torch.Tensor, kmap: KernelMap, kernel: torch.Tensor,
                    need_feats: bool, need_kernel: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`_pairs_forward`: the same pairs read backwards (input rows
    receive ``grad_out[dst] @ W_k^T``), and ``W_k`` gets ``feats[src]^T @ grad_out[dst]``;
    the padding reads a zero gradient row."""
    grad_feats = grad_kernel = None
    if need_feats:
        if kmap.identity is not None:
            grad_feats = grad_out.mm(kernel[kmap.identity].T)
        else:
            grad_feats = grad_out.new_zeros(kmap.num_in, feats.shape[1])
    if need_kernel:
        grad_kernel = torch.zeros_like(kernel)
        if kmap.identity is not None:
            torch.mm(feats.T, grad_out, out=grad_kernel[kmap.identity])
    padded = torch.cat([grad_out, grad_out.new_zeros(1, grad_out.shape[1])])
    for group in kmap.groups((feats.shape[1] + grad_out.shape[1]) * feats.element_size()):
        shape = (len(group.offsets), group.length, -1)
        grad_rows = padded.index_select(0, group.dst).view(shape)
        if need_feats:
            assert grad_feats is not None
            weights = kernel.index_select(0, group.offsets).transpose(1, 2)
            grad_feats.index_add_(0, group.src, torch.bmm(grad_rows, weights).view(-1, feats.shape[1]))
        if need_kernel:
            assert grad_kernel is not None
            gathered = feats.index_select(0, group.src).view(shape)
            grad_kernel.index_add_(0, group.offsets, torch.bmm(gathered.transpose(1, 2), grad_rows))
    return grad_feats, grad_kernel


class _PairsConvolution(torch.autograd.Function):
    """Gather-GEMM-scatter over a :class:`KernelMap` with its own backward (the same pairs,
    no graph of hundreds of small ops, nothing kept but the inputs)."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, kernel: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        ctx.kmap = kmap
        ctx.save_for_backward(feats, kernel)
        with _no_autocast(feats.device):
            return _pairs_forward(feats, kmap, kernel)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feats, kernel = ctx.saved_tensors
        with _no_autocast(feats.device):
            grad_feats, grad_kernel = _pairs_backward(grad_out.contiguous(), feats, ctx.kmap, kernel,
                                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_feats, grad_kernel, None


def _convolve(feats: torch.Tensor, kmap: KernelMap, kernel: torch.Tensor) -> torch.Tensor:
    """out[o] = sum over (i, o) pairs of offset k: feats[i] @ kernel[k] (gather-GEMM-scatter)."""
    if feats.shape[0] != kmap.num_in:
        raise ValueError(f"features have {feats.shape[0]} rows, the kernel map {kmap.num_in}")
    if torch.is_grad_enabled() and (feats.requires_grad or kernel.requires_grad):
        return _PairsConvolution.apply(feats, kernel, kmap)
    with _no_autocast(feats.device):
        return _pairs_forward(feats, kmap, kernel)


def _use_table(kmap: KernelMap, cin: int, cout: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the output-stationary GEMM (:func:`_convolve_table`) is expected to beat the
    batched gather-GEMM-scatter for this map: it multiplies zeros for absent neighbours
    (1 / fill times the pairs' work) but does one GEMM and no scatter. Measured per layer on
    the real scan (``benchmarks/bench_backends.py --paths``), it only wins on nearly full
    neighbourhoods, sooner in bfloat16 (a GEMM there costs less next to the scatter)."""
    if kmap.identity is None:  # only submanifold maps have a table
        return False
    volume = len(kmap.counts)
    if kmap.num_out * volume * cin * torch.finfo(dtype).bits // 8 > _TABLE_CONV_MAX_BYTES:
        return False
    fill = kmap.num_pairs / max(1, kmap.num_out * volume)
    return fill >= (_TABLE_MIN_FILL_BF16 if dtype == torch.bfloat16 else _TABLE_MIN_FILL)


# Least neighbourhood fill (pairs / (outputs x 27)) at which _use_table picks the table GEMM,
# and the largest gathered neighbour matrix it builds.
_TABLE_MIN_FILL = 0.8
_TABLE_MIN_FILL_BF16 = 0.6
_TABLE_CONV_MAX_BYTES = 16 << 20


def _convolve_table(feats: torch.Tensor, table: torch.Tensor, kernel: torch.Tensor, chunk_bytes: int = 1 << 25) -> torch.Tensor:
    """The same sum as :func:`_convolve`, output-stationary (an implicit GEMM): gather each
    output's K neighbours (a zero row where absent) into one [rows, K * in] matrix and do
    one GEMM. No scatter, one large GEMM instead of K small ones; it multiplies zeros for
    absent neighbours, so it pays off for dense neighbourhoods and narrow layers. Rows go in
    chunks of at most ``chunk_bytes`` of gathered features."""
    num_out, volume = table.shape
    cin = feats.shape[1]
    padded = torch.cat([feats, feats.new_zeros(1, cin)])
    weight = kernel.reshape(volume * cin, kernel.shape[-1])
    step = max(1, chunk_bytes // (volume * cin * feats.element_size()))
    parts = [
        padded.index_select(0, table[start : start + step].reshape(-1)).reshape(-1, volume * cin).mm(weight)
        for start in range(0, num_out, step)
    ]
    if not parts:
        return feats.new_zeros(0, kernel.shape[-1])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class SparseConv(nn.Module):
    """MinkowskiConvolution (no bias): k=3/1 with stride 1, or k=2 with stride 2.

    The ``kernel`` parameter has MinkowskiEngine's layout and name: [K, in, out], or
    [in, out] for a 1x1x1 kernel, so published state dicts load unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        if (kernel_size, stride) not in {(3, 1), (1, 1), (2, 2)}:
            raise ValueError(f"unsupported kernel_size={kernel_size}, stride={stride}")
        self.kernel_size, self.stride = kernel_size, stride
        volume = kernel_size**3
        shape = (in_channels, out_channels) if volume == 1 else (volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        bound = 1.0 / (in_channels * volume) ** 0.5
        nn.init.uniform_(self.kernel, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.manager.convolve(x, self.kernel, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel={tuple(self.kernel.shape)}, stride={self.stride}"


class SparseConvTranspose(nn.Module):
    """MinkowskiConvolutionTranspose k=2, s=2 onto the finer coordinates that already exist."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2):
        super().__init__()
        if (kernel_size, stride) != (2, 2):
            raise ValueError("only kernel_size=2, stride=2 transposed convolution is used")
        self.kernel = nn.Parameter(torch.empty(8, in_channels, out_channels))
        nn.init.uniform_(self.kernel, -1.0 / (in_channels * 8) ** 0.5, 1.0 / (in_channels * 8) ** 0.5)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.manager.convolve_transpose(x, self.kernel)


class SparseBatchNorm(nn.Module):
    """MinkowskiBatchNorm: a BatchNorm1d stored under ``.bn`` (state-dict key ``bn.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        bn = self.bn
        if bn.training or bn.running_mean is None or bn.running_var is None or bn.weight is None or bn.bias is None:
            return x.replace(bn(x.feats))
        # Evaluation: the same per-channel affine map as batch_norm, as one fused multiply-add
        # (batch_norm is 2-3x slower on [N, C] rows of a few dozen channels on CPU).
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        dtype = x.feats.dtype
        return x.replace(torch.addcmul(shift.to(dtype), x.feats, scale.to(dtype)))


class SparseReLU(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(torch.relu(x.feats))


def _check_same_coords(a: SparseTensor, b: SparseTensor) -> None:
    if a.manager is not b.manager or a.stride != b.stride:
        raise ValueError("sparse tensors are not on the same coordinates")


def cat(*tensors: SparseTensor) -> SparseTensor:
    """Channel concatenation of tensors on the same coordinates (``ME.cat``)."""
    for t in tensors[1:]:
        _check_same_coords(tensors[0], t)
    return tensors[0].replace(torch.cat([t.feats for t in tensors], dim=1))
