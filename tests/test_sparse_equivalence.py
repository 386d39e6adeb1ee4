"""The optimised torch backend against a plain reference of the same sums, on random sparse inputs.

The reference is the previous implementation, kept here in its simplest form: one
``searchsorted`` per kernel offset, and per offset a gather, a GEMM and an ``index_add``
(autograd through plain ops). The backend's kernel maps must be identical to it, and its
convolutions (both the gather-GEMM-scatter and the output-stationary path), their
gradients and whole networks equal to it within float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from lidar_completion import sparse as sp
from lidar_completion.networks import Denoiser, ScanEncoder
from lidar_completion.sparse import CoordinateManager, SparseConv, SparseConvTranspose, SparseTensor



def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal within float32 rounding of sums over thousands of terms, relative to the
    tensor's scale (an element-wise rtol fails on near-zero sums of large terms)."""
    if ours.shape != ref.shape:
        return False
    if ref.numel() == 0:
        return True
    ours, ref = ours.detach(), ref.detach()
    return float((ours - ref).abs().max()) <= rel * max(1.0, float(ref.abs().max()))


def reference_submanifold_pairs(keys: torch.Tensor, stride: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input rows, output rows) per k=3 offset, one search per offset."""
    offsets = sp.kernel_offsets(3) * stride
    rows = torch.arange(keys.numel())
    pairs = []
    for shift in sp._packed_shifts(offsets):
        found = sp.lookup(keys, keys + shift)
        hit = found >= 0
        pairs.append((found[hit], rows[hit]))
    return pairs


def reference_downsample_pairs(coords: torch.Tensor, stride: int):
    coarse = 2 * stride
    parent = coords.clone()
    parent[:, 1:] = torch.div(coords[:, 1:], coarse, rounding_mode="floor") * coarse
    parent_keys, inverse = torch.unique(sp.pack(parent), sorted=True, return_inverse=True)
    bits = (coords[:, 1:] - parent[:, 1:]) // stride
    index = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]
    rows = torch.arange(coords.shape[0])
    return [(rows[index == k], inverse[index == k]) for k in range(8)], parent_keys


def reference_convolve(feats, pairs, kernel, num_out):
    out = feats.new_zeros(num_out, kernel.shape[-1])
    for k, (src, dst) in enumerate(pairs):
        out = out.index_add(0, dst, feats[src] @ kernel[k])
    return out


def random_set(n: int, extent: int, stride: int, batches: int, seed: int) -> torch.Tensor:
    """Sorted packed keys of up to ``n`` random voxels (multiples of ``stride``) in a cube."""
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.randint(-extent, extent + 1, (n, 3), generator=gen) * stride
    batch = torch.randint(0, batches, (n, 1), generator=gen)
    return torch.unique(sp.pack(torch.cat([batch, xyz], 1)), sorted=True)


CASES = [  # (voxels, half extent in voxels, stride, batches): from isolated points to solid blocks
    (400, 60, 1, 1),
    (3000, 8, 1, 2),
    (2000, 6, 2, 1),
    (1500, 10, 4, 3),
    (1, 0, 1, 1),
]


@pytest.mark.parametrize("n,extent,stride,batches", CASES)
def test_neighbour_table_equals_one_search_per_offset(n, extent, stride, batches):
    keys = random_set(n, extent, stride, batches, seed=n)
    manager = CoordinateManager()
    manager.add(stride, keys)
    kmap = manager.submanifold_map(stride, 3)
    reference = reference_submanifold_pairs(keys, stride)
    for k, ((src, dst), (ref_src, ref_dst)) in enumerate(zip(kmap.pairs, reference)):
        order = dst.argsort()  # within an offset the pairs' order is free
        assert torch.equal(src[order], ref_src) and torch.equal(dst[order], ref_dst), f"offset {k}"
    assert kmap.num_pairs == sum(p[0].numel() for p in reference)
    table = torch.full((keys.numel(), 27), keys.numel())
    for k, (src, dst) in enumerate(reference):
        table[dst, k] = src
    assert torch.equal(kmap.table, table)


@pytest.mark.parametrize("n,extent,stride,batches", CASES)
def test_downsample_map_equals_reference(n, extent, stride, batches):
    keys = random_set(n, extent, stride, batches, seed=n + 1)
    manager = CoordinateManager()
    manager.add(stride, keys)
    kmap = manager.downsample_map(stride)
    ref_pairs, parent_keys = reference_downsample_pairs(manager.coords[stride], stride)
    assert torch.equal(manager.keys[2 * stride], parent_keys)
    for (src, dst), (ref_src, ref_dst) in zip(kmap.pairs, ref_pairs):
        assert torch.equal(src, ref_src) and torch.equal(dst, ref_dst)


def tensor(keys: torch.Tensor, stride: int, channels: int, seed: int, grad: bool = False) -> SparseTensor:
    manager = CoordinateManager()
    manager.add(stride, keys)
    feats = torch.randn(keys.numel(), channels, generator=torch.Generator().manual_seed(seed))
    return SparseTensor(feats.requires_grad_(grad), stride, manager)


@pytest.mark.parametrize("path", ["pairs", "table"])
@pytest.mark.parametrize("n,extent,stride,batches", CASES)
@pytest.mark.parametrize("cin,cout", [(3, 8), (16, 32), (64, 64)])
def test_submanifold_conv_and_gradients_equal_reference(monkeypatch, path, n, extent, stride, batches, cin, cout):
    monkeypatch.setattr(sp, "_use_table", lambda *args: path == "table")
    keys = random_set(n, extent, stride, batches, seed=n + 2)
    x = tensor(keys, stride, cin, seed=3, grad=True)
    conv = SparseConv(cin, cout, 3)
    out = conv(x).feats
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * upstream).sum().backward()
    grads = x.feats.grad.clone(), conv.kernel.grad.clone()

    feats = x.feats.detach().clone().requires_grad_(True)
    kernel = conv.kernel.detach().clone().requires_grad_(True)
    ref = reference_convolve(feats, reference_submanifold_pairs(keys, stride), kernel, keys.numel())
    (ref * upstream).sum().backward()
    assert close(out, ref)
    assert close(grads[0], feats.grad)
    assert close(grads[1], kernel.grad)


@pytest.mark.parametrize("n,extent,stride,batches", CASES)
@pytest.mark.parametrize("cin,cout", [(8, 8), (32, 64)])
def test_strided_and_transposed_conv_and_gradients_equal_reference(n, extent, stride, batches, cin, cout):
    keys = random_set(n, extent, stride, batches, seed=n + 5)
    x = tensor(keys, stride, cin, seed=6, grad=True)
    down, up = SparseConv(cin, cout, 2, 2), SparseConvTranspose(cout, cin)
    coarse = down(x)
    out = up(coarse).feats
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * upstream).sum().backward()

    feats = x.feats.detach().clone().requires_grad_(True)
    k_down = down.kernel.detach().clone().requires_grad_(True)
    k_up = up.kernel.detach().clone().requires_grad_(True)
    pairs, parent_keys = reference_downsample_pairs(x.coords, stride)
    ref_coarse = reference_convolve(feats, pairs, k_down, parent_keys.numel())
    ref = reference_convolve(ref_coarse, [(dst, src) for src, dst in pairs], k_up, keys.numel())
    (ref * upstream).sum().backward()
    assert close(coarse.feats, ref_coarse)
    assert close(out, ref)
    assert close(x.feats.grad, feats.grad)
    assert close(down.kernel.grad, k_down.grad)
    assert close(up.kernel.grad, k_up.grad)


class ReferenceManager(CoordinateManager):
    """The reference sums behind the :class:`~lidar_completion.sparse.Coordinates` contract."""

    def convolve(self, x, kernel, kernel_size, stride):
        if kernel_size == 1:
            return x.replace(x.feats @ kernel)
        if stride == 1:
            pairs = reference_submanifold_pairs(self.keys[x.stride], x.stride)
            return x.replace(reference_convolve(x.feats, pairs, kernel, x.feats.shape[0]))
        pairs, parent_keys = reference_downsample_pairs(self.coords[x.stride], x.stride)
        if 2 * x.stride not in self.keys:
            self.add(2 * x.stride, parent_keys)
        return SparseTensor(reference_convolve(x.feats, pairs, kernel, parent_keys.numel()), 2 * x.stride, self)

    def convolve_transpose(self, x, kernel):
        fine = x.stride // 2
        pairs, _ = reference_downsample_pairs(self.coords[fine], fine)
        swapped = [(dst, src) for src, dst in pairs]
        return SparseTensor(reference_convolve(x.feats, swapped, kernel, self.keys[fine].numel()), fine, self)


def reference_voxelize(points: torch.Tensor, voxel: float) -> sp.PointField:
    field = sp.voxelize(points, None, voxel)
    manager = ReferenceManager()
    manager.add(1, field.sparse.manager.keys[1])
    return sp.PointField(field.points, field.voxel_of_point, SparseTensor(field.sparse.feats, 1, manager))


def student_sized_case(real_scan_path) -> tuple[torch.Tensor, torch.Tensor, ScanEncoder, Denoiser]:
    """The pipeline's kind of input for the student-sized networks (channel ratio 0.25): 500
    points of the real scan inside 10 m, and them x10 plus noise."""
    from lidar_completion.io import read_points

    torch.manual_seed(0)
    scan = torch.from_numpy(read_points(real_scan_path)).float()
    scan = scan[(scan.norm(dim=1) > 3.5) & (scan.norm(dim=1) < 10)]
    part = scan[torch.randperm(len(scan), generator=torch.Generator().manual_seed(0))[:500]]
    noisy = part.repeat(10, 1) + 0.5 * torch.randn(5000, 3, generator=torch.Generator().manual_seed(1))
    return part, noisy, ScanEncoder(0.25).eval(), Denoiser(0.25).eval()


@torch.no_grad()
def test_denoiser_equals_reference_on_real_scan_sized_input(real_scan_path):
    """The whole student-sized denoiser (channel ratio 0.25) on the pipeline's kind of input:
    a scan of 500 points x10 plus noise, every path of the backend exercised."""
    part, noisy, encoder, denoiser = student_sized_case(real_scan_path)
    for module in list(encoder.modules()) + list(denoiser.modules()):  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    t = torch.tensor([300])
    ours = denoiser(sp.voxelize(noisy, None, 0.05), encoder(sp.voxelize(part, None, 0.05)), t)
    ref = denoiser(reference_voxelize(noisy, 0.05), encoder(reference_voxelize(part, 0.05)), t)
    assert close(ours, ref, 1e-4)


@pytest.mark.parametrize("stride", [1, 4, 16])
def test_nearest_encoder_rows_kdtree_equals_bruteforce_with_ties(stride):
    """Encoder voxels on the stride-16 lattice and queries on a stride-s lattice tie often;
    the KD-tree's tie-break (a lifted fourth coordinate) must pick the brute force's row."""
    from lidar_completion.networks import _nearest_rows_bruteforce, _nearest_rows_kdtree

    gen = torch.Generator().manual_seed(stride)
    for _ in range(5):
        ref = torch.unique(torch.randint(-20, 20, (300, 3), generator=gen) * 16, dim=0)
        ref = ref[torch.randperm(len(ref), generator=gen)]
        query = torch.unique(torch.randint(-400 // stride, 400 // stride, (3000, 3), generator=gen) * stride, dim=0)
        assert torch.equal(_nearest_rows_kdtree(query, ref), _nearest_rows_bruteforce(query, ref))
    far = torch.tensor([[0, 0, 0], [100000, 0, 0], [-100000, 5, 5]])  # too far apart for the lift: brute force
    query = torch.tensor([[50000, 0, 0], [-50000, 2, 2], [1, 1, 1]])
    assert torch.equal(_nearest_rows_kdtree(query, far), _nearest_rows_bruteforce(query, far))


bf16_cpu = pytest.mark.skipif(not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
                              reason="no bfloat16 instructions on this CPU")


@bf16_cpu
@torch.no_grad()
def test_bf16_backend_stays_close_to_float32(real_scan_path):
    """``torch-bf16``: the same maps, GEMMs in bfloat16, float32 in and out; a whole
    student-sized denoiser stays within ~1% of the float32 backend."""
    from lidar_completion.backends import get_backend
    part, noisy, encoder, denoiser = student_sized_case(real_scan_path)
    outs = []
    for name in ("torch", "torch-bf16"):
        backend = get_backend(name, "cpu")
        out = denoiser(backend.voxelize(noisy, None, 0.05), encoder(backend.voxelize(part, None, 0.05)), torch.tensor([300]))
        assert out.dtype == torch.float32
        outs.append(out)
    assert close(outs[1], outs[0], 2e-2) and not torch.equal(outs[1], outs[0])


def test_bf16_backend_refuses_a_cpu_without_bfloat16(monkeypatch):
    from lidar_completion.backends import get_backend

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(RuntimeError, match="no bfloat16 instructions"):
        get_backend("torch-bf16", "cpu")
    get_backend("torch", "cpu")  # float32 runs anywhere
