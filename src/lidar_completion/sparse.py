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


@dataclass
class KernelMap:
    """For each kernel offset k: (input rows, output rows) that offset connects.

    Submanifold maps also keep the neighbour table [num_out, K]: the input row each output
    reads through each offset, ``num_in`` (a zero row) where there is none.
    """

    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    num_out: int
    table: torch.Tensor | None = None


def _packed_shifts(offsets: torch.Tensor) -> torch.Tensor:
    """Key differences of xyz shifts: ``pack(c + o) == pack(c) + shift(o)`` as long as every
    shifted coordinate stays in the packed range (no carry between fields)."""
    return (offsets[:, 0] << (2 * _COORD_BITS)) + (offsets[:, 1] << _COORD_BITS) + offsets[:, 2]


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
    pure-PyTorch :class:`Coordinates`."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    coords: dict[int, torch.Tensor] = field(default_factory=dict)
    _maps: dict[tuple, KernelMap] = field(default_factory=dict)

    def add(self, stride: int, keys: torch.Tensor) -> None:
        self.keys[stride] = keys
        self.coords[stride] = unpack(keys)

    def coordinates(self, stride: int) -> torch.Tensor:
        """``(batch, x, y, z)`` int64 rows of the stride-``stride`` set, in row order."""
        return self.coords[stride]

    def convolve(self, x: "SparseTensor", kernel: torch.Tensor, kernel_size: int, stride: int) -> "SparseTensor":
        """MinkowskiConvolution: k=3/1 stride 1 keeps the coordinates, k=2 s=2 halves them."""
        x, kernel = _autocast(x, kernel)
        if kernel_size == 1:
            return x.replace(x.feats @ kernel)
        if stride == 1:
            kmap = self.submanifold_map(x.stride, kernel_size)
            gathered_bytes = kmap.table.numel() * x.feats.shape[1] * x.feats.element_size()
            if gathered_bytes <= _TABLE_CONV_MAX_BYTES:
                return x.replace(_convolve_table(x.feats, kmap.table, kernel))
            return x.replace(_convolve(x.feats, kmap.pairs, kernel, kmap.num_out))
        kmap = self.downsample_map(x.stride)
        return SparseTensor(_convolve(x.feats, kmap.pairs, kernel, kmap.num_out), 2 * x.stride, self)

    def convolve_transpose(self, x: "SparseTensor", kernel: torch.Tensor) -> "SparseTensor":
        """MinkowskiConvolutionTranspose k=2 s=2 onto the finer set that already exists."""
        x, kernel = _autocast(x, kernel)
        fine = x.stride // 2
        if fine < 1 or fine not in self.keys:
            raise ValueError(f"no stride-{fine} coordinates to transpose onto")
        kmap = self.downsample_map(fine)
        swapped = [(dst, src) for src, dst in kmap.pairs]
        return SparseTensor(_convolve(x.feats, swapped, kernel, self.keys[fine].numel()), fine, self)

    def submanifold_map(self, stride: int, kernel_size: int) -> KernelMap:
        """Neighbours within one coordinate set (stride-1 conv, output coords = input coords):
        one ``searchsorted`` of every voxel's key shifted by every offset."""
        cache_key = ("sub", stride, kernel_size)
        if cache_key not in self._maps:
            keys, coords = self.keys[stride], self.coords[stride]
            offsets = kernel_offsets(kernel_size, keys.device) * stride
            _check_coordinate_range(coords, margin=int(offsets.abs().max()))
            query = keys[None, :] + _packed_shifts(offsets)[:, None]  # [K, N]
            found = lookup(keys, query.reshape(-1)).reshape(query.shape)
            rows = torch.arange(keys.numel(), device=keys.device)
            pairs = []
            for k, offset in enumerate(offsets):
                if not bool(offset.any()):
                    pairs.append((rows, rows))
                    continue
                hit = found[k] >= 0
                pairs.append((found[k][hit], rows[hit]))
            table = torch.where(found >= 0, found, keys.numel()).T.contiguous()
            self._maps[cache_key] = KernelMap(pairs, keys.numel(), table)
        return self._maps[cache_key]

    def downsample_map(self, stride: int) -> KernelMap:
        """k=2, s=2 map from stride ``s`` to ``2s``; creates the coarser coordinate set.

        Each fine voxel ``c`` feeds the coarse voxel ``floor(c / 2s) * 2s`` through the
        offset ``(c - parent) / s`` in {0,1}^3. The transposed conv uses the same pairs
        with input and output swapped.
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
            rows = torch.arange(coords.shape[0], device=coords.device)
            pairs = [
                (rows[offset_index == k], inverse[offset_index == k]) for k in range(8)
            ]
            self._maps[cache_key] = KernelMap(pairs, parent_keys.numel())
        return self._maps[cache_key]


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
) -> PointField:
    """Quantise points to ``round(p / voxel_size)`` and average features per voxel.

    This is MinkowskiEngine's ``TensorField(..., UNWEIGHTED_AVERAGE).sparse()`` as used by
    LiDiff: the default feature is the point position itself. The tensors it returns run
    their convolutions in pure PyTorch; ``lidar_completion.backends.voxelize`` picks a
    backend by name.
    """
    points, batch, feats = field_inputs(points, batch, feats)
    grid = torch.round(points / voxel_size).long()
    coords = torch.cat([batch.long().view(-1, 1), grid], dim=1)
    keys, inverse = torch.unique(pack(coords), sorted=True, return_inverse=True)
    manager = CoordinateManager()
    manager.add(1, keys)
    sums = feats.new_zeros(keys.numel(), feats.shape[1]).index_add_(0, inverse, feats)
    counts = torch.bincount(inverse, minlength=keys.numel()).clamp_(min=1)
    sparse = SparseTensor(sums / counts.unsqueeze(1).to(feats.dtype), 1, manager)
    return PointField(points, inverse, sparse)


class TorchBackend:
    """The built-in backend (a :class:`lidar_completion.backends.SparseBackend`): plain
    tensor ops, on any device torch runs on."""

    name = "torch"

    def check_device(self, device: torch.device | str) -> None:
        """Nothing to check: this backend runs wherever torch does."""

    def voxelize(self, points: torch.Tensor, batch: torch.Tensor | None, voxel_size: float,
                 feats: torch.Tensor | None = None) -> PointField:
        return voxelize(points, batch, voxel_size, feats)


# Offsets are processed in groups of about this many bytes of gathered inputs + products:
# one gather and one scatter per group instead of per offset (their fixed cost dominates
# narrow layers), while a wide layer's offsets still go one at a time (bounded memory).
_GROUP_BYTES = 16 << 20


def _convolve(
    feats: torch.Tensor,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    kernel: torch.Tensor,
    num_out: int,
) -> torch.Tensor:
    """out[o] = sum over (i, o) pairs of offset k: feats[i] @ kernel[k] (gather-GEMM-scatter)."""
    out = feats.new_zeros(num_out, kernel.shape[-1])
    row_bytes = (feats.shape[1] + kernel.shape[-1]) * feats.element_size()
    group: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        src = torch.cat([s for _, s, _ in group]) if len(group) > 1 else group[0][1]
        dst = torch.cat([d for _, _, d in group]) if len(group) > 1 else group[0][2]
        # index_select, not feats[src]: the same gather, several times faster on CPU.
        gathered, products, start = feats.index_select(0, src), [], 0
        for k, s, _ in group:
            products.append(gathered[start : start + s.numel()].mm(kernel[k]))
            start += s.numel()
        out.index_add_(0, dst, torch.cat(products) if len(products) > 1 else products[0])
        group.clear()

    rows = 0
    for k, (src, dst) in enumerate(pairs):
        if src.numel() == 0:
            continue
        if src is dst and src.numel() == num_out == feats.shape[0]:  # centre tap: identity map
            out.addmm_(feats, kernel[k])
            continue
        if group and (rows + src.numel()) * row_bytes > _GROUP_BYTES:
            flush()
            rows = 0
        group.append((k, src, dst))
        rows += src.numel()
    if group:
        flush()
    return out


# Below this many bytes of gathered neighbour features, one gathered GEMM beats K
# gather-GEMM-scatter calls (their fixed cost dominates); above it the zeros it multiplies
# for absent neighbours cost more. Measured per layer on the real scan, 2 CPU threads.
_TABLE_CONV_MAX_BYTES = 8 << 20


def _convolve_table(feats: torch.Tensor, table: torch.Tensor, kernel: torch.Tensor, chunk_bytes: int = 1 << 25) -> torch.Tensor:
    """The same sum as :func:`_convolve`, output-stationary: gather each output's K
    neighbours (a zero row where absent) into one [rows, K * in] matrix and do one GEMM.
    No scatter, one large GEMM instead of K small ones; it multiplies zeros for absent
    neighbours, so it pays off for dense neighbourhoods and narrow layers. Rows go in
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
        return x.replace(self.bn(x.feats))


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
