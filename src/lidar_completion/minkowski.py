"""Optional MinkowskiEngine 0.5.4 backend: the same networks, run on MinkowskiEngine.

This is the only module that imports MinkowskiEngine; :class:`MinkowskiBackend` is its
entry in :mod:`lidar_completion.backends`. :class:`MinkowskiCoordinates` keeps the contract
of :class:`lidar_completion.sparse.Coordinates`: :func:`voxelize` quantises with
MinkowskiEngine's own ``TensorField(..., UNWEIGHTED_AVERAGE).sparse()`` (as LiDiff does),
and every convolution on the tensors it returns calls MinkowskiEngine's convolution
functions with the network's own kernels. So one set of modules and weights runs on
either backend, and the two can be compared number for number
(``tests/test_minkowski.py``, ``benchmarks/bench_denoiser.py``).

MinkowskiEngine is not a dependency: install it with ``scripts/install_minkowski.sh``.
Row order differs from the torch backend (MinkowskiEngine keeps hash-map order); nothing
downstream depends on it (outputs are read back per point, and the nearest-encoder-voxel
search breaks ties by coordinates, not rows).
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import warnings
from types import ModuleType

import torch

from .sparse import PointField, SparseTensor, field_inputs

__all__ = ["available", "require", "voxelize", "MinkowskiBackend", "MinkowskiCoordinates", "INSTALL_HINT"]

INSTALL_HINT = "install it with ./scripts/install_minkowski.sh, or use backend: torch"


@functools.cache
def _engine() -> ModuleType | None:
    """Import MinkowskiEngine once, or None when it is not installed or fails to load."""
    # Python >= 3.10 dropped these aliases; MinkowskiEngine 0.5.4 still imports them.
    for name in ("Sequence", "Iterable", "Mapping", "MutableMapping"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    try:
        with warnings.catch_warnings():  # "compiled with CPU_ONLY": require() says it when it matters
            warnings.simplefilter("ignore", UserWarning)
            import MinkowskiEngine as ME
    except Exception:  # ImportError, or a compiled extension built against another torch
        return None
    return ME


def available() -> bool:
    """True when MinkowskiEngine imports in this environment."""
    return _engine() is not None


def require(device: torch.device | str = "cpu") -> ModuleType:
    """MinkowskiEngine, or a clear error saying why it cannot be used on ``device``."""
    ME = _engine()
    if ME is None:
        raise RuntimeError(f"backend 'minkowski' requested but MinkowskiEngine is not importable: {INSTALL_HINT}")
    if torch.device(device).type == "cuda" and not ME.is_cuda_available():
        raise RuntimeError("this MinkowskiEngine build is CPU-only; rebuild with ME_CUDA=1 or use device: cpu")
    return ME


@functools.cache
def _kernel_generator(kernel_size: int, stride: int):
    ME = require()
    return ME.KernelGenerator(kernel_size=kernel_size, stride=stride, dilation=1, dimension=3)


class MinkowskiCoordinates:
    """A MinkowskiEngine ``CoordinateManager`` as a :class:`~lidar_completion.sparse.Coordinates`
    (``coordinates``, ``convolve``, ``convolve_transpose``), one coordinate-map key per tensor stride."""

    def __init__(self, manager, key_at_stride_1):
        self.manager = manager
        self.keys = {1: key_at_stride_1}
        self._coords: dict[int, torch.Tensor] = {}

    def coordinates(self, stride: int) -> torch.Tensor:
        if stride not in self._coords:
            self._coords[stride] = self.manager.get_coordinates(self.keys[stride]).long()
        return self._coords[stride]

    def _run(self, function: str, x: SparseTensor, kernel: torch.Tensor, kernel_size: int, stride: int, out_stride: int):
        """MinkowskiEngine's autograd ``function`` (a name in its namespace) from ``x``'s
        coordinate map onto the one at ``out_stride``."""
        from MinkowskiEngineBackend._C import ConvolutionMode

        ME = require()
        out_key = ME.CoordinateMapKey(4)  # filled in by MinkowskiEngine, as its modules do
        feats = getattr(ME, function).apply(
            x.feats, kernel, _kernel_generator(kernel_size, stride), ConvolutionMode.DEFAULT,
            self.keys[x.stride], out_key, self.manager,
        )
        known = self.keys.setdefault(out_stride, out_key)
        if known.get_key() != out_key.get_key():
            raise RuntimeError(f"MinkowskiEngine produced a second coordinate map at stride {out_stride}")
        return SparseTensor(feats, out_stride, self)

    def convolve(self, x: SparseTensor, kernel: torch.Tensor, kernel_size: int, stride: int) -> SparseTensor:
        if kernel_size == 1:  # MinkowskiConvolution's own shortcut for 1x1x1 kernels
            return x.replace(x.feats.mm(kernel))
        return self._run("MinkowskiConvolutionFunction", x, kernel, kernel_size, stride, x.stride * stride)

    def convolve_transpose(self, x: SparseTensor, kernel: torch.Tensor) -> SparseTensor:
        fine = x.stride // 2
        if fine not in self.keys:
            raise ValueError(f"no stride-{fine} coordinates to transpose onto")
        return self._run("MinkowskiConvolutionTransposeFunction", x, kernel, 2, 2, fine)


def voxelize(points: torch.Tensor, batch: torch.Tensor | None, voxel_size: float,
             feats: torch.Tensor | None = None) -> PointField:
    """LiDiff's quantisation on MinkowskiEngine: a ``TensorField`` of ``round(p / voxel)``
    coordinates with unweighted averaging, its ``sparse()`` tensor and the point-to-voxel
    inverse map used to slice outputs back to the points."""
    points, batch, feats = field_inputs(points, batch, feats)
    ME = require(points.device)
    if points.shape[0] == 0:
        raise ValueError("cannot voxelise an empty point set on MinkowskiEngine")
    coords = torch.cat([batch.view(-1, 1).to(points.dtype), torch.round(points / voxel_size)], dim=1)
    # MinkowskiEngine sets the process's OpenMP thread count to its manager's (default: all
    # cores), which would silently change torch's: give it torch's own, and put it back.
    threads = torch.get_num_threads()
    engine_manager = ME.CoordinateManager(
        D=3,
        num_threads=threads,
        coordinate_map_type=ME.CoordinateMapType.CUDA if points.is_cuda else ME.CoordinateMapType.CPU,
        minkowski_algorithm=ME.MinkowskiAlgorithm.SPEED_OPTIMIZED,
    )
    field = ME.TensorField(
        features=feats,
        coordinates=coords,
        quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE,
        coordinate_manager=engine_manager,
        device=points.device,
    )
    sparse = field.sparse()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    inverse = field.inverse_mapping(sparse.coordinate_map_key).long()
    coordinates = MinkowskiCoordinates(engine_manager, sparse.coordinate_map_key)
    return PointField(points, inverse, SparseTensor(sparse.F, 1, coordinates))


class MinkowskiBackend:
    """MinkowskiEngine as a :class:`lidar_completion.backends.SparseBackend` (imported only
    when a check or a voxelisation needs it)."""

    name = "minkowski"

    def check_device(self, device: torch.device | str) -> None:
        """Fails, saying how to install or rebuild it, when MinkowskiEngine cannot run on ``device``."""
        require(device)

    def voxelize(self, points: torch.Tensor, batch: torch.Tensor | None, voxel_size: float,
                 feats: torch.Tensor | None = None) -> PointField:
        return voxelize(points, batch, voxel_size, feats)
