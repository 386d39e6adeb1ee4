"""The optional MinkowskiEngine backend: the same networks on both backends, number for number.

Everything but the first two tests needs MinkowskiEngine (``scripts/install_minkowski.sh``)
and is skipped without it; CI does not build it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lidar_completion import minkowski
from lidar_completion import sparse as sp
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.completer import SceneCompleter
from lidar_completion.config import CompletionConfig, ScanCut
from lidar_completion.networks import Denoiser, ScanEncoder
from lidar_completion.backends import voxelize
from lidar_completion.sparse import SparseConv, SparseConvTranspose

from backend_parity import assert_reproduces_reference_fixtures, assert_same_tensor

needs_me = pytest.mark.skipif(not minkowski.available(), reason="MinkowskiEngine not installed (optional)")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValueError, match="backend: must be one of"):
        CompletionConfig(backend="torchsparse")
    with pytest.raises(ValueError, match="backend: must be one of"):
        voxelize(torch.zeros(3, 3), None, 0.1, backend="torchsparse")
    with pytest.raises(ValueError, match="backend: must be one of"):
        CompletionModel(ModelConfig(channel_ratio=0.125)).use_backend("torchsparse")


def test_both_backends_keep_the_typed_contract():
    """Registered by name, they satisfy the Protocols without importing MinkowskiEngine."""
    from lidar_completion.backends import BACKENDS, SparseBackend, get_backend

    assert BACKENDS == ("torch", "torch-bf16", "minkowski", "spconv")
    assert isinstance(get_backend("torch"), SparseBackend) and get_backend("torch").name == "torch"
    assert isinstance(minkowski.MinkowskiBackend(), SparseBackend) and minkowski.MinkowskiBackend().name == "minkowski"
    assert isinstance(sp.CoordinateManager(), sp.Coordinates)
    assert isinstance(minkowski.MinkowskiCoordinates(manager=None, key_at_stride_1=None), sp.Coordinates)
    field = CompletionModel(ModelConfig(channel_ratio=0.125)).voxelize(torch.randn(50, 3))
    assert isinstance(field.sparse.manager, sp.CoordinateManager)


def test_minkowski_backend_without_minkowski_says_how_to_install(monkeypatch):
    monkeypatch.setattr(minkowski, "_engine", lambda: None)
    model = CompletionModel(ModelConfig(channel_ratio=0.125))
    with pytest.raises(RuntimeError, match="install_minkowski.sh"):
        SceneCompleter(model, CompletionConfig(device="cpu", backend="minkowski"))
    with pytest.raises(RuntimeError, match="MinkowskiEngine is not importable"):
        voxelize(torch.zeros(3, 3), None, 0.1, backend="minkowski")


# --------------------------------------------------------------------------- with MinkowskiEngine
@pytest.fixture(scope="module")
def ops(shared_dir):
    return torch.load(shared_dir / "reference" / "minkowski_ops.pt", weights_only=True)


@needs_me
def test_voxelize_matches_torch_backend():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(3000, 3, generator=gen) * 2
    batch = torch.randint(0, 3, (3000,), generator=gen)
    mine, theirs = voxelize(points, batch, 0.1), voxelize(points, batch, 0.1, backend="minkowski")
    assert isinstance(theirs.sparse.manager, minkowski.MinkowskiCoordinates)
    assert_same_tensor(mine.sparse, theirs.sparse, atol=1e-6)
    # Slicing back gives every point its own voxel's average on both backends.
    assert torch.allclose(mine.slice(mine.sparse), theirs.slice(theirs.sparse), atol=1e-6)


@needs_me
def test_minkowski_leaves_torch_thread_count_alone():
    before = torch.get_num_threads()
    SparseConv(3, 4, 3)(voxelize(torch.randn(500, 3), None, 0.1, backend="minkowski").sparse)
    assert torch.get_num_threads() == before


@needs_me
@pytest.mark.parametrize("kind", ["k3s1", "k1", "k2s2", "transpose"])
def test_single_ops_match_torch_backend(ops, kind):
    points = ops["in_coords"][:, 1:].float() * 0.1
    batch = ops["in_coords"][:, 0]
    feats = torch.randn(len(points), 4, generator=torch.Generator().manual_seed(1))
    fields = [voxelize(points, batch, 0.1, feats=feats, backend=b)
              for b in ("torch", "minkowski")]
    if kind == "transpose":
        down, up = SparseConv(4, 6, 2, 2), SparseConvTranspose(6, 5)
        outs = [up(down(f.sparse)) for f in fields]
    else:
        size, stride = {"k3s1": (3, 1), "k1": (1, 1), "k2s2": (2, 2)}[kind]
        conv = SparseConv(4, 6, size, stride)
        outs = [conv(f.sparse) for f in fields]
    assert_same_tensor(*outs)


@needs_me
def test_published_networks_reproduce_fixtures_on_minkowski(shared_dir):
    assert_reproduces_reference_fixtures(shared_dir, "minkowski")


def real_inputs(path, n_scan: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lidar_completion.io import read_points

    scan = read_points(path)
    scan = scan[(np.linalg.norm(scan, axis=1) > 3.5) & (np.linalg.norm(scan, axis=1) < 30)]
    rng = np.random.default_rng(seed)
    part = torch.from_numpy(scan[rng.choice(len(scan), n_scan, replace=False)]).float()
    gen = torch.Generator().manual_seed(seed)
    noisy = part.repeat(10, 1) + torch.randn(10 * n_scan, 3, generator=gen)
    return part, noisy, torch.tensor([500])


def denoiser_gradients(encoder, denoiser, inputs, backend: str, dtype: torch.dtype):
    """Output and every parameter's gradient of ``mean(denoiser(...)^2)``, in float64."""
    parts, batch_p, noisies, batch_n, t = inputs
    encoder, denoiser = encoder.to(dtype), denoiser.to(dtype)
    encoder.zero_grad(), denoiser.zero_grad()
    scan = encoder(voxelize(parts.to(dtype), batch_p, 0.05, backend=backend))
    out = denoiser(voxelize(noisies.to(dtype), batch_n, 0.05, backend=backend), scan, t)
    out.square().mean().backward()
    named = [*encoder.named_parameters(), *denoiser.named_parameters()]
    return out.detach().double(), {name: p.grad.double() for name, p in named if p.grad is not None}


