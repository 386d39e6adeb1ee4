"""Typed, validated run configuration (one YAML per run) for teacher training and distillation.

Bad values are rejected with a message naming the key *before* any data is read or any
network is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lidar_completion.backends import check_backend
from lidar_completion.config import (MAX_CHANNEL_RATIO, PREDICTIONS, PRESETS, PUBLISHED_CUT, SAMPLERS, ScanCut, check,
                                     check_cut_value, check_keys, check_types, read_yaml)

if TYPE_CHECKING:
    from .objectives import Preference

__all__ = ["RunConfig", "load_run_config"]


@dataclass(frozen=True)
class DataSection:
    """Where the pairs come from and how they are cut. The cut keys (``n_part``, ``n_full``,
    ``max_range``) are the core :class:`~lidar_completion.config.ScanCut`'s (:attr:`cut`: its
    limits, and the rest of it at the published values), which the exported model records."""

    root: str = "data/synthetic"
    train_sequences: tuple[str, ...] = ("00", "01", "02", "03")
    n_part: int = PRESETS["lite"]["n_part"]
    n_full: int = PRESETS["lite"]["n_part"] * PUBLISHED_CUT.repeat  # ground-truth points: n_part x the cut's repeat
    max_range: float = PUBLISHED_CUT.max_range  # scan and ground-truth radius (m)
    augment: bool = True
    num_workers: int = 0
    # Held-out sequences of the training world for learnability diagnostics (whole scenes).
    val_sequences: tuple[str, ...] = ()
    # Probability that a training scan is cut to a random field-of-view sector (its ground
    # truth to the same sector: nothing is invented behind the sensor), and the sector widths
    # (degrees) drawn from. Every scan, cropped or not, reaches the model at the density of a
    # whole scan (points.density_matched_count), which the exported model records.
    fov_crop: float = 0.0
    fov_deg: tuple[float, float] = (60.0, 270.0)

    def __post_init__(self) -> None:
        check(len(self.train_sequences) > 0, "data.train_sequences", "must not be empty")
        check_cut_value("n_part", self.n_part)
        _ = self.cut  # built = validated (data.max_range, data.n_full) by the core type's limits
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(0 <= self.fov_crop <= 1, "data.fov_crop", f"must be in [0, 1], got {self.fov_crop}")
        check(len(self.fov_deg) == 2 and 10 <= self.fov_deg[0] <= self.fov_deg[1] <= 360, "data.fov_deg",
              f"must be [min, max] degrees with 10 <= min <= max <= 360, got {list(self.fov_deg)}")

    @property
    def cut(self) -> ScanCut:
        """The scan cut of this run's pairs and of the model it exports: ``n_part``, ``max_range``,
        ``repeat = n_full // n_part`` (:meth:`ScanCut.for_training` says why), the rest published."""
        return ScanCut.for_training(self.n_part, self.n_full, max_range=self.max_range)


