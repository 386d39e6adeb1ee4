"""The sparse convolutions run under ``torch.autocast`` (the GPU check's bf16/fp16 rows):
gathers, GEMMs and scatters in the autocast dtype, close to the fp32 result. Checked on the
CPU's autocast; fp32 (no autocast) is untouched and covered by the parity tests."""

from __future__ import annotations

import pytest
import torch

from lidar_completion.networks import Denoiser, ScanEncoder
from lidar_completion.sparse import voxelize


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_denoiser_forward_under_cpu_autocast(dtype):
    torch.manual_seed(0)
    scan = torch.rand(300, 3) * torch.tensor([16.0, 16.0, 2.0]) - torch.tensor([8.0, 8.0, 1.0])
    noisy = scan.repeat(5, 1) + 0.3 * torch.randn(1500, 3)
    encoder, denoiser = ScanEncoder(0.25).eval(), Denoiser(0.25).eval()
    t = torch.tensor([500])
    with torch.inference_mode():
        expected = denoiser(voxelize(noisy, None, 0.05), encoder(voxelize(scan, None, 0.05)), t)
        with torch.autocast("cpu", dtype=dtype):
            got = denoiser(voxelize(noisy, None, 0.05), encoder(voxelize(scan, None, 0.05)), t)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = (0.05 if dtype == torch.bfloat16 else 0.01) * expected.abs().max()
    assert (got.float() - expected).abs().max() <= tolerance