@needs_me
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_full_width_denoiser_and_gradients_agree_on_the_real_scan(real_scan_path, mode):
    """Channel ratio 1, a batch of two real-scan inputs: outputs and weight gradients.

    In inference mode the backends agree to 1e-5. In training mode a parameter followed by a
    BatchNorm has an exactly-zero true gradient, so its float32 gradient is rounding noise
    (4% of itself between the torch backend in float32 and float64): there MinkowskiEngine
    must be as close to the float64 result as the torch backend in float32 is.
    """
    torch.manual_seed(0)
    encoder, denoiser = getattr(ScanEncoder(1.0), mode)(), getattr(Denoiser(1.0), mode)()
    part, noisy, _ = real_inputs(real_scan_path, 300)
    shifted = torch.tensor([1.5, -0.5, 0.2])
    inputs = (torch.cat([part, part + shifted]), torch.arange(2).repeat_interleave(len(part)),
              torch.cat([noisy, noisy + shifted]), torch.arange(2).repeat_interleave(len(noisy)),
              torch.tensor([500, 20]))
    out_t, grads_t = denoiser_gradients(encoder, denoiser, inputs, "torch", torch.float32)
    out_m, grads_m = denoiser_gradients(encoder, denoiser, inputs, "minkowski", torch.float32)
    assert grads_t.keys() == grads_m.keys() and len(grads_t) > 100
    if mode == "eval":
        assert (out_t - out_m).abs().max().item() < 1e-5
        scale = max(grad.norm().item() for grad in grads_t.values())
        for name, grad in grads_t.items():
            assert (grad - grads_m[name]).norm().item() <= 1e-5 * max(grad.norm().item(), 1e-4 * scale), name
        return
    out_64, grads_64 = denoiser_gradients(encoder, denoiser, inputs, "torch", torch.float64)
    assert (out_m - out_64).abs().max().item() <= 3 * (out_t - out_64).abs().max().item() + 1e-6
    for name, exact in grads_64.items():
        ours, theirs = (grads_t[name] - exact).norm().item(), (grads_m[name] - exact).norm().item()
        assert theirs <= 3 * ours + 1e-6 * exact.norm().item() + 1e-9, name


@needs_me
def test_scene_completer_gives_the_same_scene_on_both_backends(real_scan_path):
    from lidar_completion.io import read_points

    points = read_points(real_scan_path)
    model = CompletionModel(ModelConfig(channel_ratio=0.25, cut=ScanCut.recorded_before(300, None)))
    torch.manual_seed(0)
    for p in model.parameters():  # random but fixed weights (a fresh model is all-BN-identity)
        p.data.normal_(0, 0.05)
    scenes = []
    for backend in ("torch", "minkowski"):
        completer = SceneCompleter(model, CompletionConfig(device="cpu", backend=backend).replace(**{"sampling.steps": 2}))
        scenes.append(completer.complete(points).points)
    assert scenes[0].shape == scenes[1].shape and len(scenes[0]) > 0
    assert np.abs(scenes[0] - scenes[1]).max() < 1e-3
