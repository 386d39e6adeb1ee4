"""Loading and saving models (file I/O only): published Lightning checkpoints and the project's own format.

The project's format is a directory (or a ``.safetensors`` file with a sibling ``.json``)
holding ``model.safetensors`` — weights under ``encoder.``, ``denoiser.`` and optionally
``refiner.`` — and ``config.json``, the :class:`~lidar_completion.model.ModelConfig` that
names widths, voxel size, diffusion schedule and sampler (the model itself is in
:mod:`.model`). Nothing is ever unpickled beyond plain tensors: pickled files go through
``torch.load(..., weights_only=True)``.

Every failure (missing file, truncated or corrupt file, wrong keys or shapes) raises one
:class:`CheckpointError` naming the file and the first offending key and shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .model import PUBLISHED_DEFAULTS, CompletionModel, ModelConfig
from .networks import BASE_CHANNELS

# CompletionModel and ModelConfig live in .model; importing them from here still works.
__all__ = [
    "CheckpointError",
    "RefinerError",
    "load_model",
    "save_model",
    "load_published",
    "read_refiner",
    "with_refiner",
    "PUBLISHED_PREFIXES",
    "SHIPPED_MODELS",
    "find_checkpoint",
    "locate_checkpoint",
    "shipped_models",
    "read_weights_only",
]

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


def shipped_models() -> list[str]:
    """Names of the models shipped in :data:`SHIPPED_MODELS` (directories with a
    ``config.json``; not the model card or other files beside them), sorted."""
    if not SHIPPED_MODELS.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS.iterdir() if (p / "config.json").is_file())


def find_checkpoint(name_or_path: str | os.PathLike) -> Path | None:
    """An existing path, or the bare name of a shipped model (e.g. ``student_lite``); else None.

    One lookup for the CLI and the ROS node, which each word their own error.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    if len(path.parts) == 1 and str(path) in shipped_models():
        return SHIPPED_MODELS / path
    return None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class RefinerError(CheckpointError):
    """A separate refinement checkpoint (``refine_checkpoint``) that cannot be used."""


