"""The training metrics log (``<out_dir>/logs/metrics.csv``), kept across a resume.

Lightning's CSV logger deletes an existing ``metrics.csv`` when a run starts ("previous log
files will be deleted"), so a resumed run would lose every row logged before the crash.
:class:`ResumableCSVLogger` keeps the rows of the steps the checkpoint of step N already
holds and appends the resumed run's rows after them: the training rows of steps 0 .. N - 1
and the diagnostics rows (``diag/*`` only) up to step N, which are taken on the weights after
N steps. Rows logged after the checkpoint (the steps that are trained again, diagnostics that
are taken again) are dropped, so every step's row and every diagnostics row appear once.
A checkpoint is only renamed into place once its rows are on disk (``engine.AtomicCheckpoint``).
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricExperimentWriter
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["ResumableCSVLogger", "read_metrics"]


def _kept(row: dict[str, str], checkpoint_step: int) -> bool:
    """Whether ``row`` belongs to the steps a checkpoint of ``checkpoint_step`` holds."""
    if not row.get("step"):
        return False
    step = int(float(row["step"]))
    values = [key for key, value in row.items() if key != "step" and value not in ("", None)]
    diagnostics = bool(values) and all(key.startswith("diag/") for key in values)
    return step < checkpoint_step or (diagnostics and step == checkpoint_step)


def read_metrics(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a metrics CSV file."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


class _KeepingWriter(ExperimentWriter):
    """An experiment writer that keeps the rows of the steps a checkpoint of step
    ``keep_before_step`` holds (:func:`_kept`)."""

    def __init__(self, log_dir: str, keep_before_step: int) -> None:
        self._keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        header, rows = read_metrics(path)
        kept = [row for row in rows if _kept(row, self._keep_before_step)]
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)
        self.metrics_keys = sorted(header)  # the resumed rows extend this header


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger; with ``keep_before_step`` (a resumed run: its checkpoint's
    step) the rows already logged for the steps the checkpoint holds stay in ``metrics.csv``
    and new rows are appended."""

    def __init__(self, *args: Any, keep_before_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _FabricExperimentWriter:  # the type CSVLogger.experiment declares
        if self._experiment is not None:
            return self._experiment
        if self._keep_before_step is None:
            return super().experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingWriter(self.log_dir, self._keep_before_step)
        return self._experiment
