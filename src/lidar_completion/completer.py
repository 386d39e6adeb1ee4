"""The one completion pipeline: scan in, the scan plus its completion out, with per-stage timings.

The ROS node, the offline CLI, the benchmarks, evaluation and training validation all call
:class:`SceneCompleter`; none re-implements a stage. Stages (1-4 as published):

1. pre-process: finite points inside the model's scan cut (:class:`~.config.ScanCut`:
   ``min_range < r < max_range``, ``z > min_z`` when the model records a height floor; the
   ``data.*`` keys set override it, :func:`~.config.effective_cut`), farthest-point sampled
   to the model's budget: ``n_part`` scaled to the density the model was trained at (ours:
   a cropped field of view gets proportionally fewer points, :meth:`model_budget`);
2. sample: start at ``x_init + sigma eps`` with ``x_init`` = scan repeated x``repeat``; K steps
   of the model's sampler (published DPM-Solver++ on the offsets, or the VE steps consistent
   with training from a start timestep t0; :mod:`.diffusion`), optional classifier-free
   guidance; each point's predicted noise is clipped to ``sampling.noise_clip`` (ours), so
   no point can run away, and the clipped predictions are counted;
3. post-process: drop points beyond ``max_range`` or outside the input's height band
   ``[mean_z - 2 std_z, max_z]`` (+- ``HEIGHT_TOLERANCE``);
4. refine (optional): the refinement net adds 6 offsets per point (x6 points);
5. free space (ours, ``data.free_space_margin``): drop the points that lie in space the scan's
   rays crossed (in front of a return in their direction). After refinement, so the
   refinement net sees the coarse completion it was trained on;
6. compose (ours): the output is every finite measured point of the scan (whole range, its
   intensity, ``measured``) plus the completed points not within ``data.compose_distance``
   of a return and backed by ``data.compose_support`` other completed points within twice
   that distance; ``data.completion_only`` returns the completed points alone.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, cast

import numpy as np
import torch

from .checkpoints import CheckpointError, RefinerError, load_model, locate_checkpoint, with_refiner
from .model import CompletionModel
from .points import density_matched_count, farthest_point_sample, in_range, near_measured, seen_through, supported
from .config import CompletionConfig, effective_cut
from . import diffusion
from .diffusion import Cancelled
from .networks import Denoiser
from .sparse import SparseTensor

__all__ = ["Cancelled", "ScanError", "CompletionResult", "SceneCompleter", "resolve_device", "OUT_OF_DOMAIN_CLIPPED"]


class ScanError(ValueError):
    """A scan that cannot be completed (e.g. no point in range); the message says why."""


# A scan whose noise predictions were mostly clipped lies outside what the model knows: its
# completion is reported as out of domain (WARN), never as a normal one.
OUT_OF_DOMAIN_CLIPPED = 0.5
# Height band tolerance (m): a flat scan (std 0) must keep the completed plane, whose points
# carry the sampler's own few-centimetre noise.
HEIGHT_TOLERANCE = 0.1


@dataclass
class CompletionResult:
    """The output cloud (float32 [M, 3]: the measured scan, then the completed points; or
    the completed points alone with ``completion_only``) and what it took to make it."""

    points: np.ndarray
    timings_ms: dict[str, float]
    steps: int
    guidance: float
    nfe: int  # denoiser evaluations
    input_points: int
    used_points: int  # points of the scan inside the range band, before sampling
    measured: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [M]: a scan point
    intensity: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # [M]; 0 if completed
    model_points: int = 0  # scan points the model was given (the density-matched budget)
    sampled_points: int = 0  # points the model sampled, before post-processing
    clipped: int = 0  # noise predictions clipped (sampling.noise_clip), over all points and steps
    radius: float = 0.0  # how far completion reaches (m); beyond it the scan passes unchanged

    @property
    def completed_points(self) -> int:
        """Points the completion added (``measured`` 0)."""
        return int(len(self.points) - np.count_nonzero(self.measured))

    @property
    def clipped_fraction(self) -> float:
        """Share of the sampler's per-point noise predictions that were clipped."""
        total = self.sampled_points * max(1, self.steps)
        return self.clipped / total if total else 0.0

    @property
    def domain_problem(self) -> str:
        """Why this is not a completion to trust (nothing completed, or mostly clipped); "" if none."""
        if self.completed_points == 0:
            return "no completed point was added"
        if self.clipped_fraction > OUT_OF_DOMAIN_CLIPPED:
            return f"{100 * self.clipped_fraction:.0f}% of the noise predictions were clipped"
        return ""

    @property
    def out_of_domain(self) -> bool:
        """Mostly clipped, or nothing completed: not a completion to trust."""
        return bool(self.domain_problem)


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
    single = cast("torch.Generator | None", generator)  # lists and tuples are handled above
    gen_device = single.device if single is not None else device
    return torch.randn(tuple(shape), generator=single, device=gen_device, dtype=dtype).to(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available (use 'auto' or 'cpu')")
    return torch.device(name)


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = {}

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
        """``ValueError`` naming the key when ``config`` does not fit ``model`` (refine without
        a refinement net, no range band left under the model's radius, t0 or steps beyond its
        timesteps); ``RuntimeError`` for a device or backend that is not there."""
        config = config or CompletionConfig()
        # Where the weights came from (set by from_checkpoint; None for a model built in memory).
        self.checkpoint: Path | None = None
        self.refine_checkpoint: Path | None = None
        mc = model.config
        # The cut scans get: the model's, with the data.* keys that are set over it; the radius
        # capped at the model's (documented). No band left under it: ValueError.
        self.cut = effective_cut(config.data, mc.cut)
        # The config as run: data.min_range / data.repeat left unset (the model's) read as the
        # model's values; data.max_range keeps None ("the model's radius"; self.max_range is it).
        self.config = config.replace(**{"data.min_range": self.cut.min_range, "data.repeat": self.cut.repeat})
        self.device = resolve_device(self.config.device)
        model.use_backend(self.config.backend, self.device)  # fails here, not mid-frame
        self.model = model.to(self.device).eval()
        sampling = self.config.sampling
        self.steps = sampling.steps or mc.default_steps
        self.sampler = sampling.sampler or mc.sampler
        self.t0 = sampling.t0 if sampling.t0 is not None else mc.t0
        self.n_part = self.cut.n_part
        self.max_range = self.cut.max_range
        self.sample_bound = 4.0 * self.max_range
        self.guidance = mc.default_guidance if self.config.sampling.guidance is None else self.config.sampling.guidance
        if self.config.refine and model.refiner is None:
            raise ValueError("refine is on but the checkpoint has no refinement net (set refine: false)")
        if self.t0 is not None and not 1 <= self.t0 < mc.num_train_timesteps:
            raise ValueError(f"sampling.t0={self.t0} outside the model's timesteps [1, {mc.num_train_timesteps - 1}]")
        if self.steps > (mc.num_train_timesteps if self.t0 is None else self.t0 + 1):
            raise ValueError(f"sampling.steps={self.steps} exceeds the timesteps available from t0 ({self.t0 or mc.num_train_timesteps - 1})")

    @classmethod
    def from_checkpoint(cls, name_or_path: str | Path, config: CompletionConfig | None = None,
                        refine_checkpoint: str | Path | None = None) -> "SceneCompleter":
        """The completer of a checkpoint: a path (directory, ``.safetensors``, published
        ``.ckpt``) or the name of a shipped model (``student_lite``); ``refine_checkpoint``
        (path or name) replaces its refinement net. The one way every front end (CLI, node,
        evaluation, benchmarks) goes from a checkpoint to a completer.

        :class:`~lidar_completion.checkpoints.CheckpointError` when the checkpoint is missing
        or refused (:class:`~lidar_completion.checkpoints.RefinerError` for the refinement
        checkpoint), then the constructor's ``ValueError`` when ``config`` does not fit it."""
        path = locate_checkpoint(name_or_path)
        model = load_model(path)
        refine_path = None
        if refine_checkpoint is not None:
            try:
                refine_path = locate_checkpoint(refine_checkpoint, "refinement checkpoint")
                model = with_refiner(model, refine_path)
            except CheckpointError as err:
                raise RefinerError(str(err)) from None
        completer = cls(model, config)
        completer.checkpoint, completer.refine_checkpoint = path, refine_path
        return completer

    @property
    def guided(self) -> bool:
        """Guidance costs a second forward per step; w = 0 or 1 means conditional only."""
        return self.guidance not in (0.0, 1.0)

    def preprocess(self, points: np.ndarray) -> tuple[np.ndarray, int]:
        """Range-filtered scan FPS-sampled to the model's budget ([n, 3], n <= n_part) and the
        number of points in range."""
        xyz = self.points_in_band(points)
        return farthest_point_sample(xyz, self.model_budget(xyz)), len(xyz)

    def points_in_band(self, points: np.ndarray) -> np.ndarray:
        """The scan's finite points inside the range band, float32 [M, 3]; :class:`ScanError`
        when it is not an [N, >=3] array or no point is left."""
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[1] < 3:
            raise ScanError(f"expected an [N, 3] array of points, got shape {points.shape}")
        xyz = np.ascontiguousarray(points[:, :3], dtype=np.float32)
        cut = self.cut
        keep = in_range(xyz, cut.min_range, cut.max_range)  # NaN/inf rows are never in range
        if cut.min_z is not None:
            keep &= xyz[:, 2] > cut.min_z
        xyz = xyz[keep]
        if len(xyz) == 0:
            raise ScanError(
                f"no finite point between {cut.min_range} m and {cut.max_range} m "
                + (f"above z = {cut.min_z:g} m " if cut.min_z is not None else "")
                + f"(of {len(points)} points)"
            )
        return xyz

    def postprocess(self, completed: np.ndarray, partial: np.ndarray) -> np.ndarray:
        """Keep points within max range and the input's height band [mean_z - 2 std_z, max_z]
        widened by ``HEIGHT_TOLERANCE`` (so a flat scan keeps its completed plane)."""
        z = partial[:, 2]
        low, high = z.mean() - 2 * z.std() - HEIGHT_TOLERANCE, z.max() + HEIGHT_TOLERANCE
        keep = in_range(completed, max_range=self.max_range) & (completed[:, 2] >= low) & (completed[:, 2] <= high)
        return completed[keep]

    def model_budget(self, in_band: np.ndarray) -> int:
        """Scan points the model gets: ``n_part`` scaled to the trained density (a cropped field
        of view gets proportionally fewer; :func:`~lidar_completion.points.density_matched_count`)."""
        return density_matched_count(in_band, self.n_part, self.model.config.surface_cells)

    def _generators(self, count: int) -> list[torch.Generator] | None:
        """One generator per scan, all seeded alike: a scan's noise (initial and at every
        SDE step) is then the same whatever batch it is completed in."""
        seed = self.config.sampling.seed
        return None if seed is None else [torch.Generator(self.device).manual_seed(seed) for _ in range(count)]

    def complete(self, points: np.ndarray, should_stop: Callable[[], bool] | None = None) -> CompletionResult:
        """Complete one scan ([N, >=3] array, sensor frame, metres)."""
        return self.complete_batch([points], should_stop)[0]

    @torch.inference_mode()
    def complete_batch(self, scans: Sequence[np.ndarray],
                       should_stop: Callable[[], bool] | None = None) -> list[CompletionResult]:
        """Complete several scans ([N, >=3] arrays, sensor frame, metres; a 4th column is the
        intensity) in one batch per point budget; :class:`ScanError` for an unusable one.
        ``should_stop()`` is asked before every sampler step and before refinement: when it
        is true the batch is abandoned with :class:`Cancelled` (e.g. the node shuts down)."""
        if len(scans) == 0:
            return []
        timer = _Timer(self.device)
        with timer.stage("preprocess"):
            partial, used = zip(*(self.preprocess(s) for s in scans))
        budgets = [len(p) for p in partial]
        completed: list[np.ndarray] = [np.zeros((0, 3), np.float32)] * len(scans)
        clipped = [0] * len(scans)
        nfe = 0
        for budget in sorted(set(budgets)):  # scans of one budget share a batch (usually all)
            rows = [i for i, n in enumerate(budgets) if n == budget]
            points, counts, nfe = self.sample_scans(np.stack([partial[i] for i in rows]), timer, should_stop)
            for k, i in enumerate(rows):
                completed[i], clipped[i] = points[k], int(counts[k])
        with timer.stage("postprocess"):
            kept = [self.postprocess(c, p) for c, p in zip(completed, partial)]
        if self.config.refine:
            if should_stop is not None and should_stop():
                raise Cancelled("stopped before refinement")
            with timer.stage("refine"):  # refined points obey the same range and height band
                kept = [self.postprocess(self.refine(k), p) for k, p in zip(kept, partial)]
        measured = [self._finite(s) for s in scans]
        margin = self.config.data.free_space_margin
        if margin is not None:
            with timer.stage("free_space"):  # every return, far ones too, shows free space
                kept = [k[~seen_through(k, m[0], margin)] for k, m in zip(kept, measured)]
        with timer.stage("compose"):
            outputs = [self._compose(k, m) for k, m in zip(kept, measured)]
        timer.ms["total"] = sum(timer.ms.values())
        return [
            CompletionResult(
                points=points,
                timings_ms=dict(timer.ms),
                steps=self.steps,
                guidance=self.guidance,
                nfe=nfe,
                input_points=len(scans[i]),
                used_points=used[i],
                measured=is_measured,
                intensity=intensity,
                model_points=budgets[i],
                sampled_points=len(completed[i]),
                clipped=clipped[i],
                radius=self.max_range,
            )
            for i, (points, is_measured, intensity) in enumerate(outputs)
        ]

    @torch.inference_mode()
    def sample_scans(self, partial_np: np.ndarray, timer: _Timer | None = None,
                     should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """The model's raw sample [B, n * repeat, 3] (before post-processing) of pre-processed
        scans [B, n, 3], the clipped noise predictions per scan, and the NFE
        (:class:`Cancelled` when ``should_stop()`` turns true between two steps)."""
        timer = timer or _Timer(self.device)
        partial = torch.from_numpy(partial_np).to(self.device)
        generator = self._generators(len(partial))
        with timer.stage("encode"):
            scans_enc = [encode_scans(self.model, partial)]
            if self.guided:  # unconditional = an all-zero scan
                scans_enc.append(encode_scans(self.model, torch.zeros_like(partial)))
        with timer.stage("sample"):
            x_init = partial.repeat(1, self.cut.repeat, 1)
            noise = randn_tensor(x_init.shape, generator=generator, device=self.device, dtype=x_init.dtype)
            clipped = torch.zeros(len(partial), dtype=torch.long, device=self.device)
            x_t, nfe = self.sample(x_init, noise, scans_enc, generator, clipped, should_stop)
        return x_t.cpu().numpy(), clipped.cpu().numpy(), nfe

    @staticmethod
    def _finite(scan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The scan's finite points (float32 [N, 3]) and their intensity (4th column, else 0)."""
        scan = np.asarray(scan)
        xyz = np.ascontiguousarray(scan[:, :3], dtype=np.float32)
        finite = np.isfinite(xyz).all(axis=1)
        intensity = scan[:, 3].astype(np.float32) if scan.shape[1] > 3 else np.zeros(len(scan), np.float32)
        return xyz[finite], intensity[finite]

    def _compose(self, completed: np.ndarray, measured: tuple[np.ndarray, np.ndarray]):
        """(points, measured mask, intensity): the scan, then the completed points that add to it
        (none within ``data.compose_distance`` of a return, none without ``data.compose_support``
        completed neighbours); the completion alone with ``data.completion_only``."""
        completed = np.ascontiguousarray(completed, dtype=np.float32)
        data = self.config.data
        if data.completion_only:
            return completed, np.zeros(len(completed), bool), np.zeros(len(completed), np.float32)
        xyz, intensity = measured
        added = completed[~near_measured(completed, xyz, data.compose_distance)]
        added = added[supported(added, 2 * data.compose_distance, data.compose_support)]
        points = np.concatenate([xyz, added])
        is_measured = np.concatenate([np.ones(len(xyz), bool), np.zeros(len(added), bool)])
        return points, is_measured, np.concatenate([intensity, np.zeros(len(added), np.float32)])

    def sample(
        self,
        x_init: torch.Tensor,
        noise: torch.Tensor,
        scans: list[SparseTensor],
        generator: list[torch.Generator] | None,
        clipped: torch.Tensor | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The model's sampler from ``x_init`` + scaled ``noise``; returns the points and the NFE
        (clipped noise predictions per scan are added to ``clipped``; ``should_stop``: see
        :func:`~lidar_completion.diffusion.sample`)."""
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
        x_t = diffusion.sample(guided_noise, sampler, x_init, noise, generator, bound=self.sample_bound,
                               noise_clip=self.config.sampling.noise_clip, clipped=clipped,
                               should_stop=should_stop)
        return x_t, nfe

    @torch.inference_mode()
    def refine(self, points: np.ndarray) -> np.ndarray:
        """Six refined points per input point: p + offset_k, k = 1..6."""
        if len(points) == 0:
            return points
        assert self.model.refiner is not None, "refine() needs a model with a refiner"
        p = torch.from_numpy(points).to(self.device)
        offsets = self.model.refiner(self.model.voxelize(p))
        return (p[:, None, :] + offsets.reshape(-1, 6, 3)).reshape(-1, 3).cpu().numpy()
