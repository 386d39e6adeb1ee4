"""Typed configuration of the completion pipeline, loaded from YAML over defaults.

One set of key names everywhere: the CLI's YAML, the ROS node's parameters
(``data.max_range``, ``sampling.steps``, ...) and the evaluation all use these. Values are
validated once, here, with messages that name the key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .backends import BACKENDS, check_backend

__all__ = ["ScanCut", "CUT_LIMITS", "DataConfig", "SamplingConfig", "CompletionConfig", "PRESETS", "MODEL_PRESET", "BACKENDS", "SAMPLERS", "PREDICTIONS",
           "MAX_CHANNEL_RATIO", "PUBLISHED_CUT", "UNRECORDED_RADIUS", "STAGE_OFF", "completion_radius", "effective_cut", "effective_range",
           "free_space_margin", "load_config", "read_yaml", "check_types"]

# Point budgets: "full" is the published setting (GPU); "lite" keeps a CPU frame in seconds;
# "model" (the default) uses the budget the checkpoint was trained with, else "lite".
PRESETS: dict[str, dict[str, int]] = {
    "full": {"n_part": 18000},
    "lite": {"n_part": 2000},
}
MODEL_PRESET = "model"
# Diffusion samplers (lidar_completion.diffusion): the published DPM-Solver++ on the offsets,
# or deterministic steps of the variance-exploding process the models are trained with.
SAMPLERS = ("dpmsolver++", "ve")
# What a denoiser outputs: the noise (published LiDiff) or the displacement x_0 - x_t.
PREDICTIONS = ("epsilon", "displacement")
# Widest network a config may name: 4x the published widths (~16x its weights); wider is a typo,
# and would allocate gigabytes before anything else could say so.
MAX_CHANNEL_RATIO = 4.0
# The free-space stage off: None in this config (YAML null); a front end whose values are
# numbers (a ROS parameter, lidar-evaluate --free-space-margin) spells it -1, and
# free_space_margin() is the one conversion.
STAGE_OFF = -1.0


def check(condition: bool, key: str, message: str) -> None:
    """The one form of a config error: ``ValueError("<key>: <message>")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{key}: {message}")


def check_keys(values: Mapping[Any, Any], allowed: Any, what: str = "config", prefix: str = "") -> None:
    """``ValueError`` naming (as ``repr``, since a key may hold any character) every key of
    ``values`` that ``allowed`` -- a dataclass, or an iterable of names -- does not have;
    ``prefix`` (e.g. ``"data."``) says which section they were found in."""
    names = {f.name for f in dataclasses.fields(allowed)} if dataclasses.is_dataclass(allowed) else set(allowed)
    unknown = sorted((str(k) for k in values if k not in names))
    if unknown:
        raise ValueError(f"unknown {what} keys: {', '.join(repr(prefix + k) for k in unknown)}")


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``3e-5`` (no dot) is a string; every config here takes
    it as the number a user means (YAML 1.2, and what JSON and Python do)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str) -> Any:
    """Safe YAML load (no Python objects) with ``3e-5`` read as a float."""
    return yaml.load(text, Loader=_Loader)


_TYPE_NAMES = {"float": ((int, float), "a number"), "int": ((int,), "an integer"), "str": ((str,), "a string"),
               "bool": ((bool,), "true or false")}


def check_types(values: Mapping[str, Any], cls: Any, prefix: str = "") -> None:
    """``ValueError`` naming the key when a value has the wrong type for the dataclass
    field it sets (``trainer.lr: fast``, ``steps: 4.5``), before any range check compares
    it: a config error reads as one, not as a ``TypeError`` deep inside validation."""
    check(isinstance(values, Mapping), prefix.rstrip(".") or "config", f"must be a mapping, got {type(values).__name__}")
    annotations = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in annotations:
            continue  # check_keys names unknown keys
        options = [option.strip() for option in annotations[key].split("|")]
        if value is None:
            check("None" in options, prefix + key, "must be set (got null)")
            continue
        wanted = []
        for option in options:
            if option.startswith(("tuple", "list")):
                if isinstance(value, (list, tuple)):
                    break
                wanted.append("a list")
            elif option in _TYPE_NAMES:
                types, name = _TYPE_NAMES[option]
                if isinstance(value, types) and (option == "bool") == isinstance(value, bool):
                    break
                wanted.append(name)
            elif option != "None":
                break  # a type this check does not describe: the dataclass validates it
        else:
            check(False, prefix + key, f"must be {' or '.join(wanted)}, got {value!r}")


