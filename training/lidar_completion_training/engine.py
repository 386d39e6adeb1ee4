"""Lightning glue for teacher training and (preference) distillation.

The networks are the core library's plain PyTorch modules and the objectives live in
:mod:`.objectives`; this module only adds what Lightning is for: devices (CPU, one GPU,
several GPUs / nodes with DDP), logging, checkpoints and resume.

Reproducibility: the data item and all noise of step ``k`` are pure functions of
``(seed, k, rank)``, so a run killed and resumed from its last checkpoint ends on the same
weights as an uninterrupted one.

Ctrl-C while training (SIGINT, :class:`StopOnInterrupt`): the first ends the run after the
current step, with a checkpoint as at the end of a run; a second stops at once. :func:`fit`
then raises :class:`TrainingInterrupted`, which says what was saved.
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lidar_completion.checkpoints import CheckpointError, load_model, read_weights_only, save_model
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.diffusion import NoiseSchedule

from .dataset import CompletionDataset, PairConfig, mean_surface_cells
from .logs import ResumableCSVLogger
from .objectives import distillation_iteration, refine_loss, seeded_generator, teacher_loss
from .run_config import RunConfig

if TYPE_CHECKING:
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

    from lidar_completion.networks import Denoiser

__all__ = ["TeacherModule", "DistillationModule", "TrainingInterrupted", "build_module", "build_trainer", "fit",
           "export_last"]


class StepPairs(Dataset):
    """Item ``i`` = the pair for global step ``i // batch_size``, chosen and augmented from
    ``(seed, step)``, so the data stream does not depend on where a run was resumed."""

    def __init__(self, pairs: CompletionDataset, batch_size: int, seed: int, rank: int = 0):
        self.pairs, self.batch_size, self.seed, self.rank = pairs, batch_size, seed, rank

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, i, self.rank])
        index = int(rng.integers(len(self.pairs)))
        # Seeds the sampling and augmentation of this item; per rank, so two ranks that draw
        # the same scan still train on different samples of it (rank 0: i, as one process).
        self.pairs.set_epoch(i + self.rank * 2**62)
        item = self.pairs[index]
        return {"partial": item["partial"], "full": item["full"]}


class FromStep(Sampler[int]):
    """Indices ``start * batch .. stop * batch``: resumes the stream exactly. ``start`` is read
    when iteration begins, because Lightning restores the checkpoint after building loaders."""

    def __init__(self, start_step: Callable[[], int], stop_step: int, batch_size: int):
        self.start_step, self.stop, self.batch = start_step, stop_step * batch_size, batch_size

    def __iter__(self):
        return iter(range(self.start_step() * self.batch, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start_step() * self.batch)


def _worker_init(worker_id: int, rank: int) -> None:
    """Data workers leave Ctrl-C to the main process (:class:`StopOnInterrupt`): a worker
    killed by it would end the step the main process is finishing. Lightning's worker
    seeding (``seed_everything(workers=True)``) is kept."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank)


def _collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack a batch; clouds of a cropped (smaller) scan are padded with their own points
    repeated (a repeat lands in a voxel it already fills) to the batch's largest."""
    batch = {}
    for key in items[0]:
        n = max(len(item[key]) for item in items)
        batch[key] = torch.from_numpy(np.stack([np.resize(item[key], (n, item[key].shape[1])) for item in items]))
    return batch


