"""Single sparse ops against MinkowskiEngine 0.5.4 fixtures, and kernel-map edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from lidar_completion import sparse as sp
from lidar_completion.sparse import (
    CoordinateManager,
    SparseConv,
    SparseConvTranspose,
    SparseTensor,
    voxelize,
)


def tensor_on(coords: torch.Tensor, feats: torch.Tensor, stride: int = 1) -> SparseTensor:
    """A stride-``stride`` tensor on exactly these coordinates (rows re-sorted)."""
    keys, inverse = torch.unique(sp.pack(coords.long()), sorted=True, return_inverse=True)
    assert keys.numel() == coords.shape[0], "fixture coordinates must be unique"
    manager = CoordinateManager()
    manager.add(stride, keys)
    out = feats.new_zeros(keys.numel(), feats.shape[1])
    out[inverse] = feats
    return SparseTensor(out, stride, manager)


def assert_matches(result: SparseTensor, coords: torch.Tensor, feats: torch.Tensor) -> None:
    """Compare as sets keyed by coordinate (row order is the engine's hash order)."""
    assert result.coords.shape[0] == coords.shape[0]
    rows = sp.lookup(sp.pack(result.coords), sp.pack(coords.long()))
    assert bool((rows >= 0).all()), "output coordinates differ from the reference"
    assert (result.feats[rows] - feats).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def ops(shared_dir):
    return torch.load(shared_dir / "reference" / "minkowski_ops.pt", weights_only=True)


def test_offset_tables_match_reference(shared_dir):
    import json

    table = json.loads((shared_dir / "reference" / "minkowski_reference.json").read_text())["ops"]
    assert sp.kernel_offsets(3).tolist() == table["kernel_offsets_k3"]
    assert sp.kernel_offsets(2).tolist() == table["kernel_offsets_k2"]


def test_submanifold_conv_k3(ops):
    x = tensor_on(ops["in_coords"], ops["in_feats"])
    conv = SparseConv(4, ops["conv_k3s1.kernel"].shape[2], 3, 1)
    conv.kernel.data.copy_(ops["conv_k3s1.kernel"])
    assert_matches(conv(x), ops["conv_k3s1.out_coords"], ops["conv_k3s1.out_feats"])


def test_strided_conv_k2s2(ops):
    x = tensor_on(ops["in_coords"], ops["in_feats"])
    conv = SparseConv(4, ops["conv_k2s2.kernel"].shape[2], 2, 2)
    conv.kernel.data.copy_(ops["conv_k2s2.kernel"])
    out = conv(x)
    assert out.stride == 2
    assert_matches(out, ops["conv_k2s2.out_coords"], ops["conv_k2s2.out_feats"])


def test_transposed_conv_k2s2_onto_existing_coordinates(ops):
    x = tensor_on(ops["in_coords"], ops["in_feats"])
    coarse = SparseConv(4, ops["conv_k2s2.kernel"].shape[2], 2, 2)(x)  # builds the stride-2 set
    rows = sp.lookup(sp.pack(coarse.coords), sp.pack(ops["conv_k2s2.out_coords"].long()))
    feats = torch.zeros_like(coarse.feats)
    feats[rows] = ops["conv_k2s2.out_feats"]
    kernel = ops["convtr_k2s2.kernel"]
    up = SparseConvTranspose(kernel.shape[1], kernel.shape[2])
    up.kernel.data.copy_(kernel)
    out = up(coarse.replace(feats))
    assert out.stride == 1
    assert_matches(out, ops["convtr_k2s2.out_coords"], ops["convtr_k2s2.out_feats"])


def dense_conv_reference(coords, feats, kernel, stride=1):
    """Naive O(N^2) evaluation of out[o] = sum_k in[o + offset_k * s] @ W[k]."""
    index = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = torch.zeros(coords.shape[0], kernel.shape[-1], dtype=torch.float64)
    for o, c in enumerate(coords.tolist()):
        for k, off in enumerate(sp.kernel_offsets(3).tolist()):
            n = (c[0], c[1] + off[0] * stride, c[2] + off[1] * stride, c[3] + off[2] * stride)
            if n in index:
                out[o] += feats[index[n]].double() @ kernel[k].double()
    return out.float()


@pytest.mark.parametrize(
    "name,coords",
    [
        ("one point", [[0, 0, 0, 0]]),
        ("negative coordinates", [[0, -1, -1, -1], [0, 0, -1, -1], [0, -2, 0, 3], [0, -1, 0, 3]]),
        ("several batches", [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [2, 0, 1, 0], [0, 1, 1, 1]]),
        ("points far apart", [[0, -100000, 5, 7], [0, 100000, 5, 7], [0, 0, 120000, -120000], [0, 1, 120000, -120000]]),
        ("dense block", [[0, *xyz] for xyz in itertools.product(range(-1, 3), repeat=3)]),
    ],
)
def test_submanifold_conv_edge_cases(name, coords):
    coords = torch.tensor(coords)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(coords.shape[0], 3, generator=gen)
    conv = SparseConv(3, 4, 3)
    x = tensor_on(coords, feats)
    expected = dense_conv_reference(x.coords, x.feats, conv.kernel.data)
    assert torch.allclose(conv(x).feats, expected, atol=1e-5), name


def test_strided_conv_floors_negative_coordinates_and_keeps_batches_apart():
    coords = torch.tensor([[0, -1, -1, -1], [0, -2, -2, -2], [1, -1, -1, -1], [0, 1, 0, 0], [0, 0, 0, 0]])
    x = tensor_on(coords, torch.ones(5, 1))
    conv = SparseConv(1, 1, 2, 2)
    conv.kernel.data.fill_(1.0)
    out = conv(x)
    got = {tuple(c): f for c, f in zip(out.coords.tolist(), out.feats.squeeze(1).tolist())}
    assert got == {(0, -2, -2, -2): 2.0, (1, -2, -2, -2): 1.0, (0, 0, 0, 0): 2.0}


def test_voxelize_averages_duplicates_and_slices_back():
    points = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    field = voxelize(points, None, 0.05)
    assert field.sparse.coords.shape[0] == 2
    assert torch.allclose(field.sparse.feats[field.voxel_of_point[0]], torch.tensor([0.005, 0.0, 0.0]))
    assert torch.equal(field.slice(field.sparse)[2], torch.tensor([1.0, 1.0, 1.0]))


def test_voxelize_keeps_batches_apart_and_sorts_lexicographically():
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    field = voxelize(points, torch.tensor([1, 0, 1]), 0.5)
    assert field.sparse.coords.tolist() == [[0, 0, 0, 0], [1, -2, 0, 0], [1, 0, 0, 0]]


def test_empty_input_gives_empty_outputs():
    field = voxelize(torch.zeros(0, 3), None, 0.05)
    x = field.sparse
    assert SparseConv(3, 5, 3)(x).feats.shape == (0, 5)
    down = SparseConv(3, 5, 2, 2)(x)
    assert down.feats.shape == (0, 5)
    assert SparseConvTranspose(5, 2)(down).feats.shape == (0, 2)


def test_coordinates_out_of_range_raise_clear_error():
    with pytest.raises(ValueError, match="voxel coordinates outside"):
        voxelize(torch.tensor([[1e6, 0.0, 0.0]]), None, 0.05)


def test_conv_backward_gives_finite_gradients():
    field = voxelize(torch.randn(200, 3) * 2, None, 0.1)
    conv = SparseConv(3, 4, 3)
    conv(field.sparse).feats.square().sum().backward()
    assert conv.kernel.grad is not None and torch.isfinite(conv.kernel.grad).all()
    assert conv.kernel.grad.abs().sum() > 0
