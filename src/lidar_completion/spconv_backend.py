"""Optional spconv 2.3 backend: the same networks and weights, run on spconv's convolutions.

This is the only module that imports spconv; :class:`SpconvBackend` is its entry in
:mod:`lidar_completion.backends` (name ``spconv``). It exists to measure the torch backend
against another library on the same inputs (``benchmarks/bench_backends.py``), and runs the
published networks number for number (``tests/test_spconv.py``).

MinkowskiEngine semantics on spconv, per :class:`~lidar_completion.sparse.Coordinates`:

* spconv indexes voxels at each level's own scale, from 0: a coordinate set at tensor stride
  ``s`` is ``(c + bias) / s`` with ``bias`` a multiple of 2^8, so ``floor`` at every stride
  up to 256 is MinkowskiEngine's ``floor(c / 2s) * 2s``;
* indices go to spconv as (batch, z, y, x): spconv flattens a kernel with its first spatial
  axis slowest, so its kernel index is then MinkowskiEngine's ``dx + 3 dy + 9 dz`` (k=3) and
  ``dx + 2 dy + 4 dz`` (k=2), and a MinkowskiEngine kernel [K, in, out] is spconv's KRSC
  weight [out, K, in] by one permute;
* k=3 stride 1 is ``SubMConv3d`` (padding 1), k=2 stride 2 is ``SparseConv3d`` (padding 0),
  and the transposed k=2 conv is ``SparseInverseConv3d`` on the pairs of the stride-2 conv
  that made the coarser set (outputs on the finer set that already exists).

Voxelisation is the torch backend's (the same averaging, the same stride-1 rows); coarser
sets keep spconv's row order. spconv is not a dependency: ``scripts/install_spconv.sh``.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from .sparse import PointField, SparseTensor
from .sparse import voxelize as torch_voxelize

__all__ = ["available", "require", "voxelize", "SpconvBackend", "SpconvCoordinates", "INSTALL_HINT"]

INSTALL_HINT = "install it with ./scripts/install_spconv.sh, or use backend: torch"
_BIAS_ALIGN = 256  # the bias is a multiple of this: floor is exact at every stride up to it


@functools.cache
def _engine() -> ModuleType | None:
    """``spconv.pytorch`` once, or None when spconv is not installed or fails to load."""
    try:
        import spconv.pytorch as spconv_pytorch
        from spconv.pytorch import ops
    except Exception:  # ImportError, or a compiled extension that does not load here
        return None
    if not torch.cuda.is_available():
        # spconv 2.3.8's CPU backward asks torch.cuda for the current stream, which a CPU-only
        # torch refuses; CPU work runs on stream 0 (what its forward passes on CPU).
        ops.get_current_stream = lambda: 0
    return spconv_pytorch


def available() -> bool:
    """True when spconv imports in this environment."""
    return _engine() is not None


def require(device: torch.device | str = "cpu") -> ModuleType:
    """``spconv.pytorch``, or a clear error saying why it cannot be used on ``device``."""
    sp = _engine()
    if sp is None:
        raise RuntimeError(f"backend 'spconv' requested but spconv is not importable: {INSTALL_HINT}")
    if torch.device(device).type == "cuda":
        from cumm import tensorview

        if tensorview.is_cpu_only():
            raise RuntimeError("this spconv build is CPU-only; install a CUDA one (SPCONV_CUDA=cu120 "
                               "./scripts/install_spconv.sh) or use device: cpu")
    return sp


class SpconvCoordinates:
    """The coordinate sets of one voxelised input on spconv, as a
    :class:`~lidar_completion.sparse.Coordinates`: per tensor stride, spconv's int32 indices
    (batch, z, y, x) at that stride's scale; kernel pairs cached per stride and reused by
    every layer there (submanifold pairs; the stride-2 pairs also by the transposed conv)."""

    def __init__(self, coords: torch.Tensor):
        self.bias = int(-(-int(-coords[:, 1:].min()) // _BIAS_ALIGN) * _BIAS_ALIGN) if coords.numel() else 0
        shifted = coords[:, 1:] + self.bias
        self.batch_size = int(coords[:, 0].max()) + 1 if coords.numel() else 1
        extent = int(shifted.max()) + 1 if coords.numel() else 1
        # Every stride's grid covers the same space; spconv sizes its hash by it.
        self.shape = [-(-extent // _BIAS_ALIGN) * _BIAS_ALIGN] * 3
        self.indices: dict[int, torch.Tensor] = {
            1: torch.cat([coords[:, :1], shifted.flip(1)], dim=1).int().contiguous()
        }
        self._coords: dict[int, torch.Tensor] = {1: coords}
        self._pairs: dict[tuple, tuple] = {}

    def coordinates(self, stride: int) -> torch.Tensor:
        if stride not in self._coords:
            idx = self.indices[stride].long()
            self._coords[stride] = torch.cat([idx[:, :1], idx[:, 1:].flip(1) * stride - self.bias], dim=1)
        return self._coords[stride]

    def _spatial_shape(self, stride: int) -> list[int]:
        return [size // stride for size in self.shape]

    def _indice_pairs(self, stride: int, subm: bool):
        """(out indices, pairs, pair counts) of the k=3 submanifold (``subm``) or k=2 s=2 conv at ``stride``."""
        key = ("subm" if subm else "down", stride)
        if key not in self._pairs:
            sp = require()
            from spconv.core import ConvAlgo

            ksize, step, pad = ([3] * 3, [1] * 3, [1] * 3) if subm else ([2] * 3, [2] * 3, [0] * 3)
            out, pairs, counts = sp.ops.get_indice_pairs(
                self.indices[stride], self.batch_size, self._spatial_shape(stride), ConvAlgo.Native,
                ksize, step, pad, [1] * 3, [0] * 3, subm, False)
            self._pairs[key] = (out, pairs, counts)
            if not subm:
                self.indices.setdefault(2 * stride, out.contiguous())
        return self._pairs[key]

    @staticmethod
    def _weight(kernel: torch.Tensor) -> torch.Tensor:
        """MinkowskiEngine [K, in, out] -> spconv KRSC [out, K, in] (a 3-D view spconv accepts)."""
        return kernel.permute(2, 0, 1).contiguous()

    def convolve(self, x: SparseTensor, kernel: torch.Tensor, kernel_size: int, stride: int) -> SparseTensor:
        if kernel_size == 1:
            return x.replace(x.feats @ kernel)
        require()
        from spconv.core import ConvAlgo
        from spconv.pytorch import functional as F

        subm = stride == 1
        out, pairs, counts = self._indice_pairs(x.stride, subm)
        apply = F.indice_subm_conv if subm else F.indice_conv
        result = apply(x.feats.contiguous(), self._weight(kernel), pairs, counts, out.shape[0], ConvAlgo.Native)
        return SparseTensor(result, x.stride * stride, self)

    def convolve_transpose(self, x: SparseTensor, kernel: torch.Tensor) -> SparseTensor:
        fine = x.stride // 2
        if fine < 1 or fine not in self.indices:
            raise ValueError(f"no stride-{fine} coordinates to transpose onto")
        require()
        from spconv.core import ConvAlgo
        from spconv.pytorch import functional as F

        _, pairs, counts = self._indice_pairs(fine, subm=False)
        result = F.indice_inverse_conv(x.feats.contiguous(), self._weight(kernel), pairs, counts,
                                       self.indices[fine].shape[0], ConvAlgo.Native)
        return SparseTensor(result, fine, self)


def voxelize(points: torch.Tensor, batch: torch.Tensor | None, voxel_size: float,
             feats: torch.Tensor | None = None) -> PointField:
    """The torch backend's voxelisation (same averaging, same stride-1 rows), its tensors on spconv."""
    require(points.device)
    field = torch_voxelize(points, batch, voxel_size, feats)
    coordinates = SpconvCoordinates(field.sparse.coords)
    return PointField(field.points, field.voxel_of_point, SparseTensor(field.sparse.feats, 1, coordinates))


class SpconvBackend:
    """spconv as a :class:`lidar_completion.backends.SparseBackend` (imported only when a
    check or a voxelisation needs it)."""

    name = "spconv"

    def check_device(self, device: torch.device | str) -> None:
        """Fails, saying how to install it, when spconv cannot run on ``device``."""
        require(device)

    def voxelize(self, points: torch.Tensor, batch: torch.Tensor | None, voxel_size: float,
                 feats: torch.Tensor | None = None) -> PointField:
        return voxelize(points, batch, voxel_size, feats)