class _Base(L.LightningModule):
    model: CompletionModel  # set by each kind of run

    def __init__(self, config: RunConfig):
        super().__init__()
        self.config = config
        self.data_step = 0  # batches trained on (not optimizer steps: distillation has two)
        self.save_hyperparameters({"run": config.to_dict()})

    def on_fit_start(self) -> None:
        """Run the sparse convolutions on the configured backend (checked on this device)."""
        self.model.use_backend(self.config.trainer.backend, self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["data_step"] = self.data_step

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """With several processes, each rank's batch fingerprint (the sum of its scan
        coordinates) goes to the metrics log as ``data/rank<N>_sum``: the ranks must be
        training on different data (StepPairs seeds each rank's stream differently)."""
        if self.trainer.world_size > 1:
            sums = self.all_gather(batch["partial"].double().sum())
            self.log_dict({f"data/rank{r}_sum": s for r, s in enumerate(sums)}, rank_zero_only=True,
                          batch_size=batch["partial"].shape[0])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The data stream restarts here (FromStep reads data_step when iteration begins).
        self.data_step = int(checkpoint["data_step"])

    def train_dataloader(self) -> DataLoader:
        data, trainer = self.config.data, self.config.trainer
        pairs = CompletionDataset(
            data.root,
            data.train_sequences,
            PairConfig(cut=data.cut, fov_crop=data.fov_crop, fov_deg=data.fov_deg,
                       surface_cells=self.model.config.surface_cells),
            augment=data.augment,
            seed=trainer.seed,
        )
        dataset = StepPairs(pairs, trainer.batch_size, trainer.seed, self.global_rank)
        sampler = FromStep(lambda: self.data_step, trainer.max_steps, trainer.batch_size)
        return DataLoader(
            dataset,
            batch_size=trainer.batch_size,
            sampler=sampler,
            num_workers=data.num_workers,
            collate_fn=_collate,
            worker_init_fn=functools.partial(_worker_init, rank=self.global_rank) if data.num_workers else None,
            persistent_workers=data.num_workers > 0,
        )

    def _generator(self) -> torch.Generator:
        return seeded_generator(self.config.trainer.seed, self.data_step, self.global_rank, self.device)

    def _scheduled(self, optimizer: torch.optim.Optimizer) -> Any:
        """``optimizer`` with the step decay of ``trainer.lr_decay`` every ``trainer.lr_decay_every``
        optimizer steps (one per batch here), if any; Lightning keeps its state in the checkpoint."""
        t = self.config.trainer
        if not t.lr_decay_every or t.lr_decay == 1:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_decay_every, gamma=t.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _log_lr(self, batch_size: int) -> None:
        """The learning rate of this step (``train/lr``) when it follows a schedule."""
        if self.config.trainer.lr_decay_every:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)

    def export(self, directory: str | os.PathLike) -> Path:
        """The trained model as a project checkpoint (what the node, the CLI and evaluation load)."""
        return save_model(self.model, directory)


class TeacherModule(_Base):
    """LiDiff teacher: encoder + denoiser trained with the diffusion objective (Adam)."""

    def __init__(self, config: RunConfig):
        super().__init__(config)
        m, d = config.model, config.data
        # The surface a whole training scan shows: n_part points over it is the density the
        # model learns at, and keeps for any field of view (recorded in the export).
        cells = mean_surface_cells(CompletionDataset(d.root, d.train_sequences, PairConfig(cut=d.cut)))
        self.model = CompletionModel(
            ModelConfig(
                channel_ratio=m.channel_ratio, voxel_size=m.voxel_size, kind="teacher", default_steps=50,
                default_guidance=m.guidance, sampler=m.sampler, t0=m.t0, prediction=m.prediction, cut=d.cut,
                surface_cells=cells, description=m.description,
            )
        )
        if config.teacher.init_from:  # fine-tune an exported teacher (same widths) on this world
            start = load_model(config.teacher.init_from)
            if start.config.channel_ratio != m.channel_ratio:
                raise ValueError(f"teacher.init_from {config.teacher.init_from} has channel_ratio "
                                 f"{start.config.channel_ratio}, model.channel_ratio is {m.channel_ratio}")
            self.model.encoder.load_state_dict(start.encoder.state_dict())
            self.model.denoiser.load_state_dict(start.denoiser.state_dict())
        self.schedule = NoiseSchedule.of(self.model.config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        t = self.config.teacher
        losses = teacher_loss(
            self.model, self.schedule, batch["partial"], batch["full"], self._generator(), t.uncond_prob, t.reg_weight, t.max_timestep
        )
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=batch["partial"].shape[0])
        self._log_lr(batch["partial"].shape[0])
        self.data_step += 1
        return losses["loss"]

    def configure_optimizers(self):
        return self._scheduled(torch.optim.Adam(self.model.parameters(), lr=self.config.trainer.lr))