@dataclass(frozen=True)
class ModelSection:
    channel_ratio: float = 0.25
    voxel_size: float = 0.05
    description: str = ""
    # How the exported model samples by default (ModelConfig): the sampler kind, its start
    # timestep t0 (null: T - 1) and the teacher's guidance weight.
    sampler: str = "dpmsolver++"
    t0: int | None = None
    prediction: str = "epsilon"  # what the denoiser outputs: epsilon (published) or displacement
    guidance: float = 6.0

    def __post_init__(self) -> None:
        check(self.sampler in SAMPLERS, "model.sampler", f"must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        check(self.t0 is None or 1 <= self.t0 <= 999, "model.t0", f"must be in [1, 999] or null, got {self.t0}")
        check(self.prediction in PREDICTIONS, "model.prediction", f"must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        check(0 <= self.guidance <= 50, "model.guidance", f"must be in [0, 50], got {self.guidance}")
        check(0.05 <= self.channel_ratio <= MAX_CHANNEL_RATIO, "model.channel_ratio",
              f"must be in [0.05, {MAX_CHANNEL_RATIO:g}], got {self.channel_ratio}")
        check(0 < self.voxel_size <= 1, "model.voxel_size", f"must be in (0, 1] m, got {self.voxel_size}")


@dataclass(frozen=True)
class TrainerSection:
    out_dir: str = "runs/run"
    max_steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    optimizer: str = "adam"
    grad_clip: float | None = None
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    backend: str = "torch"  # sparse convolutions: torch, torch-bf16, or minkowski / spconv (if installed)
    diagnose_every: int = 0  # steps between learnability diagnostics on data.val_sequences; 0: off
    # Step decay of the learning rate: lr * lr_decay ** (step // lr_decay_every) (LiDiff's
    # teacher halves it every 5 epochs); lr_decay_every 0: constant. Teacher and refinement runs.
    lr_decay: float = 1.0
    lr_decay_every: int = 0

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "trainer.max_steps", "must be >= 1")
        check(0 < self.lr_decay <= 1, "trainer.lr_decay", f"must be in (0, 1], got {self.lr_decay}")
        check(self.lr_decay_every >= 0, "trainer.lr_decay_every", "must be >= 0 (0: a constant learning rate)")
        check(self.batch_size >= 1, "trainer.batch_size", "must be >= 1")
        check(0 < self.lr < 1, "trainer.lr", f"must be in (0, 1), got {self.lr}")
        check(self.optimizer in ("adam", "sgd"), "trainer.optimizer", f"must be adam or sgd, got {self.optimizer!r}")
        check(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip", "must be > 0 or null")
        check(self.checkpoint_every >= 1, "trainer.checkpoint_every", "must be >= 1")
        check(self.diagnose_every >= 0, "trainer.diagnose_every", "must be >= 0 (0: off)")
        check(self.accelerator in ("auto", "cpu", "gpu", "cuda"), "trainer.accelerator", f"unknown accelerator {self.accelerator!r}")
        check(self.num_nodes >= 1, "trainer.num_nodes", "must be >= 1")
        check_backend(self.backend, "trainer.backend")


@dataclass(frozen=True)
class TeacherSection:
    uncond_prob: float = 0.1
    reg_weight: float = 5.0
    max_timestep: int | None = None  # train on t in [0, max_timestep] (the sampler's range); null: all
    init_from: str = ""  # an exported teacher to start from (fine-tuning on a new world); "": random

    def __post_init__(self) -> None:
        check(self.max_timestep is None or 1 <= self.max_timestep <= 999, "teacher.max_timestep", "must be in [1, 999] or null")
        check(0 <= self.uncond_prob < 1, "teacher.uncond_prob", "must be in [0, 1)")
        check(self.reg_weight >= 0, "teacher.reg_weight", "must be >= 0")
        check(not self.init_from or Path(self.init_from).exists(), "teacher.init_from", f"{self.init_from} does not exist")


@dataclass(frozen=True)
class DistillSection:
    teacher: str = ""
    mode: str = "dpo"  # dpo: Distillation-DPO; sd: plain score distillation (ablation)
    noise_scale_loser: float = 1.1
    loser_weight: float = 1.0
    student_steps: int = 1
    aux_lr: float | None = None
    aux_steps: int = 1  # auxiliary diffusion-loss steps per student step (two time-scale, as DMD2)
    regression_weight: float = 0.0  # DMD's regression onto the teacher's K-step sample from the same noise
    regression_steps: int = 8  # K: the teacher's steps for that target (same sampler and t0 as the student)
    max_timestep: int | None = None  # score-distillation timesteps in [0, max_timestep]; null: the teacher's t0, else all
    t0: int | None = None  # the student's start timestep; null: the teacher's
    # The preference (objectives.Preference): published (one noise at scales 1 and
    # noise_scale_loser), best_worst, sweet_spot or listwise over `candidates` independent noises.
    preference: str = "published"
    candidates: int = 2
    start_scales: tuple[float, ...] = (1.0,)  # candidate k starts at start_scales[k % len]
    metric: str = "cd"  # cd, cd_f (CD + metric_lambda * (1 - F-score)) or jsd_bev; lower wins
    metric_lambda: float = 1.0
    gap_scale: float = 0.0  # > 0: loser weight min(1, relative metric gap / gap_scale)
    reward_weight: float = 0.0  # direct reward: differentiable CD of the student's sample to the ground truth
    gradient_norms_every: int = 0  # log each generator term's gradient norm and share every N iterations; 0: never

    def __post_init__(self) -> None:
        try:
            self.pairing()
        except ValueError as err:
            check(False, "distill.preference", str(err))
        check(self.metric_lambda >= 0, "distill.metric_lambda", f"must be >= 0, got {self.metric_lambda}")
        check(self.gap_scale >= 0, "distill.gap_scale", f"must be >= 0, got {self.gap_scale}")
        check(self.reward_weight >= 0, "distill.reward_weight", f"must be >= 0, got {self.reward_weight}")
        check(self.gradient_norms_every >= 0, "distill.gradient_norms_every", "must be >= 0")
        check(self.max_timestep is None or 1 <= self.max_timestep <= 999, "distill.max_timestep", "must be in [1, 999] or null")
        check(self.t0 is None or 1 <= self.t0 <= 999, "distill.t0", "must be in [1, 999] or null")
        check(self.mode in ("dpo", "sd"), "distill.mode", f"must be dpo or sd, got {self.mode!r}")
        check(self.noise_scale_loser > 0 and self.noise_scale_loser != 1.0, "distill.noise_scale_loser", "must be > 0 and != 1")
        check(self.loser_weight >= 0, "distill.loser_weight", "must be >= 0")
        check(1 <= self.student_steps <= 8, "distill.student_steps", "must be in [1, 8]")
        check(1 <= self.aux_steps <= 20, "distill.aux_steps", f"must be in [1, 20], got {self.aux_steps}")
        check(self.regression_weight >= 0, "distill.regression_weight", f"must be >= 0, got {self.regression_weight}")
        check(1 <= self.regression_steps <= 50, "distill.regression_steps", f"must be in [1, 50], got {self.regression_steps}")

    def pairing(self) -> "Preference":
        """The candidates, metric and pairs of the DPO preference (``ValueError`` when invalid)."""
        from .objectives import Preference  # torch and the model: only once a run is built

        return Preference(self.preference, self.candidates, tuple(self.start_scales), self.metric, self.metric_lambda, self.gap_scale)


@dataclass(frozen=True)
class RefineSection:
    base: str = ""  # the exported teacher or student that gets the refinement net
    channel_ratio: float = 0.25
    source: str = "ground_truth"  # what it learns to refine: ground_truth (jittered) or completion (the base's own)
    jitter: float = 0.1  # m, source ground_truth only
    accuracy_weight: float = 1.0  # weight of the Chamfer term refined -> ground truth (1: symmetric)

    def __post_init__(self) -> None:
        check(0.05 <= self.channel_ratio <= MAX_CHANNEL_RATIO, "refine.channel_ratio",
              f"must be in [0.05, {MAX_CHANNEL_RATIO:g}], got {self.channel_ratio}")
        check(0 <= self.jitter < 1, "refine.jitter", "must be in [0, 1) m")
        check(self.accuracy_weight > 0, "refine.accuracy_weight", f"must be > 0, got {self.accuracy_weight}")
        check(self.source in ("ground_truth", "completion"), "refine.source",
              f"must be ground_truth or completion, got {self.source!r}")


_SECTIONS = {"data": DataSection, "model": ModelSection, "trainer": TrainerSection, "teacher": TeacherSection, "distill": DistillSection, "refine": RefineSection}


@dataclass(frozen=True)
class RunConfig:
    kind: str = "teacher"  # teacher | distill
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    distill: DistillSection = field(default_factory=DistillSection)
    refine: RefineSection = field(default_factory=RefineSection)

    def __post_init__(self) -> None:
        check(self.kind in ("teacher", "distill", "refine"), "kind", f"must be teacher, distill or refine, got {self.kind!r}")
        if self.trainer.diagnose_every:
            check(bool(self.data.val_sequences), "data.val_sequences", "needed by trainer.diagnose_every")
        check(self.kind != "distill" or not self.trainer.lr_decay_every or self.trainer.lr_decay == 1, "trainer.lr_decay_every",
              "distillation keeps a constant learning rate (the schedule applies to teacher and refine runs)")
        if self.kind == "refine":
            check(bool(self.refine.base) and Path(self.refine.base).exists(), "refine.base", f"exported model {self.refine.base!r} not found")
        if self.kind == "distill":
            check(bool(self.distill.teacher), "distill.teacher", "path of the teacher export is required")
            check(Path(self.distill.teacher).exists(), "distill.teacher", f"{self.distill.teacher} does not exist")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        check_keys(values, {"kind", *_SECTIONS})
        kwargs: dict[str, Any] = {"kind": values.get("kind", "teacher")}
        for name, section in _SECTIONS.items():
            given = values.get(name) or {}
            check_types(given, section, prefix=f"{name}.")  # also: the section is a mapping
            check_keys(given, section, prefix=f"{name}.")
            if name == "data":
                given = given | {k: tuple(str(s) for s in given[k]) for k in ("train_sequences", "val_sequences") if k in given}
                given = given | ({"fov_deg": tuple(float(v) for v in given["fov_deg"])} if "fov_deg" in given else {})
            if name == "distill" and "start_scales" in given:
                given = given | {"start_scales": tuple(float(v) for v in given["start_scales"])}
            try:
                kwargs[name] = section(**given)
            except TypeError as err:
                raise ValueError(f"{name}: {err}") from None
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["data"]["train_sequences"] = list(values["data"]["train_sequences"])
        values["data"]["val_sequences"] = list(values["data"]["val_sequences"])
        values["data"]["fov_deg"] = list(values["data"]["fov_deg"])
        values["distill"]["start_scales"] = list(values["distill"]["start_scales"])
        return values

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _with_overrides(values: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """``values`` (raw sections) with ``section.key`` overrides applied, before validation,
    so an override can repair a value the file gets wrong (e.g. a path that does not exist yet)."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for key, value in dotted.items():
        section, _, leaf = key.partition(".")
        check(bool(leaf) and section in _SECTIONS, key, "override must be section.key")
        values[section] = dict(values.get(section) or {}) | {leaf: value}
    return values


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    loaded = read_yaml(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping")
    try:
        return RunConfig.from_dict(_with_overrides(loaded, overrides or {}))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
