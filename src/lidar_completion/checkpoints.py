"""Loading and saving models: published Lightning checkpoints and the project's own format.

The project's format is a directory (or a ``.safetensors`` file with a sibling ``.json``)
holding ``model.safetensors`` — weights under ``encoder.``, ``denoiser.`` and optionally
``refiner.`` — and ``config.json``, the :class:`ModelConfig` that names widths, voxel size
and diffusion schedule. Nothing is ever unpickled beyond plain tensors: pickled files go
through ``torch.load(..., weights_only=True)``.

Every failure (missing file, truncated or corrupt file, wrong keys or shapes) raises one
:class:`CheckpointError` naming the file and the first offending key and shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import SAMPLERS
from .networks import Denoiser, RefinementNet, ScanEncoder, channel_widths, BASE_CHANNELS
from .sparse import PointField, voxelize

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "CompletionModel",
    "load_model",
    "save_model",
    "load_published",
    "PUBLISHED_PREFIXES",
    "SHIPPED_MODELS",
    "find_checkpoint",
]

FORMAT_VERSION = 1

# Lightning ``state_dict`` prefixes of the published checkpoints: (encoder, denoiser).
# The student file also holds ``teacher.`` and ``auxDiff*.`` nets, which are ignored.
PUBLISHED_PREFIXES: dict[str, tuple[str, str]] = {
    "distillation_dpo_student": ("partial_enc.", "generator."),
    "lidiff_dpo_teacher": ("DM_encoder.", "DiffModel."),
    "lidiff": ("partial_enc.", "model."),
}
REFINE_PREFIX = "model_refine."
# Trained checkpoints shipped inside the package (see models/MODEL_CARD.md).
SHIPPED_MODELS = Path(__file__).resolve().parent / "models"


def find_checkpoint(name_or_path: str | os.PathLike) -> Path | None:
    """An existing path, or the bare name of a shipped model (e.g. ``student_lite``); else None.

    One lookup for the CLI and the ROS node, which each word their own error.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    if len(path.parts) == 1 and (SHIPPED_MODELS / path).exists():
        return SHIPPED_MODELS / path
    return None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


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
    default_steps: int = 50
    default_guidance: float = 6.0
    # Sampler the model runs with by default: "dpmsolver++" (published) or "ve" (consistent
    # with the local training process; see diffusion.py), from start timestep t0 (None: T - 1).
    sampler: str = "dpmsolver++"
    t0: int | None = None
    n_part: int | None = None  # scan points the model was trained with (the "model" preset)
    max_range: float | None = None  # radius it was trained on; the pipeline never goes beyond
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
        if self.t0 is not None and not 1 <= self.t0 < self.num_train_timesteps:
            raise ValueError(f"t0 must be in [1, {self.num_train_timesteps - 1}], got {self.t0}")
        if self.n_part is not None and not 16 <= self.n_part <= 200_000:
            raise ValueError(f"n_part must be in [16, 200000], got {self.n_part}")
        if self.max_range is not None and not 3.5 < self.max_range <= 500:
            raise ValueError(f"max_range must be in (3.5, 500] m, got {self.max_range}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"model format {self.format_version} is newer than this library ({FORMAT_VERSION})"
            )

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)


