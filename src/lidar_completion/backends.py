"""Sparse-convolution backends: the contract, the registry by name, and the one check of a name.

A backend voxelises points into a :class:`~lidar_completion.sparse.PointField` whose sparse
tensors carry the backend's :class:`~lidar_completion.sparse.Coordinates`; every convolution
applied to them downstream runs on that backend. So one set of networks and weights runs on
any of them:

* ``torch``: :class:`lidar_completion.sparse.TorchBackend`, built in, plain tensor ops;
* ``torch-bf16``: the same with every convolution's GEMMs in bfloat16 (float32 in and out),
  ~3x faster convolutions on CPUs with bfloat16 instructions, outputs within ~0.5%;
* ``minkowski``: :class:`lidar_completion.minkowski.MinkowskiBackend`, MinkowskiEngine 0.5.4
  when installed (``scripts/install_minkowski.sh``); the only module that imports it;
* ``spconv``: :class:`lidar_completion.spconv_backend.SpconvBackend`, spconv 2.3 when
  installed (``scripts/install_spconv.sh``); the only module that imports it.

Every place that takes a backend name (the completion config, the training config, the ROS
parameter, the CLI, the model) validates it here, with :func:`check_backend`. This module
imports neither torch nor a backend until one is asked for, so configs can import it freely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .sparse import PointField

__all__ = ["SparseBackend", "BACKENDS", "check_backend", "get_backend", "voxelize"]


@runtime_checkable
class SparseBackend(Protocol):
    """What the model needs of a backend: its name, a device check that fails early with
    a useful message, and the voxelisation its tensors come from."""

    name: str

    def check_device(self, device: "torch.device | str") -> None:
        """Raise (saying what to do) when this backend cannot run on ``device``."""
        ...

    def voxelize(self, points: "torch.Tensor", batch: "torch.Tensor | None", voxel_size: float,
                 feats: "torch.Tensor | None" = None) -> "PointField":
        """Points [N, 3] (``batch`` [N] or None: all 0) quantised to ``round(p / voxel_size)``,
        features (default: the positions) averaged per voxel."""
        ...


def _torch() -> SparseBackend:
    from .sparse import TorchBackend

    return TorchBackend()


def _torch_bf16() -> SparseBackend:
    import torch

    from .sparse import TorchBackend

    return TorchBackend(torch.bfloat16, "torch-bf16")


def _minkowski() -> SparseBackend:
    from .minkowski import MinkowskiBackend

    return MinkowskiBackend()


def _spconv() -> SparseBackend:
    from .spconv_backend import SpconvBackend

    return SpconvBackend()


# name -> factory: the registry (a factory imports its module only when the backend is asked for)
_REGISTRY: dict[str, Callable[[], SparseBackend]] = {
    "torch": _torch, "torch-bf16": _torch_bf16, "minkowski": _minkowski, "spconv": _spconv,
}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)


def check_backend(name: str, key: str = "backend") -> str:
    """``name`` if it names a backend, else a ``ValueError`` naming the setting ``key``."""
    if name not in _REGISTRY:
        raise ValueError(f"{key}: must be one of {list(_REGISTRY)}, got {name!r}")
    return name


def get_backend(name: str, device: "torch.device | str | None" = None) -> SparseBackend:
    """The backend called ``name``; with ``device``, checked to run there (fails now, not mid-frame)."""
    backend = _REGISTRY[check_backend(name)]()
    if device is not None:
        backend.check_device(device)
    return backend


def voxelize(points: "torch.Tensor", batch: "torch.Tensor | None", voxel_size: float,
             feats: "torch.Tensor | None" = None, backend: "str | SparseBackend" = "torch") -> "PointField":
    """:meth:`SparseBackend.voxelize` of the backend ``backend`` (a name or a backend)."""
    return (get_backend(backend) if isinstance(backend, str) else backend).voxelize(points, batch, voxel_size, feats)