def locate_checkpoint(name_or_path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """:func:`find_checkpoint`, or :class:`CheckpointError`: for a bare name that is neither a
    file nor a shipped model, one line that lists the shipped models; for a path, the path
    itself (the loader then says it is missing). ``what`` names the file in that line."""
    found = find_checkpoint(name_or_path)
    path = Path(name_or_path)
    if found is None and len(path.parts) == 1:
        raise CheckpointError(f"{what} not found: {path} (no such file or directory, and no shipped model of that "
                              f"name; shipped models: {', '.join(shipped_models()) or 'none'})")
    return found or path


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
    # Shapes first, on the meta device: a config that does not fit the weights (a damaged
    # config.json naming channel_ratio 60, say) must not allocate gigabytes before it fails.
    with torch.device("meta"):
        expected = CompletionModel(config).state_dict()
    _check_state(path, expected, state)
    model = CompletionModel(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # e.g. a tensor of a type that cannot be copied into a parameter
        first = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot use weights ({first})") from None
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


ZIP_MAGIC = b"PK\x03\x04"
# Globals a weights-only load allows anyway: naming them in a refusal would mislead.
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")


def _pickle_globals(path: Path, limit: int = 64 << 20) -> list[str]:
    """``module.name`` of the globals a raw (non-zip) pickle would import, found by
    parsing its opcodes with :mod:`pickletools` (nothing is executed or imported)."""
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for op, arg, pos in pickletools.genops(handle):
                if pos is not None and pos > limit:
                    break
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a broken pickle: report what was found before the damage
        pass
    return found


def _unsafe_global(path: Path, message: str) -> str | None:
    """The code a pickled file would run (``posix.system``), or None if it names none:
    for a raw pickle the first import outside torch found in its opcodes, else the global
    torch's weights-only unpickler refused."""
    import re

    try:
        with open(path, "rb") as handle:
            is_zip = handle.read(4) == ZIP_MAGIC
    except OSError:
        is_zip = True
    if not is_zip:
        unsafe = [g for g in _pickle_globals(path) if not g.startswith(_SAFE_GLOBAL_PREFIXES)]
        if unsafe:
            return unsafe[0]
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def _not_a_checkpoint_reason(err: BaseException) -> str:
    """torch's error in a few words, without its advice to load the file unsafely."""
    import re

    text = str(err)
    if isinstance(err, EOFError) or not text.strip():
        return "empty or truncated file"
    if "zip archive" in text or "PytorchStreamReader" in text:
        first = text.split(". ")[0].split(": ", 1)[-1]
        return f"corrupt or truncated zip archive ({first})"
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", text)
    if match:
        return f"not a torch.save file of tensors ({match.group(1).strip().rstrip('.')})"
    first = text.strip().splitlines()[0]
    return first[:200]


def read_weights_only(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """A torch.save file read with ``weights_only=True``; one :class:`CheckpointError`
    ("refused: ..." for pickled code, "not a checkpoint: ..." for anything else unreadable)
    instead of torch's advice to load it unsafely. Also for ``lidar-train --resume``."""
    import warnings

    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about legacy (non-zip) files: not our user's business
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        code = _unsafe_global(path, str(err))
        if code is not None:
            raise CheckpointError(
                f"refused: {path} is not a weights-only checkpoint (it would execute code: {code})"
            ) from None
        raise CheckpointError(f"not a checkpoint: {path}: {_not_a_checkpoint_reason(err)}") from None
    return blob


def _read_pickled_state(path: Path, map_location) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a torch.save file (:func:`read_weights_only`)."""
    blob = read_weights_only(path, map_location)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"not a checkpoint: {path}: no state_dict of named tensors inside")
    return state


def _ratio_from_stem(path: Path, state: dict[str, torch.Tensor], prefix: str) -> float:
    key = f"{prefix}stem.0.kernel"
    if key not in state:
        raise CheckpointError(f"{path}: missing key {key!r}")
    if state[key].ndim != 3:
        raise CheckpointError(f"{path}: key {key!r} has shape {list(state[key].shape)}, expected [27, 3, C]")
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
    kind = "student" if student else "teacher"
    values = {
        "channel_ratio": _ratio_from_stem(path, state, den_prefix),
        "kind": kind,
        **PUBLISHED_DEFAULTS[kind],
        "description": f"published {name} checkpoint {path.name}",
    }
    if refine_path is not None:
        ratio, refine_state = read_refiner(refine_path, map_location)
        ours |= {f"refiner.{k}": v for k, v in refine_state.items()}
        values["refine_channel_ratio"] = ratio
    try:
        config = ModelConfig(**(values | config_overrides))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: unusable weights: {err}") from None
    return _build(path, config, ours)


def read_refiner(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[float, dict[str, torch.Tensor]]:
    """Channel ratio and weights (keys without prefix) of a refinement net: a published
    ``refine_net.ckpt`` (prefix ``model_refine.``) or one of ours with a ``refiner``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"refinement checkpoint not found: {path}")
    if path.suffix in (".ckpt", ".pt", ".pth"):
        state = _read_pickled_state(path, map_location)
        for prefix in (REFINE_PREFIX, "refiner."):
            if any(k.startswith(prefix) for k in state):
                break
        else:
            sample = next(iter(state), "<empty>")
            raise CheckpointError(f"{path}: no refinement net inside (first key {sample!r}; expected prefix "
                                  f"{REFINE_PREFIX!r} or 'refiner.')")
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return _ratio_from_stem(path, inner, ""), inner
    model = load_model(path, map_location)
    if model.refiner is None:
        raise CheckpointError(f"{path}: this model has no refinement net")
    assert model.config.refine_channel_ratio is not None, "a model with a refiner records its width"
    return float(model.config.refine_channel_ratio), model.refiner.state_dict()


def with_refiner(model: CompletionModel, path: str | os.PathLike,
                 map_location: str | torch.device = "cpu") -> CompletionModel:
    """``model`` with the refinement net of ``path`` (published ``refine_net.ckpt`` or ours)
    in place of its own; everything else is unchanged."""
    ratio, refine_state = read_refiner(path, map_location)
    try:
        config = dataclasses.replace(model.config, refine_channel_ratio=ratio)
    except ValueError as err:
        raise CheckpointError(f"{path}: unusable refinement net: {err}") from None
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("refiner.")}
    state |= {f"refiner.{k}": v.to(map_location) for k, v in refine_state.items()}
    return _build(Path(path), config, state)
