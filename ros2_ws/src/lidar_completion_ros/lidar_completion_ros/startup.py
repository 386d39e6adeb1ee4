"""Configure's slow part, from the node's settings (settings.py) to a running model (no ROS import).

:func:`set_up` finds the checkpoint (:func:`resolve_checkpoint`: a path or a shipped model's
name, one line naming what was tried), loads it through the core's
:meth:`SceneCompleter.from_checkpoint` and logs what runs; :func:`warm_up` pays the first
inference's costs on a synthetic scan; :func:`apply_changes` gives a run-time parameter
change its new settings and completer (on the model already loaded); :func:`free_device`
hands GPU memory back at cleanup.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lidar_completion.config import CompletionConfig, ScanCut

from .parameters import COMPLETION_KEYS, StartupError
from .settings import ModelSettings, NodeSettings

__all__ = ["apply_changes", "describe", "free_device", "load_completer", "log_range", "resolve_checkpoint", "set_up",
           "synthetic_scan", "warm_up"]


def synthetic_scan(cut: ScanCut, n: int, seed: int = 0) -> np.ndarray:
    """A ring of ground and wall points inside the range band of ``cut`` (the completer's)
    for the warm-up inference."""
    rng = np.random.default_rng(seed)
    low = cut.min_range
    high = min(cut.max_range, max(30.0, low + 1.0))
    r = rng.uniform(low + 0.05 * (high - low), high - 0.05 * (high - low), n)
    angle = rng.uniform(-np.pi, np.pi, n)
    z = np.where(rng.random(n) < 0.6, -1.73, rng.uniform(-1.7, 2.0, n)) + rng.normal(0, 0.02, n)
    return np.column_stack([r * np.cos(angle), r * np.sin(angle), z]).astype(np.float32)


def resolve_checkpoint(value: str, name: str = "checkpoint") -> Path:
    """Path of the ``checkpoint`` (or ``name``) parameter: an existing path, or a shipped model's name.

    Raises ``FileNotFoundError`` with one line that says what was tried and what exists.
    """
    from lidar_completion import checkpoints

    text = os.path.expandvars(os.path.expanduser(str(value).strip()))
    if not text:
        raise FileNotFoundError(f"parameter '{name}' is empty; set it to a checkpoint path or a shipped model")
    found = checkpoints.find_checkpoint(text)
    if found is not None:
        return found
    shipped_dir, shipped = checkpoints.SHIPPED_MODELS, checkpoints.shipped_models()
    raise FileNotFoundError(
        f"{name} '{value}' not found: no such file or directory, and no model of that name in "
        f"{shipped_dir} (shipped models: {', '.join(shipped) or 'none'})"
    )


def load_completer(model: ModelSettings, config: CompletionConfig) -> Any:
    """The completer of the ``checkpoint`` (and ``refine_checkpoint``) parameters with
    ``config`` (:meth:`SceneCompleter.from_checkpoint`; its ``checkpoint`` and
    ``refine_checkpoint`` say which files); ``StartupError`` with one line when a file is
    missing or refused, or the parameters do not fit the model."""
    from lidar_completion.checkpoints import CheckpointError, RefinerError
    from lidar_completion.completer import SceneCompleter

    try:
        path = resolve_checkpoint(model.checkpoint)
        refine_path = (resolve_checkpoint(model.refine_checkpoint, "refine_checkpoint")
                       if model.refine_checkpoint.strip() else None)
    except FileNotFoundError as err:
        raise StartupError(str(err)) from None
    try:
        return SceneCompleter.from_checkpoint(path, config, refine_path)
    except RefinerError as err:
        raise StartupError(f"cannot load refine_checkpoint '{refine_path}': {err}") from None
    except (CheckpointError, OSError) as err:
        raise StartupError(f"cannot load checkpoint '{path}': {err}") from None
    except (ValueError, RuntimeError) as err:
        raise StartupError(f"cannot run '{path}' with these parameters: {err}") from None


def warm_up(completer: Any, log: Any) -> None:
    """One inference at the cheapest setting (1 step, no guidance): it pays the first-call
    costs (allocations, kernel maps, refinement) without the scans' step count, which for
    a published teacher (50 steps, guidance 6) would take minutes on a CPU."""
    from lidar_completion.completer import SceneCompleter

    config = completer.config.replace(**{"sampling.steps": 1, "sampling.guidance": 1.0})
    cheap = SceneCompleter(completer.model, config)
    points = synthetic_scan(cheap.cut, max(2 * cheap.n_part, 1000))
    log(f"warm-up inference: 1 step without guidance (scans run {completer.steps} steps, "
        f"guidance {completer.guidance:g})")
    start = time.perf_counter()
    result = cheap.complete(points)
    log(f"warm-up inference done in {1000 * (time.perf_counter() - start):.0f} ms "
        f"({result.nfe} network call{'s' * (result.nfe != 1)}, {len(points)} -> {len(result.points)} points)")


def apply_changes(settings: NodeSettings, changes: Mapping[str, Any], model: Any,
                  completer: Any) -> tuple[NodeSettings, Any, frozenset[str]]:
    """``(settings, completer, touched)`` after a run-time parameter change: new settings
    (:meth:`NodeSettings.with_changes`) and, when a completion key changed, a completer on
    the loaded ``model`` (None before configure / after cleanup); ``ValueError`` with the
    reason when either does not build."""
    from lidar_completion.completer import SceneCompleter

    settings, touched = settings.with_changes(changes)
    if touched & set(COMPLETION_KEYS):
        completer = SceneCompleter(model, settings.completion) if model is not None else None
    return settings, completer, touched


def set_up(settings: NodeSettings, info: Any, warning: Any) -> Any:
    """Load the model of ``settings`` and build its completer, logging what runs;
    ``StartupError`` with one line when that fails. (The values themselves were checked
    when ``settings`` was built, before this slow part.)"""
    config = settings.completion
    completer = load_completer(settings.model, config)
    model, path, refine_path = completer.model, completer.checkpoint, completer.refine_checkpoint
    c, mc = completer, model.config
    info(f"loaded {path} ({mc.kind}{': ' + mc.description if mc.description else ''}) on {c.device}: "
         f"steps={c.steps} guidance={c.guidance:g} n_part={c.n_part} refine={'on' if config.refine else 'off'}"
         + (f" (refinement net from {refine_path})" if refine_path else ""))
    if refine_path is not None and not config.refine:
        info("refine_checkpoint is loaded but refine is false: set refine to true to use it")
    log_range(completer, warning)
    return completer


def log_range(completer: Any, warning: Any) -> None:
    """Say so when the model's radius caps a ``data.max_range`` that was set (0, the
    default, means that radius: nothing to say)."""
    data = completer.config.data
    if data.max_range is not None and completer.max_range < data.max_range:
        warning(f"effective range {data.min_range:g}-{completer.max_range:g} m: data.max_range={data.max_range:g} "
                f"is capped at the radius the model was trained on ({completer.max_range:g} m); "
                f"see max_range_effective in /diagnostics")


def describe(completer: Any) -> str:
    return (f"steps={completer.steps} guidance={completer.guidance:g} n_part={completer.n_part} "
            f"refine={completer.config.refine} range={completer.config.data.min_range:g}-{completer.max_range:g} m")


def free_device(completer: Any) -> None:
    """Give the GPU memory of a released completer back (cleanup)."""
    if completer is not None and completer.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
