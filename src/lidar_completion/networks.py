"""The three published LiDiff networks, written once over a stage table.

``MinkGlobalEnc`` (scan encoder), ``MinkUNetDiff`` (denoiser) and ``MinkUNet`` (refinement,
3 -> 18) share one U-Net skeleton: a stem, four down stages and, except for the encoder,
four up stages. Module names, nesting and parameter shapes are exactly the published ones
(``shared/reference/minkowski_reference.json``) so published state dicts load with
``strict=True``; the code builds them with loops instead of eight copied blocks.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

import torch
from torch import nn

from .config import MAX_CHANNEL_RATIO
from .sparse import (
    PointField,
    SparseBatchNorm,
    SparseConv,
    SparseConvTranspose,
    SparseReLU,
    SparseTensor,
    cat,
    pack,
)

__all__ = [
    "BASE_CHANNELS",
    "channel_widths",
    "ScanEncoder",
    "Denoiser",
    "RefinementNet",
    "timestep_embedding",
    "nearest_encoder_rows",
]

# Widths of: stem, stage1..4, up1..4 at channel ratio 1.
BASE_CHANNELS = (32, 32, 64, 128, 256, 256, 128, 96, 96)
DOWN_NAMES = ("stage1", "stage2", "stage3", "stage4")
UP_NAMES = ("up1", "up2", "up3", "up4")


def channel_widths(channel_ratio: float) -> list[int]:
    """Per-stage widths, truncated like the published ``int(cr * x)``."""
    if not channel_ratio <= MAX_CHANNEL_RATIO:  # also refuses NaN
        raise ValueError(f"channel_ratio must be at most {MAX_CHANNEL_RATIO}, got {channel_ratio}")
    widths = [int(channel_ratio * c) for c in BASE_CHANNELS]
    if min(widths) < 2:
        raise ValueError(f"channel_ratio={channel_ratio} leaves a stage with < 2 channels")
    return widths


class ConvBlock(nn.Module):
    """conv -> BN -> ReLU (``BasicConvolutionBlock`` / ``BasicDeconvolutionBlock``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, transpose: bool = False):
        super().__init__()
        conv = SparseConvTranspose(cin, cout) if transpose else SparseConv(cin, cout, kernel_size, stride)
        self.net = nn.Sequential(conv, SparseBatchNorm(cout), SparseReLU())

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """Two 3x3x3 convs with a 1x1x1 projection shortcut when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(
            SparseConv(cin, cout, 3),
            SparseBatchNorm(cout),
            SparseReLU(),
            SparseConv(cout, cout, 3),
            SparseBatchNorm(cout),
        )
        self.downsample = (
            nn.Sequential()
            if cin == cout
            else nn.Sequential(SparseConv(cin, cout, 1), SparseBatchNorm(cout))
        )
        self.relu = SparseReLU()

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.relu(self.net(x) + self.downsample(x))


def mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.LeakyReLU(0.1, inplace=True), nn.Linear(hidden, cout))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim]: half sin, half cos, ``log(10000)/(half-1)`` spacing."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -scale).float().to(t.device)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


def _nearest_rows_bruteforce(query: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Exact nearest ``ref`` row per ``query`` row (int coordinates), first row on ties."""
    ref_f = ref.double()
    ref_sq = (ref_f * ref_f).sum(1)
    out = torch.empty(query.shape[0], dtype=torch.long, device=query.device)
    step = max(1, chunk // max(1, ref.shape[0]))
    for start in range(0, query.shape[0], step):
        q = query[start : start + step].double()
        # |q|^2 is constant per row; float64 holds these integer distances exactly.
        out[start : start + step] = (ref_sq[None, :] - 2.0 * (q @ ref_f.T)).argmin(dim=1)
    return out


def _nearest_rows_kdtree(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Same result as the brute force, via one k=1 query of scipy's KD-tree (CPU).

    Ties are broken by a fourth coordinate: ref row j is lifted to ``sqrt(j / 2m)`` (m rows),
    the queries stay at 0, so the tree ranks ``d^2 + j / 2m``. Squared distances between
    integer voxels are integers and ``j / 2m < 1/2``, so that ranks by ``d^2`` first and by
    row second, with a gap of at least ``1 / 2m`` between any two ranks; float64 sums are
    exact to far less than that while every squared distance stays under ``2^45 / 2m``
    (coordinates spanning ~10^5 voxels), else the brute force answers.
    """
    from scipy.spatial import cKDTree

    m = ref.shape[0]
    both = torch.cat([query, ref])
    span = (both.max(0).values - both.min(0).values).double()
    if float((span * span).sum()) >= 2.0**45 / (2 * m):
        return _nearest_rows_bruteforce(query, ref)
    lift = np.sqrt(np.arange(m, dtype=np.float64) / (2 * m))
    tree = cKDTree(np.column_stack([ref.numpy().astype(np.float64), lift]))
    _, rows = tree.query(np.column_stack([query.numpy().astype(np.float64), np.zeros(len(query))]), k=1,
                         workers=torch.get_num_threads())
    return torch.from_numpy(np.asarray(rows, dtype=np.int64).reshape(-1))


def nearest_encoder_rows(x: SparseTensor, encoded: SparseTensor) -> torch.Tensor:
    """Row of the nearest encoder voxel of the same batch for every voxel of ``x``.

    Ties go to the lexicographically smallest (batch, x, y, z) encoder voxel — the first in
    sorted order — so the result is deterministic (the published code used an arbitrary
    tie-break). Batch entries without encoder voxels get row -1.
    """
    rows = torch.full((x.coords.shape[0],), -1, dtype=torch.long, device=x.feats.device)
    query_all, ref_all = x.coords, encoded.coords
    for b in torch.unique(query_all[:, 0]).tolist():
        q_rows = torch.nonzero(query_all[:, 0] == b).squeeze(1)
        r_rows = torch.nonzero(ref_all[:, 0] == b).squeeze(1)
        if r_rows.numel() == 0:
            continue
        # Search in lexicographic order, so "first row on ties" is the smallest voxel
        # whatever order the backend keeps its rows in (the torch backend's is sorted).
        r_rows = r_rows[torch.argsort(pack(ref_all[r_rows]))]
        query, ref = query_all[q_rows, 1:], ref_all[r_rows, 1:]
        if query.is_cuda:
            local = _nearest_rows_bruteforce(query, ref)
        else:
            local = _nearest_rows_kdtree(query, ref)
        rows[q_rows] = r_rows[local]
    return rows


class SparseUNet(nn.Module):
    """Stem + four strided stages (+ four transposed stages with skips when ``decoder``)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channel_ratio: float = 1.0,
        decoder: bool = True,
        final_activation: nn.Module | None = None,
    ):
        super().__init__()
        cs = channel_widths(channel_ratio)
        self.widths = cs
        self.stem = nn.Sequential(
            SparseConv(in_channels, cs[0], 3),
            SparseBatchNorm(cs[0]),
            SparseReLU(),
            SparseConv(cs[0], cs[0], 3),
            SparseBatchNorm(cs[0]),
            SparseReLU(),
        )
        for i, name in enumerate(DOWN_NAMES, start=1):
            cin, cout = cs[i - 1], cs[i]
            self.add_module(
                name,
                nn.Sequential(ConvBlock(cin, cin, 2, 2), ResidualBlock(cin, cout), ResidualBlock(cout, cout)),
            )
        self.decoder = decoder
        if decoder:
            for j, name in enumerate(UP_NAMES, start=1):
                cin, cout, skip = cs[3 + j], cs[4 + j], cs[4 - j]
                block = nn.Sequential(ResidualBlock(cout + skip, cout), ResidualBlock(cout, cout))
                self.add_module(name, nn.ModuleList([ConvBlock(cin, cout, 2, 2, transpose=True), block]))
            layers = [nn.Linear(cs[8], 20), nn.LeakyReLU(0.1, inplace=True), nn.Linear(20, out_channels)]
            self.last = nn.Sequential(*layers, *([final_activation] if final_activation else []))
        self._reset_batchnorm()

    def _reset_batchnorm(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def condition(self, level: int, x: SparseTensor, context: object) -> SparseTensor:
        """Hook for per-level conditioning before down/up level ``level`` (0..7)."""
        return x

    def run(self, field: PointField, context: object = None) -> SparseTensor:
        """Stem, down path and (if any) up path; returns the last sparse tensor."""
        x = self.stem(field.sparse)
        skips = []
        for level, name in enumerate(DOWN_NAMES):
            skips.append(x)
            x = getattr(self, name)(self.condition(level, x, context))
        if not self.decoder:
            return x
        for level, name in enumerate(UP_NAMES, start=len(DOWN_NAMES)):
            upsample, block = getattr(self, name)
            x = block(cat(upsample(self.condition(level, x, context)), skips.pop()))
        return x


class ScanEncoder(SparseUNet):
    """``MinkGlobalEnc``: encodes the partial scan into stride-16 voxel features."""

    def __init__(self, channel_ratio: float = 1.0, in_channels: int = 3):
        super().__init__(in_channels, channel_ratio=channel_ratio, decoder=False)

    def forward(self, field: PointField) -> SparseTensor:
        return self.run(field)


class RefinementNet(SparseUNet):
    """``MinkUNet`` 3 -> 18 with tanh: six xyz offsets per point (x6 upsampling)."""

    def __init__(self, channel_ratio: float = 1.0, in_channels: int = 3, out_channels: int = 18):
        super().__init__(in_channels, out_channels, channel_ratio, final_activation=nn.Tanh())

    def forward(self, field: PointField) -> torch.Tensor:
        return self.last(field.slice(self.run(field)))


class Denoiser(SparseUNet):
    """``MinkUNetDiff``: predicts per-point noise, conditioned on scan features and timestep.

    Before each of the eight levels, every voxel gets a gate
    ``latemp(cat(latent(nearest scan feature), temp(timestep embedding)))`` that multiplies
    its features. The published ``up1`` level concatenates (timestep, scan) instead of
    (scan, timestep); kept so published weights compute the same thing.
    """

    def __init__(self, channel_ratio: float = 1.0, in_channels: int = 3, out_channels: int = 3):
        super().__init__(in_channels, out_channels, channel_ratio)
        cs = self.widths
        self.embed_dim = cs[-1]
        for level, name in enumerate(DOWN_NAMES + UP_NAMES):
            gated = cs[level]  # width of the tensor entering this level
            hidden = cs[4] if level < len(DOWN_NAMES) else gated
            self.add_module(f"latent_{name}", mlp(cs[4], cs[4], cs[4]))
            self.add_module(f"latemp_{name}", mlp(2 * cs[4], hidden, gated))
            self.add_module(f"{name}_temp", mlp(self.embed_dim, self.embed_dim, cs[4]))
        self._level_names = DOWN_NAMES + UP_NAMES

    def condition(self, level: int, x: SparseTensor, context: Any) -> SparseTensor:
        """Gate ``latemp(cat(latent(nearest scan feature), temp(t)))`` per voxel.

        Every voxel of batch entry b reads an encoder voxel of b (or none), and the MLPs act
        row-wise, so the whole gate is a function of the encoder row alone: it is evaluated
        once per encoder voxel (hundreds), plus once per batch entry for "no scan voxel", and
        gathered per voxel, instead of evaluated per voxel (up to 10^5): same result, a
        fraction of the work.
        """
        scan, temb, nearest = context
        name = self._level_names[level]
        latemp = getattr(self, f"latemp_{name}")
        first, second = latemp[0], latemp[2]
        time_feat = getattr(self, f"{name}_temp")(temb)  # [B, width]
        batches = time_feat.shape[0]
        # One row per encoder voxel, then an all-zero row per batch entry: "no scan voxel there".
        encoded = torch.cat([scan.feats, scan.feats.new_zeros(batches, scan.feats.shape[1])])
        owner = torch.cat([scan.batch, torch.arange(batches, device=scan.batch.device)])  # each row's batch entry
        scan_feat = getattr(self, f"latent_{name}")(encoded)
        width = scan_feat.shape[1]
        w_time, w_scan = first.weight[:, :width], first.weight[:, width:]
        if name != "up1":  # published order is (scan, time) except at up1
            w_scan, w_time = w_time, w_scan
        hidden = scan_feat @ w_scan.T + (time_feat @ w_time.T + first.bias).index_select(0, owner)
        gates = second(latemp[1](hidden))  # [encoder rows + B, gated width]
        # Encoder and decoder levels of one stride share coordinates: one search per stride.
        key = (id(x.manager), x.stride)
        if key not in nearest:
            rows = nearest_encoder_rows(x, scan)
            none = scan.feats.shape[0] + x.batch  # -1 -> the batch entry's zero row
            nearest[key] = (x.manager, torch.where(rows >= 0, rows, none))
        return x * gates.index_select(0, nearest[key][1])

    def forward(self, field: PointField, scan: SparseTensor, t: torch.Tensor) -> torch.Tensor:
        """Noise prediction per point of ``field``; ``t`` holds one timestep per batch entry."""
        temb = timestep_embedding(t.reshape(-1), self.embed_dim).to(cast(torch.Tensor, self.last[0].weight).dtype)
        # The last item caches the nearest-encoder-row search per coordinate set (one forward);
        # it keeps each manager alive, so an id is never reused while its entry exists.
        return self.last(field.slice(self.run(field, (scan, temb, {}))))
