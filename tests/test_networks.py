"""Whole networks against MinkowskiEngine fixtures and the published state-dict layouts."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lidar_completion.checkpoints import PUBLISHED_PREFIXES, REFINE_PREFIX, load_published
from lidar_completion.networks import Denoiser, RefinementNet, ScanEncoder
from lidar_completion.sparse import voxelize


@pytest.fixture(scope="module")
def reference(shared_dir):
    return torch.load(shared_dir / "reference" / "minkunet_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def layouts(shared_dir):
    return json.loads((shared_dir / "reference" / "minkowski_reference.json").read_text())["layouts"]


def load_part(net: torch.nn.Module, reference: dict, prefix: str) -> torch.nn.Module:
    state = {k[len(prefix):]: v for k, v in reference.items() if k.startswith(prefix)}
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def nets(reference):
    ratio = float(reference["channel_ratio"])
    return (
        load_part(ScanEncoder(ratio), reference, "encoder."),
        load_part(Denoiser(ratio), reference, "denoiser."),
        load_part(RefinementNet(ratio), reference, "refiner."),
    )


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_denoiser_reproduces_published_model(reference, nets, device):
    encoder, denoiser = (copy.deepcopy(net).to(device) for net in nets[:2])  # the fixture stays on CPU
    voxel = float(reference["voxel_size"])
    scan = encoder(voxelize(reference["partial_points"].to(device), None, voxel))
    noise = denoiser(voxelize(reference["noisy_points"].to(device), None, voxel), scan, reference["timestep"].to(device))
    assert noise.shape == reference["predicted_noise"].shape
    assert (noise.cpu() - reference["predicted_noise"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_refiner_reproduces_published_model(reference, nets, device):
    refiner = copy.deepcopy(nets[2]).to(device)
    out = refiner(voxelize(reference["refine_input"].to(device), None, float(reference["voxel_size"])))
    assert out.shape == (600, 18)
    assert (out.cpu() - reference["refine_output"]).abs().max().item() < 1e-4


@torch.no_grad()
def test_batch_of_two_scans_equals_two_single_runs(reference, nets):
    """Batching must not leak information between scans (matching is per batch)."""
    encoder, denoiser, _ = nets
    voxel = float(reference["voxel_size"])
    part, noisy = reference["partial_points"], reference["noisy_points"]
    shifted_part, shifted_noisy = part + torch.tensor([3.0, -2.0, 0.5]), noisy + torch.tensor([3.0, -2.0, 0.5])
    batch_p = torch.cat([torch.zeros(len(part)), torch.ones(len(part))]).long()
    batch_n = torch.cat([torch.zeros(len(noisy)), torch.ones(len(noisy))]).long()
    scan = encoder(voxelize(torch.cat([part, shifted_part]), batch_p, voxel))
    t = torch.tensor([617, 100])
    both = denoiser(voxelize(torch.cat([noisy, shifted_noisy]), batch_n, voxel), scan, t)
    single = denoiser(
        voxelize(shifted_noisy, None, voxel), encoder(voxelize(shifted_part, None, voxel)), t[1:]
    )
    assert (both[: len(noisy)] - reference["predicted_noise"]).abs().max() < 1e-4
    assert (both[len(noisy):] - single).abs().max() < 1e-4


def random_state(layout: dict, prefix: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        f"{prefix}{key}": torch.zeros((), dtype=torch.long) if not shape else torch.randn(shape, generator=gen)
        for key, shape in layout.items()
    }


@pytest.mark.parametrize("layout_name", list(PUBLISHED_PREFIXES))
def test_full_width_published_layout_loads_strict(layout_name, layouts, tmp_path):
    enc_prefix, den_prefix = PUBLISHED_PREFIXES[layout_name]
    state = random_state(layouts["MinkGlobalEnc"], enc_prefix) | random_state(layouts["MinkUNetDiff"], den_prefix)
    ckpt = tmp_path / f"{layout_name}.ckpt"
    torch.save({"state_dict": state, "epoch": 1, "global_step": 10}, ckpt)
    refine = tmp_path / "refine.ckpt"
    torch.save({"state_dict": random_state(layouts["MinkUNet_refine_3to18"], REFINE_PREFIX)}, refine)
    model = load_published(ckpt, refine)
    assert model.config.channel_ratio == 1.0 and model.config.refine_channel_ratio == 1.0
    got = model.state_dict()
    for key, value in state.items():
        ours = ("encoder." if key.startswith(enc_prefix) else "denoiser.") + key.split(".", 1)[1]
        assert torch.equal(got[ours], value)
    assert model.config.kind == ("student" if layout_name == "distillation_dpo_student" else "teacher")


def test_module_names_are_the_published_ones(layouts):
    for net, name in ((ScanEncoder(), "MinkGlobalEnc"), (Denoiser(), "MinkUNetDiff"), (RefinementNet(), "MinkUNet_refine_3to18")):
        shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
        assert shapes == layouts[name]