# Limits of the scan cut (ScanCut), the one declaration every entry point checks against:
# completion config, training run config, dataset pairs, the model's config.json and the ROS
# parameter ranges. Ranges (m) are open at the ends named so below; counts are inclusive.
CUT_LIMITS: dict[str, tuple[float, float]] = {
    "min_range": (0.0, 500.0),  # [0, 500) and < max_range
    "max_range": (0.0, 500.0),  # (0, 500] and > min_range
    "min_z": (-500.0, 500.0),  # [-500, 500] or None (no height floor)
    "n_part": (16, 200_000),
    "repeat": (1, 100),
}


def check_cut_value(name: str, value: Any, prefix: str = "data.") -> None:
    """``ValueError("<prefix><name>: ...")`` unless ``value`` is within :data:`CUT_LIMITS`
    (on its own: :class:`ScanCut` also needs ``min_range < max_range``)."""
    low, high = CUT_LIMITS[name]
    key = prefix + name
    if name == "min_range":
        check(low <= value < high, key, f"must be in [{low:g}, {high:g}) m, got {value}")
    elif name == "max_range":
        check(low < value <= high, key, f"must be in ({low:g}, {high:g}] m, got {value}")
    elif name == "min_z":
        check(low <= value <= high, key, f"must be in [{low:g}, {high:g}] m (or null: no floor), got {value}")
    else:
        check(low <= value <= high, key, f"must be in [{low:g}, {high:g}], got {value}")


@dataclass(frozen=True)
class ScanCut:
    """How a scan is cut for a model, declared once: training cuts its (partial, full) pairs
    with it, the exported model records it (``config.json`` ``"cut"``) and the pipeline cuts a
    scan with the model's by default. Defaults are the published LiDiff ones.

    * ``min_range < |p| < max_range`` (m, 3-D norm from the sensor): the scan points the model
      gets (and, in training, the ground-truth radius);
    * ``min_z``: the height floor, only points with ``z > min_z`` (m, sensor frame); ``None``:
      no floor (models exported before the cut was recorded: the pipeline had none);
    * ``n_part``: scan points the model is given (farthest-point sampled);
    * ``repeat``: points sampled per scan point (the sampler starts from the scan repeated
      ``repeat`` times); training's ground truth has ``n_part * repeat`` points
      (:meth:`for_training`).
    """

    min_range: float = 3.5
    max_range: float = 50.0
    min_z: float | None = -4.0
    n_part: int = 18_000
    repeat: int = 10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "data.") -> None:
        """``ValueError`` naming the key (``prefix`` + name) of the first value out of limits."""
        for name in ("min_range", "max_range", "n_part", "repeat"):
            check_cut_value(name, getattr(self, name), prefix)
        if self.min_z is not None:
            check_cut_value("min_z", self.min_z, prefix)
        check(self.min_range < self.max_range, prefix + "max_range",
              f"must be > min_range ({self.min_range:g} m), got {self.max_range}")

    @classmethod
    def for_training(cls, n_part: int, n_full: int, **values: Any) -> "ScanCut":
        """The cut of a training run whose pairs have ``n_part`` scan and ``n_full`` ground-truth
        points: ``repeat = n_full // n_part``. Why: the model learns to move a cloud of the
        ground truth's density, so it must sample ``n_part * repeat = n_full`` points to see
        the density it was trained at; this is the one place that ties the two. ``n_full``
        must be a multiple of ``n_part`` (``data.n_full`` is named otherwise)."""
        check(n_full % n_part == 0, "data.n_full",
              f"must be a multiple of data.n_part ({n_part}), got {n_full}")
        low, high = CUT_LIMITS["repeat"]
        check(low <= n_full // n_part <= high, "data.n_full",
              f"n_full / n_part is the sampler's repeat: must be in [{low:g}, {high:g}], got {n_full // n_part}")
        return cls(n_part=n_part, repeat=n_full // n_part, **values)

    @classmethod
    def recorded_before(cls, n_part: int | None, max_range: float | None) -> "ScanCut":
        """The cut of a model exported before the cut was recorded (``config.json`` with top-level
        ``n_part`` / ``max_range`` only), as the pipeline cut its scans then: ``min_range`` and
        ``repeat`` the defaults, no height floor, ``n_part`` the lite preset's and ``max_range``
        the published radius when not recorded."""
        return cls(min_range=cls.min_range, max_range=cls.max_range if max_range is None else max_range, min_z=None,
                   n_part=PRESETS["lite"]["n_part"] if n_part is None else n_part, repeat=cls.repeat)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], prefix: str = "cut.") -> "ScanCut":
        """From a mapping (``config.json``'s ``"cut"``); errors name ``prefix`` + the key."""
        check_types(values, cls, prefix)
        check_keys(values, cls, "cut", prefix)
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(prefix + str(err).removeprefix("data.")) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The published cut (LiDiff): the defaults every entry point starts from.
PUBLISHED_CUT = ScanCut()
# data.max_range unset (None, the default) means the radius the model was trained on; a
# checkpoint that records none (the published LiDiff files) gets the published 50 m.
UNRECORDED_RADIUS = PUBLISHED_CUT.max_range