class DistillationModule(_Base):
    """Distillation-DPO (``mode: dpo``) or plain score distillation (``mode: sd``).

    Student ("generator") and auxiliary denoisers start as copies of the teacher; the
    encoder and the teacher are frozen. BatchNorm statistics stay frozen (eval mode) for
    every net: the distillation fine-tunes, it does not re-estimate statistics.
    """

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self.automatic_optimization = False
        d = config.distill
        teacher = load_model(d.teacher)
        if config.model.channel_ratio != teacher.config.channel_ratio:
            raise ValueError(
                f"model.channel_ratio={config.model.channel_ratio} but the teacher {d.teacher} has "
                f"{teacher.config.channel_ratio}"
            )
        self.model = CompletionModel(
            ModelConfig(
                **(
                    teacher.config.__dict__
                    | {"kind": "student", "default_steps": d.student_steps, "default_guidance": 1.0, "description": config.model.description}
                    | ({"t0": d.t0} if d.t0 is not None else {})
                )
            )
        )
        self.model.load_state_dict(teacher.state_dict())
        self.teacher = copy.deepcopy(teacher.denoiser)
        self.aux = torch.nn.ModuleList(copy.deepcopy(teacher.denoiser) for _ in range(2 if d.mode == "dpo" else 1))
        for frozen in (self.model.encoder, self.teacher):
            frozen.requires_grad_(False)
        self.schedule = NoiseSchedule.of(self.model.config)

    def _freeze_batchnorm(self) -> None:
        for net in (self.model, self.teacher, self.aux):
            net.eval()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._freeze_batchnorm()
        d, trainer = self.config.distill, self.config.trainer
        opt_aux, opt_student = cast("list[LightningOptimizer]", self.optimizers())  # the two configure_optimizers returns

        def stepper(optimizer):
            def step(loss: torch.Tensor) -> None:
                optimizer.zero_grad()
                self.manual_backward(loss)
                if trainer.grad_clip:
                    self.clip_gradients(optimizer, gradient_clip_val=trainer.grad_clip, gradient_clip_algorithm="norm")
                optimizer.step()

            return step

        losses = distillation_iteration(
            self.model,
            self.schedule,
            self.model.denoiser,
            self.teacher,
            [cast("Denoiser", net) for net in self.aux],
            batch["partial"],
            batch["full"],
            self._generator(),
            stepper(opt_aux),
            stepper(opt_student),
            preference=d.mode == "dpo",
            noise_scale_loser=d.noise_scale_loser,
            loser_weight=d.loser_weight,
            student_steps=d.student_steps,
            aux_steps=d.aux_steps,
            regression_weight=d.regression_weight,
            regression_steps=d.regression_steps,
            repeat=self.config.data.cut.repeat,
            max_timestep=d.max_timestep or self.model.config.t0,
            pairing=d.pairing(),
            reward_weight=d.reward_weight,
            measure_gradients=bool(d.gradient_norms_every) and self.data_step % d.gradient_norms_every == 0,
        )
        self.log_dict({f"train/{k}": v for k, v in losses.logs.items()}, prog_bar=True, batch_size=batch["partial"].shape[0])
        self.data_step += 1

    def configure_optimizers(self):
        trainer, d = self.config.trainer, self.config.distill
        make = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[trainer.optimizer]
        return [
            make(self.aux.parameters(), lr=d.aux_lr or trainer.lr),
            make(self.model.denoiser.parameters(), lr=trainer.lr),
        ]

