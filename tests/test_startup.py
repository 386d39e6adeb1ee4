"""Start-up: a path imports only what it uses (issue 14, item 3), and the noise that replaced
diffusers' ``randn_tensor`` is value for value the same."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lidar_completion.completer import randn_tensor

HEAVY = ("diffusers", "scipy", "matplotlib", "open3d", "lightning", "pytorch_lightning", "fpsample", "rclpy")


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return set(out.stdout.split()) & set(HEAVY)


def test_importing_the_pipeline_and_the_cli_imports_nothing_heavy():
    assert _imported_after("import lidar_completion.completer, lidar_completion.cli") == set()


def test_the_ve_sampler_path_never_imports_diffusers():
    code = """
import numpy as np, torch
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.completer import SceneCompleter
from lidar_completion.config import load_config
torch.manual_seed(0)
model = CompletionModel(ModelConfig(channel_ratio=0.25, sampler="ve", t0=400, kind="student", default_steps=1))
points = np.random.default_rng(0).uniform(-8, 8, (300, 3)).astype(np.float32)
SceneCompleter(model, load_config(**{"data.n_part": 64, "sampling.guidance": 1.0})).complete(points)
"""
    assert "diffusers" not in _imported_after(code)


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("kind", ["list", "single", "none"])
def test_randn_tensor_matches_diffusers(batch, kind):
    torch_utils = pytest.importorskip("diffusers.utils.torch_utils")

    def generators():
        if kind == "list":
            return [torch.Generator().manual_seed(7 + i) for i in range(batch)]
        return torch.Generator().manual_seed(3) if kind == "single" else None

    shape = (batch, 1000, 3)
    torch.manual_seed(0)
    expected = torch_utils.randn_tensor(shape, generator=generators(), device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    got = randn_tensor(shape, generators(), torch.device("cpu"), torch.float32)
    assert got.shape == expected.shape and torch.equal(got, expected)