@dataclass(frozen=True)
class DataConfig:
    """Pre-/post-processing of scans (metres).

    The cut keys (``min_range``, ``max_range``, ``n_part``, ``repeat``) override the model's
    :class:`ScanCut` (:func:`effective_cut`); ``None`` keeps the model's value, and each set
    value is checked against the cut's own limits (:data:`CUT_LIMITS`)."""

    min_range: float | None = None  # None: the model's (3.5 m for one that records no cut)
    # None: the model's own radius (its config's max_range; UNRECORDED_RADIUS when it has none).
    # A number is capped at that radius too: a model cannot complete beyond what it was trained on.
    max_range: float | None = None
    preset: str = MODEL_PRESET
    n_part: int | None = None  # None: take it from the preset
    repeat: int | None = None  # None: the model's (10 for one that records no cut)
    # Completed points more than this (m) in front of the scan's nearest return in their
    # direction lie in space the sensor saw through and are dropped; None keeps them all.
    free_space_margin: float | None = 0.2
    # The output is the measured scan (every finite point, whole range) plus the completed
    # points that add to it: none within compose_distance (m) of a measured return, and each
    # backed by at least compose_support other completed points within 2 x compose_distance
    # (stray points are dropped). Both chosen on the training world's validation sequence
    # (model card). completion_only: the model's completed points alone (the model study).
    completion_only: bool = False
    compose_distance: float = 0.3
    compose_support: int = 2

    def __post_init__(self) -> None:
        choices = sorted([*PRESETS, MODEL_PRESET])
        check(self.preset in choices, "data.preset", f"must be one of {choices}, got {self.preset!r}")
        for name in ("min_range", "max_range", "n_part", "repeat"):
            if getattr(self, name) is not None:
                check_cut_value(name, getattr(self, name))
        if self.min_range is not None and self.max_range is not None:
            check(self.min_range < self.max_range, "data.min_range", "need 0 <= min_range < max_range")
        if self.free_space_margin is not None:
            check(0 <= self.free_space_margin <= 10, "data.free_space_margin",
                  f"must be in [0, 10] m (or null: keep every point), got {self.free_space_margin}")
        check(0 <= self.compose_distance <= 5, "data.compose_distance",
              f"must be in [0, 5] m, got {self.compose_distance}")
        check(0 <= self.compose_support <= 100, "data.compose_support",
              f"must be in [0, 100] points, got {self.compose_support}")

    def resolve_n_part(self, model_n_part: int | None) -> int:
        """Explicit ``n_part``, else the preset's, else the model's trained budget, else lite."""
        if self.n_part is not None:
            return self.n_part
        if self.preset == MODEL_PRESET:
            return model_n_part or PRESETS["lite"]["n_part"]
        return PRESETS[self.preset]["n_part"]


