"""The one completion pipeline: scan in, dense scene out, with per-stage timings.

The ROS node, the offline CLI, the benchmarks, evaluation and training validation all call
:class:`SceneCompleter`; none re-implements a stage. Stages (as published):

1. pre-process: finite points with ``min_range < r < max_range``, farthest-point sampled
   to ``n_part`` (repeated when the scan has fewer);
2. sample: start at ``x_init + sigma eps`` with ``x_init`` = scan repeated x``repeat``; K steps
   of the model's sampler (published DPM-Solver++ on the offsets, or the VE steps consistent
   with training from a start timestep t0; :mod:`.diffusion`), optional classifier-free guidance;
3. post-process: drop points beyond ``max_range`` or outside the input's height band
   ``[mean_z - 2 std_z, max_z]``;
4. refine (optional): the refinement net adds 6 offsets per point (x6 points);
5. free space (ours, ``data.free_space_margin``): drop the points that lie in space the scan's
   rays crossed (in front of a return in their direction). Last, so the refinement net sees
   the coarse completion it was trained on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .checkpoints import load_model
from .model import CompletionModel
from .points import farthest_point_sample, in_range, seen_through
from .config import CompletionConfig
from . import diffusion
from .networks import Denoiser
from .sparse import SparseTensor

__all__ = ["ScanError", "CompletionResult", "SceneCompleter", "resolve_device"]


class ScanError(ValueError):
    """A scan that cannot be completed (e.g. no point in range); the message says why."""


@dataclass
class CompletionResult:
    """Completed points (float32 [M, 3]) and what it took to make them."""

    points: np.ndarray
    timings_ms: dict[str, float]
    steps: int
    guidance: float
    nfe: int  # denoiser evaluations
    input_points: int
    used_points: int  # points of the scan inside the range band, before sampling


def randn_tensor(
    shape: Sequence[int],
    generator: Sequence[torch.Generator] | torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise of ``shape``, the same values as diffusers' ``randn_tensor``
    (whose import costs seconds): with a list of generators, row ``i`` of the batch is drawn
    from generator ``i`` (on the generators' device, then moved to ``device``)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
            return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available (use 'auto' or 'cpu')")
    return torch.device(name)


class _Timer:
    def __init__(self, device: torch.device):
        self.device, self.ms = device, {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms[name] = self.ms.get(name, 0.0) + 1000 * (time.perf_counter() - start)


def encode_scans(model: CompletionModel, partial: torch.Tensor) -> SparseTensor:
    """Encode a batch of scans [B, n, 3] (the encoder output is reused at every step)."""
    batch = torch.arange(partial.shape[0], device=partial.device).repeat_interleave(partial.shape[1])
    return model.encoder(model.voxelize(partial.reshape(-1, 3), batch))


def predict_noise(
    model: CompletionModel,
    x_t: torch.Tensor,
    scans: Sequence[SparseTensor],
    t: torch.Tensor,
    denoiser: Denoiser | None = None,
) -> list[torch.Tensor]:
    """Noise prediction [B, N, 3] of ``denoiser`` (default: the model's own; distillation
    passes the teacher, student or an auxiliary net) for each encoded scan; one voxelisation
    for all. Displacement-predicting models are converted (``CompletionModel.as_noise``)."""
    denoiser = model.denoiser if denoiser is None else denoiser
    batch = torch.arange(x_t.shape[0], device=x_t.device).repeat_interleave(x_t.shape[1])
    field_ = model.voxelize(x_t.reshape(-1, 3), batch)
    t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
    return [model.as_noise(denoiser(field_, scan, t).reshape(x_t.shape), t) for scan in scans]


class SceneCompleter:
    """Completes LiDAR scans with a diffusion model; ``complete(points)`` is the whole API."""

    def __init__(self, model: CompletionModel, config: CompletionConfig | None = None):
        self.config = config or CompletionConfig()
        self.device = resolve_device(self.config.device)
        model.use_backend(self.config.backend, self.device)  # fails here, not mid-frame
        self.model = model.to(self.device).eval()
        mc = model.config
        sampling = self.config.sampling
        self.steps = sampling.steps or mc.default_steps
        self.sampler = sampling.sampler or mc.sampler
        self.t0 = sampling.t0 if sampling.t0 is not None else mc.t0
        self.n_part = self.config.data.resolve_n_part(mc.n_part)
        # A model trained on a smaller radius cannot complete beyond it: cap (documented).
        self.max_range = min(self.config.data.max_range, mc.max_range or float("inf"))
        self.sample_bound = 4.0 * self.max_range
        self.guidance = mc.default_guidance if self.config.sampling.guidance is None else self.config.sampling.guidance
        if self.config.refine and model.refiner is None:
            raise ValueError("refine is on but the checkpoint has no refinement net (set refine: false)")
        if self.t0 is not None and not 1 <= self.t0 < mc.num_train_timesteps:
            raise ValueError(f"sampling.t0={self.t0} outside the model's timesteps [1, {mc.num_train_timesteps - 1}]")
        if self.steps > (mc.num_train_timesteps if self.t0 is None else self.t0 + 1):
            raise ValueError(f"sampling.steps={self.steps} exceeds the timesteps available from t0 ({self.t0 or mc.num_train_timesteps - 1})")

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: CompletionConfig | None = None) -> "SceneCompleter":
        return cls(load_model(path), config)

    @property
    def guided(self) -> bool:
        """Guidance costs a second forward per step; w = 0 or 1 means conditional only."""
        return self.guidance not in (0.0, 1.0)

    def preprocess(self, points: np.ndarray) -> tuple[np.ndarray, int]:
        """Range-filtered, FPS-sampled scan [n_part, 3] and the number of points in range."""
        xyz = self.points_in_band(points)
        return farthest_point_sample(xyz, self.n_part), len(xyz)

    def points_in_band(self, points: np.ndarray) -> np.ndarray:
        """The scan's finite points inside the range band, float32 [M, 3]; :class:`ScanError`
        when it is not an [N, >=3] array or no point is left."""
        data = self.config.data
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] < 3:
            raise ScanError(f"expected an [N, 3] array of points, got shape {points.shape}")
        xyz = np.ascontiguousarray(points[:, :3], dtype=np.float32)
        xyz = xyz[in_range(xyz, data.min_range, self.max_range)]  # NaN/inf rows are never in range
        if len(xyz) == 0:
            raise ScanError(
                f"no finite point between {data.min_range} m and {self.max_range} m "
                f"(of {len(points)} points)"
            )
        return xyz

    def postprocess(self, completed: np.ndarray, partial: np.ndarray) -> np.ndarray:
        """Keep points within max range and the input's height band [mean_z - 2 std_z, max_z]
        (bounds inclusive, so a flat scan keeps its plane)."""
        z = partial[:, 2]
        low, high = z.mean() - 2 * z.std(), z.max()
        keep = in_range(completed, max_range=self.max_range) & (completed[:, 2] >= low) & (completed[:, 2] <= high)
        return completed[keep]

    def _generators(self, count: int) -> list[torch.Generator] | None:
        """One generator per scan, all seeded alike: a scan's noise (initial and at every
        SDE step) is then the same whatever batch it is completed in."""
        seed = self.config.sampling.seed
        return None if seed is None else [torch.Generator(self.device).manual_seed(seed) for _ in range(count)]

    def complete(self, points: np.ndarray) -> CompletionResult:
        """Complete one scan ([N, >=3] array, sensor frame, metres)."""
        return self.complete_batch([points])[0]

    @torch.inference_mode()
    def complete_batch(self, scans: Sequence[np.ndarray]) -> list[CompletionResult]:
        """Complete several scans in one batch; raises :class:`ScanError` for an unusable one."""
        if len(scans) == 0:
            return []
        timer = _Timer(self.device)
        with timer.stage("preprocess"):
            in_band = [self.points_in_band(s) for s in scans]
            partial = torch.from_numpy(np.stack([farthest_point_sample(s, self.n_part) for s in in_band])).to(self.device)
        generator = self._generators(len(scans))
        with timer.stage("encode"):
            scans_enc = [encode_scans(self.model, partial)]
            if self.guided:  # unconditional = an all-zero scan
                scans_enc.append(encode_scans(self.model, torch.zeros_like(partial)))
        with timer.stage("sample"):
            x_init = partial.repeat(1, self.config.data.repeat, 1)
            noise = randn_tensor(x_init.shape, generator=generator, device=self.device, dtype=x_init.dtype)
            x_t, nfe = self.sample(x_init, noise, scans_enc, generator)
        results = []
        completed = x_t.cpu().numpy()
        partial_np = partial.cpu().numpy()
        with timer.stage("postprocess"):
            kept = [self.postprocess(c, p) for c, p in zip(completed, partial_np)]
        for index, points_out in enumerate(kept):
            results.append(
                CompletionResult(
                    points=points_out,
                    timings_ms={},
                    steps=self.steps,
                    guidance=self.guidance,
                    nfe=nfe,
                    input_points=len(scans[index]),
                    used_points=len(in_band[index]),
                )
            )
        if self.config.refine:
            with timer.stage("refine"):  # refined points obey the same range and height band
                for result, p in zip(results, partial_np):
                    result.points = self.postprocess(self.refine(result.points), p)
        margin = self.config.data.free_space_margin
        if margin is not None:
            with timer.stage("free_space"):
                for result, scan in zip(results, in_band):
                    result.points = result.points[~seen_through(result.points, scan, margin)]
        timer.ms["total"] = sum(timer.ms.values())
        for result in results:
            result.timings_ms = dict(timer.ms)
        return results

    def sample(
        self,
        x_init: torch.Tensor,
        noise: torch.Tensor,
        scans: list[SparseTensor],
        generator: list[torch.Generator] | None,
    ) -> tuple[torch.Tensor, int]:
        """The model's sampler from ``x_init`` + scaled ``noise``; returns the points and the NFE."""
        nfe = 0

        def guided_noise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal nfe
            predictions = predict_noise(self.model, x_t, scans, t)
            nfe += len(predictions)
            if len(predictions) == 2:
                return predictions[1] + self.guidance * (predictions[0] - predictions[1])
            return predictions[0]

        sampler = diffusion.make_sampler(self.model.config, self.sampler, self.steps, self.t0)
        # Diverging points (a weak model under strong guidance) stay inside a box: they are
        # dropped by post-processing anyway and must not overflow voxel coordinates.
        x_t = diffusion.sample(guided_noise, sampler, x_init, noise, generator, bound=self.sample_bound)
        return x_t, nfe

    @torch.inference_mode()
    def refine(self, points: np.ndarray) -> np.ndarray:
        """Six refined points per input point: p + offset_k, k = 1..6."""
        if len(points) == 0:
            return points
        p = torch.from_numpy(points).to(self.device)
        offsets = self.model.refiner(self.model.voxelize(p))
        return (p[:, None, :] + offsets.reshape(-1, 6, 3)).reshape(-1, 3).cpu().numpy()