class RefineModule(_Base):
    """Trains a refinement net (x6 offsets, Chamfer loss) onto an exported teacher/student;
    the export is that model with its ``refiner`` added. A base that already has a refiner of
    the same width starts from it (fine-tuning).

    With ``refine.source: completion`` the net learns on the base's own completions, made by
    the inference pipeline itself (:class:`SceneCompleter`, same sampler, steps, seed and
    post-processing as at run time), so it learns to correct that model's errors; with
    ``ground_truth`` it learns on jittered ground truth and does not depend on the base."""

    def __init__(self, config: RunConfig):
        super().__init__(config)
        base = load_model(config.refine.base)
        self.model = CompletionModel(ModelConfig(**(base.config.__dict__ | {"refine_channel_ratio": config.refine.channel_ratio})))
        self.model.load_state_dict(base.state_dict(), strict=False)  # all of the base, its refiner too if it has one
        self.model.encoder.requires_grad_(False)
        self.model.denoiser.requires_grad_(False)
        self._completer: Any = None

    def _completions(self, partial: torch.Tensor) -> list[torch.Tensor]:
        """The base model's completions of ``partial`` [B, n_part, 3], as the node makes them."""
        from lidar_completion.completer import SceneCompleter
        from lidar_completion.config import load_config

        if self._completer is None:
            dotted: dict[str, Any] = {"data.completion_only": True}
            config = load_config(device=str(self.device), backend=self.config.trainer.backend, refine=False, **dotted)
            # At run time the refiner sees the completion alone, before the free-space stage.
            config = config.with_free_space_margin(None)
            self._completer = SceneCompleter(self.model, config)
        self.model.encoder.eval()  # frozen: running statistics, as at inference
        self.model.denoiser.eval()
        results = self._completer.complete_batch([p.cpu().numpy() for p in partial])
        assert self.model.refiner is not None  # the model was built with refine_channel_ratio
        self.model.refiner.train(self.training)
        return [torch.from_numpy(r.points).to(self.device) for r in results]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r = self.config.refine
        coarse = self._completions(batch["partial"]) if r.source == "completion" else None
        losses = refine_loss(self.model, batch["full"], self._generator(), r.jitter, coarse, r.accuracy_weight)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=batch["full"].shape[0])
        self._log_lr(batch["full"].shape[0])
        self.data_step += 1
        return losses["loss"]

    def configure_optimizers(self):
        return self._scheduled(torch.optim.Adam(self.model.refiner.parameters(), lr=self.config.trainer.lr))

