"""The optional spconv backend: the same networks on spconv and on the torch backend, number for number.

Everything but the first tests needs spconv (``scripts/install_spconv.sh``) and is skipped
without it; CI does not install it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lidar_completion import spconv_backend
from lidar_completion.backends import SparseBackend, get_backend, voxelize
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.networks import Denoiser, ScanEncoder
from lidar_completion.sparse import SparseConv, SparseConvTranspose

from backend_parity import assert_reproduces_reference_fixtures, assert_same_tensor

needs_spconv = pytest.mark.skipif(not spconv_backend.available(), reason="spconv not installed (optional)")


def test_spconv_backend_keeps_the_typed_contract_without_importing_spconv():
    assert get_backend.__module__ == "lidar_completion.backends"
    backend = spconv_backend.SpconvBackend()
    assert isinstance(backend, SparseBackend) and backend.name == "spconv"


def test_spconv_backend_without_spconv_says_how_to_install(monkeypatch):
    monkeypatch.setattr(spconv_backend, "_engine", lambda: None)
    model = CompletionModel(ModelConfig(channel_ratio=0.125))
    with pytest.raises(RuntimeError, match="install_spconv.sh"):
        model.use_backend("spconv")
    with pytest.raises(RuntimeError, match="install_spconv.sh"):
        voxelize(torch.zeros(3, 3), None, 0.1, backend="spconv")


# --------------------------------------------------------------------------- with spconv
@needs_spconv
@pytest.mark.parametrize("kind", ["k3s1", "k1", "k2s2", "transpose", "two levels"])
def test_single_ops_match_torch_backend(kind):
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(3000, 3, generator=gen) * torch.tensor([3.0, 3.0, 0.5]) - 2.0  # negative coordinates too
    batch = torch.randint(0, 3, (3000,), generator=gen)
    feats = torch.randn(len(points), 4, generator=gen)
    fields = [voxelize(points, batch, 0.1, feats=feats, backend=b) for b in ("torch", "spconv")]
    assert isinstance(fields[1].sparse.manager, spconv_backend.SpconvCoordinates)
    if kind == "transpose":
        down, up = SparseConv(4, 6, 2, 2), SparseConvTranspose(6, 5)
        outs = [up(down(f.sparse)) for f in fields]
    elif kind == "two levels":
        down1, down2, sub = SparseConv(4, 6, 2, 2), SparseConv(6, 6, 2, 2), SparseConv(6, 3, 3)
        outs = [sub(down2(down1(f.sparse))) for f in fields]
    else:
        size, stride = {"k3s1": (3, 1), "k1": (1, 1), "k2s2": (2, 2)}[kind]
        conv = SparseConv(4, 6, size, stride)
        outs = [conv(f.sparse) for f in fields]
    assert_same_tensor(*outs)


@needs_spconv
def test_published_networks_reproduce_fixtures_on_spconv(shared_dir):
    assert_reproduces_reference_fixtures(shared_dir, "spconv")


@needs_spconv
def test_denoiser_gradients_agree_with_torch_backend(real_scan_path):
    """Training mode through both backends' own backward passes: the torch backend's
    gather-GEMM-scatter backward against spconv's, on a batch of two real-scan inputs."""
    from lidar_completion.io import read_points

    torch.manual_seed(0)
    scan = read_points(real_scan_path)
    scan = scan[(np.linalg.norm(scan, axis=1) > 3.5) & (np.linalg.norm(scan, axis=1) < 30)]
    part = torch.from_numpy(scan[np.random.default_rng(0).choice(len(scan), 300, replace=False)]).float()
    noisy = part.repeat(10, 1) + torch.randn(3000, 3, generator=torch.Generator().manual_seed(0))
    encoder, denoiser = ScanEncoder(0.5).eval(), Denoiser(0.5).eval()
    grads = []
    for backend in ("torch", "spconv"):
        encoder.zero_grad(), denoiser.zero_grad()
        out = denoiser(voxelize(noisy, None, 0.05, backend=backend),
                       encoder(voxelize(part, None, 0.05, backend=backend)), torch.tensor([300]))
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in [*encoder.named_parameters(), *denoiser.named_parameters()]
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    scale = max(g.norm().item() for g in grads[0].values())
    for name, grad in grads[0].items():
        assert (grad - grads[1][name]).norm().item() <= 1e-4 * max(grad.norm().item(), 1e-3 * scale), name
