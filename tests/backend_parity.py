"""Checks shared by the optional-backend tests (test_minkowski.py, test_spconv.py): two
backends keep different row orders, so tensors are compared by coordinate."""

from __future__ import annotations

from pathlib import Path

import torch

from lidar_completion import sparse as sp
from lidar_completion.backends import voxelize
from lidar_completion.networks import Denoiser, RefinementNet, ScanEncoder


def by_coordinates(tensor: sp.SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates and features in lexicographic order."""
    order = torch.argsort(sp.pack(tensor.coords))
    return tensor.coords[order], tensor.feats[order]


def assert_same_tensor(a: sp.SparseTensor, b: sp.SparseTensor, atol: float = 1e-4) -> None:
    assert a.stride == b.stride
    (ca, fa), (cb, fb) = by_coordinates(a), by_coordinates(b)
    assert torch.equal(ca, cb), "backends produced different coordinates"
    assert (fa - fb).abs().max().item() < atol


@torch.no_grad()
def assert_reproduces_reference_fixtures(shared_dir: Path, backend: str) -> None:
    """The published encoder, denoiser and refiner on ``backend`` give the reference outputs."""
    reference = torch.load(shared_dir / "reference" / "minkunet_reference.pt", weights_only=True)
    ratio, voxel = float(reference["channel_ratio"]), float(reference["voxel_size"])

    def load(net: torch.nn.Module, prefix: str) -> torch.nn.Module:
        net.load_state_dict({k[len(prefix):]: v for k, v in reference.items() if k.startswith(prefix)})
        return net.eval()

    encoder, denoiser = load(ScanEncoder(ratio), "encoder."), load(Denoiser(ratio), "denoiser.")
    refiner = load(RefinementNet(ratio), "refiner.")
    scan = encoder(voxelize(reference["partial_points"], None, voxel, backend=backend))
    noise = denoiser(voxelize(reference["noisy_points"], None, voxel, backend=backend), scan, reference["timestep"])
    assert (noise - reference["predicted_noise"]).abs().max().item() < 1e-4
    out = refiner(voxelize(reference["refine_input"], None, voxel, backend=backend))
    assert (out - reference["refine_output"]).abs().max().item() < 1e-4