class CompletionModel(nn.Module):
    """Encoder + denoiser (+ optional refinement net) and the config they were built from."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = ScanEncoder(config.channel_ratio)
        self.denoiser = Denoiser(config.channel_ratio)
        ratio = config.refine_channel_ratio
        self.refiner = RefinementNet(ratio) if ratio is not None else None
        self.backend = "torch"  # sparse-conv backend of voxelize(); not part of the weights

    def use_backend(self, backend: str, device: torch.device | str = "cpu") -> None:
        """Run the sparse convolutions on ``backend`` ("torch" or "minkowski"); fails now,
        saying how to install it, if MinkowskiEngine cannot run on ``device``."""
        if backend == "minkowski":
            from .minkowski import require

            require(device)
        elif backend != "torch":
            raise ValueError(f"unknown sparse backend {backend!r} (use 'torch' or 'minkowski')")
        self.backend = backend

    def voxelize(self, points: torch.Tensor, batch: torch.Tensor | None = None) -> PointField:
        """The model's voxelisation (its voxel size, on its backend) of [N, 3] points."""
        return voxelize(points, batch, self.config.voxel_size, backend=self.backend)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: CompletionModel, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` atomically into ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "lidar_completion"}))
    text = json.dumps(dataclasses.asdict(model.config), indent=2) + "\n"
    _atomic_write(out / "config.json", lambda p: Path(p).write_text(text))
    return out


def _check_state(path: Path, expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    """Raise on the first missing, unexpected or mis-shaped key (sorted for stable messages)."""
    for key, ref in expected.items():
        if key not in given:
            raise CheckpointError(f"{path}: missing key {key!r} (expected shape {list(ref.shape)})")
        if tuple(given[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: key {key!r} has shape {list(given[key].shape)}, expected {list(ref.shape)}"
            )
    for key in given:
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected key {key!r} with shape {list(given[key].shape)}")


def _build(path: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> CompletionModel:
    model = CompletionModel(config)
    _check_state(path, model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _resolve_native(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path / "model.safetensors", path / "config.json"
    return path, path.with_suffix(".json")


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CompletionModel:
    """Load a project checkpoint (directory or .safetensors) or a published Lightning .ckpt."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix in (".ckpt", ".pt", ".pth"):
        return load_published(path, map_location=map_location)
    weights, config_path = _resolve_native(path)
    if not weights.is_file():
        raise CheckpointError(f"{path}: no weights file {weights.name}")
    if not config_path.is_file():
        raise CheckpointError(f"{weights}: no model config {config_path.name} next to it")
    try:
        config = ModelConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: invalid model config: {err}") from None
    try:
        from safetensors.torch import load_file

        state = load_file(weights, device=str(map_location))
    except Exception as err:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"{weights}: cannot read weights ({type(err).__name__}: {err})") from None
    return _build(weights, config, state)


def _read_pickled_state(path: Path, map_location) -> dict[str, torch.Tensor]:
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint ({first_line})") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors inside")
    return state


def _ratio_from_stem(path: Path, state: dict[str, torch.Tensor], prefix: str) -> float:
    key = f"{prefix}stem.0.kernel"
    if key not in state:
        raise CheckpointError(f"{path}: missing key {key!r}")
    return state[key].shape[-1] / BASE_CHANNELS[0]


def load_published(
    path: str | os.PathLike,
    refine_path: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    **config_overrides,
) -> CompletionModel:
    """Load a published LiDiff / Diffusion-DPO / Distillation-DPO Lightning checkpoint.

    The layout is recognised from the ``state_dict`` prefixes; the channel ratio is read
    from the stem width. ``refine_path`` optionally adds a published refinement checkpoint
    (prefix ``model_refine.``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = _read_pickled_state(path, map_location)
    for name, (enc_prefix, den_prefix) in PUBLISHED_PREFIXES.items():
        if any(k.startswith(den_prefix) for k in state) and any(k.startswith(enc_prefix) for k in state):
            break
    else:
        sample = next(iter(state), "<empty>")
        raise CheckpointError(
            f"{path}: not a known published layout (first key {sample!r}; expected prefixes "
            + ", ".join(f"{e}+{d}" for e, d in PUBLISHED_PREFIXES.values())
            + ")"
        )
    ours = {f"encoder.{k[len(enc_prefix):]}": v for k, v in state.items() if k.startswith(enc_prefix)}
    ours |= {f"denoiser.{k[len(den_prefix):]}": v for k, v in state.items() if k.startswith(den_prefix)}
    student = name == "distillation_dpo_student"
    values = {
        "channel_ratio": _ratio_from_stem(path, state, den_prefix),
        "kind": "student" if student else "teacher",
        "default_steps": 1 if student else 50,
        "default_guidance": 3.5 if student else 6.0,
        "description": f"published {name} checkpoint {path.name}",
    }
    if refine_path is not None:
        refine_path = Path(refine_path)
        if not refine_path.exists():
            raise CheckpointError(f"checkpoint not found: {refine_path}")
        refine_state = _read_pickled_state(refine_path, map_location)
        ours |= {
            f"refiner.{k[len(REFINE_PREFIX):]}": v for k, v in refine_state.items() if k.startswith(REFINE_PREFIX)
        }
        values["refine_channel_ratio"] = _ratio_from_stem(refine_path, refine_state, REFINE_PREFIX)
    config = ModelConfig(**(values | config_overrides))
    return _build(path, config, ours)