class AtomicCheckpoint(L.Callback):
    """``last.ckpt`` every N steps, written to a temporary file and renamed into place, so a
    crash mid-write never leaves a truncated checkpoint behind.

    The checkpoint of step N is written at the end of that step (where Lightning's loop state
    resumes from) but renamed into place only when step N + 1 starts (or the run ends), after
    Lightning has written step N's row and the diagnostics of step N are in the metrics log:
    the rows of every step a ``last.ckpt`` holds are on disk before it is, so a resumed run
    keeps exactly those rows and recomputes the rest (issue 28, item 2)."""

    def __init__(self, directory: Path, every_n_steps: int):
        self.directory, self.every = directory, every_n_steps
        self.pending: int | None = None  # the step of the written, not yet renamed checkpoint
        self.saved_step: int | None = None  # the step of the last checkpoint renamed into place

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.directory / ".last.ckpt.tmp", weights_only=False)
        self.pending = cast(_Base, pl_module).data_step

    def _promote(self, trainer: L.Trainer) -> None:
        if self.pending is None:
            return
        if trainer.logger is not None:  # the metrics log on disk covers the steps the checkpoint holds
            trainer.logger.save()
        if trainer.is_global_zero:
            os.replace(self.directory / ".last.ckpt.tmp", self.directory / "last.ckpt")
        self.saved_step, self.pending = self.pending, None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if cast(_Base, pl_module).data_step % self.every == 0:
            self._write(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._promote(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)
        self._promote(trainer)


class _StopNow(BaseException):
    """A second Ctrl-C: raised from the signal handler, through Lightning, to :func:`fit`."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run at ``step``; ``saved_step``: the step of the checkpoint at
    ``checkpoint`` (None: nothing was saved). The message says so in one line."""

    def __init__(self, step: int, saved_step: int | None, checkpoint: Path, at_once: bool):
        self.step, self.saved_step, self.checkpoint, self.at_once = step, saved_step, checkpoint, at_once
        how = "stopped at once" if at_once else "interrupted"
        if saved_step is None:
            text = f"{how} at step {step}: nothing was saved (no checkpoint yet)"
        elif saved_step == step:
            text = (f"{how} at step {step}: checkpoint of step {step} saved to {checkpoint} "
                    "(continue with --resume; --export-only exports it)")
        else:
            text = (f"{how} at step {step}: steps after {saved_step} were not saved; the checkpoint of step "
                    f"{saved_step} is {checkpoint} (continue with --resume)")
        super().__init__(text)


class StopOnInterrupt(L.Callback):
    """Ctrl-C (SIGINT) during :func:`fit`: the first ends the run after the current step (the
    end of a run writes ``last.ckpt``, with the step's rows in the metrics log); a second one
    stops at once, saving nothing more. With several processes any rank's request stops all."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise _StopNow()
        self.requested = True
        print("lidar-train: Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: stop at once, "
              "unsaved)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stop = self.requested
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True


class Diagnostics(L.Callback):
    """Every N steps, on held-out whole scenes: noise-prediction MSE per timestep bucket
    (teacher runs) and the Chamfer distance of samples at the model's default step count
    (``diag/*`` in the metrics log; see :mod:`.diagnostics`)."""

    SCANS = 2

    def __init__(self, config: RunConfig):
        self.config = config
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _pairs(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.pairs is None:
            d = self.config.data
            held_out = CompletionDataset(d.root, d.val_sequences, PairConfig(cut=d.cut))
            picks = np.linspace(0, len(held_out) - 1, self.SCANS).round().astype(int)
            items = [held_out[int(i)] for i in picks]
            self.pairs = [(torch.from_numpy(it["partial"])[None].to(device), torch.from_numpy(it["full"])[None].to(device)) for it in items]
        return self.pairs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = self.config.trainer.diagnose_every
        module = cast(_Base, pl_module)
        if not trainer.is_global_zero or module.data_step % every:
            return
        from .diagnostics import noise_mse_by_bucket, sampled_chamfer, timestep_buckets

        model, pairs = module.model, self._pairs(module.device)
        values: dict[str, float] = {}
        if self.config.kind == "teacher":
            top = self.config.teacher.max_timestep or model.config.num_train_timesteps - 1
            values |= noise_mse_by_bucket(model, pairs, timestep_buckets(top))
        steps = 4 if self.config.kind == "teacher" else model.config.default_steps
        values[f"cd_{steps}steps"] = sampled_chamfer(model, pairs, steps, repeat=self.config.data.cut.repeat)
        # At the step the weights have been trained for (batches, as the train/* rows; not
        # Lightning's optimizer steps, of which distillation takes several per batch).
        assert trainer.logger is not None  # build_trainer always gives one
        trainer.logger.log_metrics({f"diag/{k}": v for k, v in values.items()}, step=module.data_step)


def build_module(config: RunConfig) -> _Base:
    return {"teacher": TeacherModule, "distill": DistillationModule, "refine": RefineModule}[config.kind](config)


def build_trainer(config: RunConfig, progress: bool = True, resume_step: int | None = None,
                  interrupt: StopOnInterrupt | None = None) -> L.Trainer:
    """``resume_step``: a resumed run's checkpoint step; its metrics log keeps the rows of the
    steps it holds. ``interrupt``: the Ctrl-C handler that may end the run early."""
    t = config.trainer
    out = Path(t.out_dir)
    strategy = t.strategy
    if config.kind == "distill" and strategy == "ddp":
        # Two optimizers, each stepping on its own nets' loss: each backward leaves the other
        # nets without gradients, which DDP must be told to expect (found by tests/training/test_ddp.py).
        strategy = "ddp_find_unused_parameters_true"
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        # Lightning counts optimizer steps; distillation steps the auxiliaries aux_steps times
        # and the student once per batch.
        max_steps=t.max_steps * (config.distill.aux_steps + 1 if config.kind == "distill" else 1),
        max_epochs=-1,
        precision=cast("_PRECISION_INPUT", t.precision),  # a str from the YAML; Lightning checks it
        gradient_clip_val=t.grad_clip if config.kind != "distill" else None,
        logger=ResumableCSVLogger(out, name="logs", version="", keep_before_step=resume_step, flush_logs_every_n_steps=1),
        log_every_n_steps=t.log_every,
        callbacks=[AtomicCheckpoint(out / "checkpoints", t.checkpoint_every), *([Diagnostics(config)] if t.diagnose_every else []),
                   *([interrupt] if interrupt is not None else [])],
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        use_distributed_sampler=False,  # StepPairs is already rank-aware
        deterministic=False,
    )


def _read_run_checkpoint(last: Path) -> dict[str, Any]:
    """A ``lidar-train`` checkpoint, read weights-only: a file that would run code is refused
    in one line (:class:`CheckpointError`), as the CLI and the node refuse it."""
    blob = read_weights_only(last)
    if not isinstance(blob, dict) or not isinstance(blob.get("data_step"), int) or not isinstance(blob.get("state_dict"), dict):
        raise CheckpointError(f"not a checkpoint: {last}: not a lidar-train checkpoint (no data_step / state_dict)")
    return blob


def fit(config: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train, then export the model (safetensors + config.json) to ``<out_dir>/export``.

    Raises :class:`TrainingInterrupted` (nothing exported) when Ctrl-C stopped the run."""
    out = Path(config.trainer.out_dir)
    last = out / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():  # before anything is built or written
        raise FileNotFoundError(f"--resume: no checkpoint at {last} (start the run without --resume)")
    resume_step = _read_run_checkpoint(last)["data_step"] if resume else None
    with StopOnInterrupt() as interrupt:
        module = checkpoints = None
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "run_config.yaml").write_text(config.to_yaml())
            L.seed_everything(config.trainer.seed, workers=True, verbose=False)
            module = build_module(config)
            trainer = build_trainer(config, progress, resume_step, interrupt)
            # Trainer.callbacks is set by its callback connector, which the class does not declare
            checkpoints = next(c for c in trainer.callbacks if isinstance(c, AtomicCheckpoint))  # type: ignore[attr-defined]
            trainer.fit(module, ckpt_path=str(last) if resume else None, weights_only=True)
            stopped_early = interrupt.requested and module.data_step < config.trainer.max_steps
            export = out / "export"
            if trainer.is_global_zero and not stopped_early:
                module.export(export)
        except _StopNow:
            step = module.data_step if module is not None else resume_step or 0
            saved = checkpoints.saved_step if checkpoints is not None and checkpoints.saved_step is not None else resume_step
            raise TrainingInterrupted(step, saved, last, at_once=True) from None
    if stopped_early:
        raise TrainingInterrupted(module.data_step, checkpoints.saved_step, last, at_once=False)
    return export


def export_last(config: RunConfig) -> Path:
    """Export the weights of ``<out_dir>/checkpoints/last.ckpt`` (a stopped or crashed run)."""
    last = Path(config.trainer.out_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"no checkpoint at {last}")
    state = _read_run_checkpoint(last)
    module = build_module(config)
    module.load_state_dict(state["state_dict"])
    return module.export(Path(config.trainer.out_dir) / "export")