@dataclass(frozen=True)
class SamplingConfig:
    """Diffusion sampling; ``None`` means "the checkpoint's own default"."""

    steps: int | None = None
    guidance: float | None = None
    seed: int | None = 0
    sampler: str | None = None  # "dpmsolver++" (published) or "ve"; None: the checkpoint's own
    t0: int | None = None  # start timestep (scan noised to t0); None: the checkpoint's own
    # Longest predicted noise per point (norm); a step then moves a point at most
    # noise_clip * sigma_t. None: unbounded (the published loop).
    noise_clip: float | None = 6.0

    def __post_init__(self) -> None:
        if self.steps is not None:
            check(1 <= self.steps <= 1000, "sampling.steps", f"must be in [1, 1000], got {self.steps}")
        if self.guidance is not None:
            check(0 <= self.guidance <= 50, "sampling.guidance", f"must be in [0, 50], got {self.guidance}")
        if self.seed is not None:
            check(0 <= self.seed < 2**63, "sampling.seed", "must be a non-negative integer")
        if self.sampler is not None:
            check(self.sampler in SAMPLERS, "sampling.sampler", f"must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.t0 is not None:
            check(1 <= self.t0 <= 999, "sampling.t0", f"must be in [1, 999], got {self.t0}")
        if self.noise_clip is not None:
            check(0.5 <= self.noise_clip <= 100, "sampling.noise_clip",
                  f"must be in [0.5, 100] (or null: unbounded), got {self.noise_clip}")


@dataclass(frozen=True)
class CompletionConfig:
    """Everything :class:`~lidar_completion.completer.SceneCompleter` needs besides the weights."""

    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    refine: bool = False  # published students ship without a refinement net
    device: str = "auto"
    backend: str = "torch"  # sparse convolutions: "torch", "torch-bf16" (built in) or "minkowski", "spconv" (optional)

    def __post_init__(self) -> None:
        check_backend(self.backend, "backend")
        check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CompletionConfig":
        """Build from nested (``{"data": {...}}``) or dotted (``{"data.max_range": ..}``) keys."""
        nested: dict[str, Any] = {}
        for key, value in values.items():
            section, _, leaf = key.partition(".")
            if leaf:
                nested.setdefault(section, {})[leaf] = value
            elif isinstance(value, dict):
                nested.setdefault(key, {}).update(value)
            else:
                nested[key] = value
        sections = {"data": DataConfig, "sampling": SamplingConfig}
        check_keys(nested, cls)
        kwargs: dict[str, Any] = {}
        check_types({k: v for k, v in nested.items() if k not in sections}, cls)
        for key, value in nested.items():
            if key in sections:
                check_types(value, sections[key], prefix=f"{key}.")
                check_keys(value, sections[key], prefix=f"{key}.")
                kwargs[key] = sections[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_free_space_margin(self, margin: float | None) -> "CompletionConfig":
        """Copy with ``data.free_space_margin`` set, ``None`` (stage off) included, which
        :meth:`replace` cannot set: it skips ``None`` values (unset CLI flags)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, free_space_margin=margin))

    def replace(self, **dotted: Any) -> "CompletionConfig":
        """Copy with dotted overrides, e.g. ``replace(**{"sampling.steps": 4})``; None values are ignored."""
        values = flatten_keys(self.to_dict())
        values.update({k: v for k, v in dotted.items() if v is not None})
        return CompletionConfig.from_dict(values)


def free_space_margin(value: float | None) -> float | None:
    """``data.free_space_margin`` as a number-only front end spells it -> this config's value:
    ``STAGE_OFF`` (-1) -> ``None`` (the free-space stage off); any other value as given, for
    :class:`DataConfig` to check (so -0.5 is refused, not taken as "off")."""
    return None if value is None or value == STAGE_OFF else value


def completion_radius(max_range: float | None, model_max_range: float | None) -> float:
    """How far completion reaches (m): ``data.max_range`` capped at the radius the model was
    trained on; unset (None), that radius itself (``UNRECORDED_RADIUS`` for a model that
    records none)."""
    if max_range is None:
        return float(model_max_range or UNRECORDED_RADIUS)
    return min(max_range, model_max_range or float("inf"))


def effective_cut(data: DataConfig, model_cut: ScanCut | None) -> ScanCut:
    """The cut the pipeline uses: the model's :class:`ScanCut` (a model that records none: the
    published values, with no radius to cap at) with ``data``'s set keys over it; ``max_range``
    capped at the model's radius (:func:`completion_radius`), ``n_part`` by the preset
    (:meth:`DataConfig.resolve_n_part`). ``ValueError`` naming the keys when the range band left
    is empty, so a setting that would reject every scan is refused instead."""
    base = model_cut or ScanCut.recorded_before(None, None)
    model_max_range = model_cut.max_range if model_cut is not None else None
    max_range = completion_radius(data.max_range, model_max_range)
    min_range = base.min_range if data.min_range is None else data.min_range
    if min_range >= max_range:
        why = (f" (the model's trained radius; data.max_range is {data.max_range:g})"
               if data.max_range is not None and max_range < data.max_range else
               " (the model's trained radius)" if data.max_range is None and model_max_range else "")
        raise ValueError(f"data.min_range: {min_range:g} m leaves no range band: the model completes up to "
                         f"{max_range:g} m{why}")
    return ScanCut(min_range=min_range, max_range=max_range, min_z=base.min_z,
                   n_part=data.resolve_n_part(model_cut.n_part if model_cut is not None else None),
                   repeat=base.repeat if data.repeat is None else data.repeat)


def effective_range(data: DataConfig, model_max_range: float | None) -> tuple[float, float]:
    """``(min_range, max_range)`` of :func:`effective_cut` for a model trained up to
    ``model_max_range`` m (None: one that records no radius)."""
    model_cut = None if model_max_range is None else ScanCut.recorded_before(None, model_max_range)
    cut = effective_cut(data, model_cut)
    return cut.min_range, cut.max_range


def flatten_keys(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"max_range": 50}}`` -> ``{"data.max_range": 50}`` (the ROS parameter names)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path | None = None, **overrides: Any) -> CompletionConfig:
    """Defaults, then the YAML file (optionally under a ``completion:`` key), then overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        values = loaded.get("completion", loaded)
    try:
        return CompletionConfig.from_dict(values).replace(**overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path or 'config'}: {err}") from None
