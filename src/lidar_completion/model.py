"""The completion model and the config it is built from.

:class:`ModelConfig` is everything that travels with the weights: widths, voxel size, the
diffusion schedule, the sampler and its defaults (steps, guidance, start timestep), what the
denoiser predicts, and the scan cut it was trained with (:class:`~.config.ScanCut`: range
band, height floor, point budget, repeat).
:class:`CompletionModel` is the encoder, the denoiser and the optional refinement net built
from it. Reading and writing them is :mod:`.checkpoints`' job; sampling is :mod:`.diffusion`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backends import SparseBackend, get_backend
from .config import PREDICTIONS, SAMPLERS, ScanCut, check, check_keys, check_types
from .diffusion import NoiseSchedule
from .networks import Denoiser, RefinementNet, ScanEncoder, channel_widths
from .sparse import PointField

__all__ = ["FORMAT_VERSION", "PUBLISHED_DEFAULTS", "ModelConfig", "CompletionModel"]

# 2: the scan cut is recorded ("cut"); version 1 files carry only n_part / max_range at the top
# level, which still load (ModelConfig.from_dict).
FORMAT_VERSION = 2

# The published sampler defaults per model kind: a teacher runs 50 steps at guidance 6, a
# Distillation-DPO student one step at guidance 3.5.
PUBLISHED_DEFAULTS: dict[str, dict[str, int | float]] = {
    "teacher": {"default_steps": 50, "default_guidance": 6.0},
    "student": {"default_steps": 1, "default_guidance": 3.5},
}


@dataclass(frozen=True)
class ModelConfig:
    """Model-bound parameters that travel with the weights."""

    channel_ratio: float = 1.0
    refine_channel_ratio: float | None = None
    voxel_size: float = 0.05
    beta_start: float = 3.5e-5
    beta_end: float = 0.007
    num_train_timesteps: int = 1000
    kind: str = "teacher"  # "teacher" or "student": sets the default steps and guidance
    default_steps: int = int(PUBLISHED_DEFAULTS["teacher"]["default_steps"])
    default_guidance: float = PUBLISHED_DEFAULTS["teacher"]["default_guidance"]
    # Sampler the model runs with by default: "dpmsolver++" (published) or "ve" (consistent
    # with the local training process; see diffusion.py), from start timestep t0 (None: T - 1).
    sampler: str = "dpmsolver++"
    t0: int | None = None
    # What the denoiser outputs: "epsilon" (the noise, published) or "displacement" (the move
    # x_0 - x_t onto the scene, = -sigma_t eps). Both are read back as a noise prediction.
    prediction: str = "epsilon"
    # How its scans were cut in training (range band, height floor, n_part, repeat): the
    # pipeline's defaults (config.effective_cut); never beyond its max_range. None: a model
    # that records none (a published checkpoint). Files written before the cut was recorded
    # carry top-level n_part / max_range: from_dict reads them (ScanCut.recorded_before).
    cut: ScanCut | None = None
    # Occupied 0.5 m voxels of a typical whole training scan inside that radius: n_part points
    # over this much surface is the density the model was trained at, which the pipeline
    # keeps for any field of view (points.density_matched_count). None: always n_part.
    surface_cells: int | None = None
    description: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        channel_widths(self.channel_ratio)
        if self.refine_channel_ratio is not None:
            channel_widths(self.refine_channel_ratio)
        if not 0 < self.voxel_size < 10:
            raise ValueError(f"voxel_size must be in (0, 10) m, got {self.voxel_size}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError("need 0 < beta_start < beta_end < 1")
        if self.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be >= 2")
        if self.kind not in ("teacher", "student"):
            raise ValueError(f"kind must be 'teacher' or 'student', got {self.kind!r}")
        if not 1 <= self.default_steps <= self.num_train_timesteps:
            raise ValueError("default_steps must be in [1, num_train_timesteps]")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        if self.t0 is not None and not 1 <= self.t0 < self.num_train_timesteps:
            raise ValueError(f"t0 must be in [1, {self.num_train_timesteps - 1}], got {self.t0}")
        if self.cut is not None and not isinstance(self.cut, ScanCut):
            raise ValueError(f"cut must be a ScanCut, got {self.cut!r}")
        if self.surface_cells is not None and not 1 <= self.surface_cells <= 10_000_000:
            raise ValueError(f"surface_cells must be in [1, 10000000], got {self.surface_cells}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"model format {self.format_version} is newer than this library ({FORMAT_VERSION})"
            )

    @property
    def n_part(self) -> int | None:
        """Scan points the model was trained with (the "model" preset); None: not recorded."""
        return None if self.cut is None else self.cut.n_part

    @property
    def max_range(self) -> float | None:
        """Radius (m) it was trained on; the pipeline never goes beyond. None: not recorded."""
        return None if self.cut is None else self.cut.max_range

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        values = dict(values)
        legacy = {key: values.pop(key) for key in ("n_part", "max_range") if key in values}
        cut = values.pop("cut", None)
        check(not (legacy and cut is not None), "cut", f"given with the older {', '.join(legacy)} (one or the other)")
        check_types(values, cls)
        check_keys(values, cls, "model config")
        if cut is not None:
            check(isinstance(cut, dict), "cut", f"must be a mapping, got {cut!r}")
            values["cut"] = ScanCut.from_dict(cut)
        elif any(v is not None for v in legacy.values()):
            check_types(legacy, _Recorded)
            values["cut"] = ScanCut.recorded_before(legacy.get("n_part"), legacy.get("max_range"))
        return cls(**values)


@dataclass(frozen=True)
class _Recorded:
    """The types of the cut's keys in a ``config.json`` written before the cut was recorded."""

    n_part: int | None = None
    max_range: float | None = None


class CompletionModel(nn.Module):
    """Encoder + denoiser (+ optional refinement net) and the config they were built from."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = ScanEncoder(config.channel_ratio)
        self.denoiser = Denoiser(config.channel_ratio)
        ratio = config.refine_channel_ratio
        self.refiner = RefinementNet(ratio) if ratio is not None else None
        self.backend: SparseBackend = get_backend("torch")  # of voxelize(); not part of the weights
        self.schedule = NoiseSchedule.of(config)

    def as_noise(self, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output [B, N, 3] at timesteps ``t`` [B] read as a noise prediction."""
        if self.config.prediction == "epsilon":
            return output
        return -output / self.schedule.noise_scale(t).view(-1, 1, 1)

    def use_backend(self, backend: str, device: torch.device | str = "cpu") -> None:
        """Run the sparse convolutions on the backend called ``backend`` (:mod:`.backends`);
        fails now, saying what to do, if it cannot run on ``device``."""
        self.backend = get_backend(backend, device)

    def voxelize(self, points: torch.Tensor, batch: torch.Tensor | None = None) -> PointField:
        """The model's voxelisation (its voxel size, on its backend) of [N, 3] points."""
        return self.backend.voxelize(points, batch, self.config.voxel_size)
