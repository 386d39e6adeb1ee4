"""Evaluation results as tables, files, plots and paired differences.

:mod:`.evaluate` scores scans; this module turns the scored rows into what a run leaves
behind: ``table.md`` (mean ± standard error per row), ``summary.json`` (the same and every
scan's row), ``summary.csv``, ``rows.json`` (each row's :class:`RowKey`), ``metrics.png``,
and for the report ``paired.md``, ``cd_vs_steps.png``, ``completions.png`` and
``training_curves.png``.

A table row has two names: its display text (the table's first column, the key of
``summary.json`` and of the per-scan log) and a :class:`RowKey`, the fields that say what
it measures (role, sampler, steps, ...). The paired differences and the plots pick rows by
their keys, never by their text, so rewording a row keeps it in ``paired.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RowKey", "INPUT", "TEACHER", "STUDENT", "SD_STUDENT", "MODEL", "COMPLETED", "find", "legacy_key",
           "read_keys", "summarise", "markdown_table", "paired_differences", "paired_tables", "report_pairs",
           "write_outputs", "plot_cd_vs_steps", "plot_training_curves", "render_examples"]

COLUMNS = ("cd", "jsd_bev", "emd", "fscore", "iou_0.5", "iou_0.2", "iou_0.1", "nfe", "time_s")
HEADERS = {"cd": "CD (m) ↓", "jsd_bev": "JSD-BEV ↓", "emd": "EMD ↓", "fscore": "F-score ↑", "iou_0.5": "IoU 0.5 ↑",
           "iou_0.2": "IoU 0.2 ↑", "iou_0.1": "IoU 0.1 ↑", "nfe": "NFE", "time_s": "time/frame (s)"}
PAIRED_KEYS = ("cd", "jsd_bev", "fscore", "iou_0.5")  # CD decides the claims; the others show what it trades
KEYS_FILE = "rows.json"

# Display text of the input rows (the lines every completion has to beat).
INPUT_ROW = "input scan (all points in range)"
BAG_BUDGET_ROW = "input scan, FPS to the completion's point count"  # the same line at the same budget
OUTPUT_BUDGET_ROW = "input scan, FPS to the output's point count"  # (the whole scan when the output is larger)

# Roles of a row.
INPUT = "input"  # the input scan, whole or FPS'd to a budget
TEACHER = "teacher"
STUDENT = "student"  # the Distillation-DPO student
SD_STUDENT = "sd student"  # the plain score-distillation student (ablation)
MODEL = "model"  # lidar-evaluate --checkpoint's model
COMPLETED = "completed"  # scans completed elsewhere (files or a bag)

# Budgets of an input row (None: every point in range).
NOMINAL = "nominal"  # FPS to the nominal point budget
MODEL_INPUT = "model input"  # FPS to what the model sees
COMPLETION = "completion"  # FPS to the completion's own count, scan by scan
OUTPUT = "output"  # FPS to the output's own count, scan by scan


@dataclass(frozen=True)
class RowKey:
    """What a table row measures. ``steps``, ``sampler``, ``t0``, ``guidance`` and ``refine``
    are the setting's as given (None: the checkpoint's own), ``t0`` of a report's teacher rows
    resolved to a number."""

    role: str
    sampler: str | None = None
    steps: int | None = None
    t0: int | None = None
    guidance: float | None = None
    refine: bool = False
    budget: str | None = None  # input rows: the point budget the scan is FPS'd to
    completion_only: bool = False  # the model's completed points alone

    def matches(self, **fields: Any) -> bool:
        return all(getattr(self, name) == value for name, value in fields.items())


def find(keys: Mapping[str, RowKey | None], **fields: Any) -> str | None:
    """The display text of the first row whose key has these field values (None: no such row)."""
    return next((name for name, key in keys.items() if key is not None and key.matches(**fields)), None)


_TEACHER = re.compile(r"teacher, (\d+) steps, (VE sampler|published DPM-Solver\+\+) \(t0 (\d+)(?:, the student's)?\), "
                      r"guidance (\S+)")
_STUDENT = re.compile(r"(Distillation-DPO|plain distillation) student, (\d+) step\(s\)( \+ refinement)?")


def legacy_key(name: str) -> RowKey | None:
    """The key of a row of a run written before rows had keys (a directory without
    ``rows.json``), from its display text as those versions wrote it; None when unknown."""
    if name in (INPUT_ROW, BAG_BUDGET_ROW, OUTPUT_BUDGET_ROW):
        return RowKey(INPUT, budget={INPUT_ROW: None, BAG_BUDGET_ROW: COMPLETION, OUTPUT_BUDGET_ROW: OUTPUT}[name])
    if name.startswith("input scan"):
        # (another input row: its text as its budget, so that it still leads the table)
        return RowKey(INPUT, budget=NOMINAL if "budget" in name else MODEL_INPUT if "what the model sees" in name else name)
    if match := _TEACHER.fullmatch(name):
        steps, sampler, t0, guidance = match.groups()
        return RowKey(TEACHER, "ve" if sampler == "VE sampler" else "dpmsolver++", int(steps), int(t0), float(guidance))
    if match := _STUDENT.fullmatch(name):
        kind, steps, refine = match.groups()
        return RowKey(STUDENT if kind == "Distillation-DPO" else SD_STUDENT, steps=int(steps), guidance=1.0,
                      refine=bool(refine))
    return None


def read_keys(out: Path, names: Sequence[str]) -> dict[str, RowKey | None]:
    """The keys of the rows ``names`` of an earlier run in ``out``: its ``rows.json``, else
    (a run of an earlier version) :func:`legacy_key`."""
    path = out / KEYS_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    return {name: RowKey(**stored[name]) if name in stored else legacy_key(name) for name in names}


def _standard_error(values: np.ndarray) -> float:
    """Standard error of the mean (0 for a single value)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over the scans, plus ``<key>_se``: its standard error."""
    summary = {}
    for key in rows[0]:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        summary[key] = float(values.mean())
        summary[f"{key}_se"] = _standard_error(values)
    return summary


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    """One row per setting, metrics as mean ± standard error over the scans."""
    columns = [c for c in COLUMNS if all(c in s for s in summary.values())]
    lines = ["| setting | points | " + " | ".join(HEADERS[c] for c in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for name, s in summary.items():
        cells = []
        for c in columns:
            if c == "nfe":
                cells.append(f"{s[c]:.0f}")
            elif c == "time_s":
                cells.append(f"{s[c]:.2f}")
            else:
                cells.append(f"{s[c]:.3f} ± {s[c + '_se']:.3f}")
        lines.append(f"| {name} | {s.get('points', 0):,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(per_scan: dict[str, list[dict[str, float]]], pairs: Sequence[tuple[str | None, str | None]],
                       key: str = "cd") -> str:
    """Per-scan differences ``a - b`` of ``key`` for rows computed on the same scans: mean ±
    standard error of the difference (the paired comparison: scene difficulty cancels) and
    how often ``a`` was lower. Pairs whose rows are missing (or None) are skipped."""
    lines = [f"| {key}: a - b (paired, same scans) | mean ± SE | a lower on |", "|---|---|---|"]
    for a, b in pairs:
        if a not in per_scan or b not in per_scan or len(per_scan[a]) != len(per_scan[b]):
            continue
        assert a is not None and b is not None
        diff = np.array([ra[key] - rb[key] for ra, rb in zip(per_scan[a], per_scan[b])])
        lines.append(f"| {a} − {b} | {diff.mean():+.4f} ± {_standard_error(diff):.4f} | {(diff < 0).sum()}/{len(diff)} |")
    return "\n".join(lines)


def paired_tables(per_scan: dict[str, list[dict[str, float]]], pairs: Sequence[tuple[str | None, str | None]]) -> str:
    """:func:`paired_differences` of each of :data:`PAIRED_KEYS` (``paired.md``)."""
    return "\n\n".join(paired_differences(per_scan, pairs, key) for key in PAIRED_KEYS)


def report_pairs(keys: Mapping[str, RowKey | None], *, steps: int, teacher_steps: int, teacher_t0: int | None,
                 student_t0: int | None) -> list[tuple[str | None, str | None]]:
    """The report's paired comparisons, by the rows' keys (``keys`` in table order; None for a
    row that is missing): the Distillation-DPO student (``steps``) against the plain one, the
    teacher at the student's steps from the student's start ``student_t0`` (when it differs from
    the teacher's ``teacher_t0``), the teacher at ``teacher_steps``, and the input scan FPS'd to
    the completion's count (else to the nominal budget); the refined student against the input."""
    dpo = find(keys, role=STUDENT, steps=steps, refine=False)
    sd = find(keys, role=SD_STUDENT, steps=steps, refine=False)
    teacher_at_k = find(keys, role=TEACHER, sampler="ve", steps=steps, t0=student_t0) \
        if student_t0 is not None and student_t0 != teacher_t0 else None
    teacher_full = find(keys, role=TEACHER, sampler="ve", steps=teacher_steps, t0=teacher_t0)
    budget = find(keys, role=INPUT, budget=COMPLETION) or find(keys, role=INPUT, budget=NOMINAL)
    return [(dpo, sd), (dpo, teacher_at_k), (sd, teacher_at_k), (dpo, teacher_full), (dpo, budget),
            (find(keys, role=STUDENT, steps=steps, refine=True), find(keys, role=INPUT, budget=None))]


def write_outputs(out: Path, summary: dict[str, dict[str, float]], per_scan: dict[str, list[dict[str, float]]],
                  keys: Mapping[str, RowKey | None] | None = None) -> str:
    """``table.md``, ``summary.json``, ``summary.csv``, ``rows.json`` (the rows' keys) and
    ``metrics.png`` in ``out``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"summary": summary, "per_scan": per_scan}, indent=2))
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["setting", *next(iter(summary.values())).keys()])
        writer.writeheader()
        for name, s in summary.items():
            writer.writerow({"setting": name, **s})
    stored = {name: dataclasses.asdict(key) for name in summary if (key := (keys or {}).get(name)) is not None}
    (out / KEYS_FILE).write_text(json.dumps(stored, indent=2))
    _plot_bars(summary, out / "metrics.png")
    return table


def _plot_bars(summary: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("cd", "jsd_bev", "fscore", "iou_0.2", "time_s")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), layout="constrained")
    names = list(summary)
    for ax, key in zip(axes, keys):
        ax.barh(names, [summary[n][key] for n in names], color="tab:blue")
        ax.set_title(key)
        ax.invert_yaxis()
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cd_vs_steps(summary: dict[str, dict[str, float]], keys: Mapping[str, RowKey | None], path: Path) -> None:
    """Sampled CD (± standard error) against sampler steps: one line per model and sampler
    (rows whose keys differ in ``steps`` alone), the input FPS'd to the nominal budget as the
    line to beat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    lines: dict[Any, tuple[str, list[tuple[float, float, float]]]] = {}
    for name, s in summary.items():
        key = keys.get(name)
        if s.get("steps", 0) == 0:
            if key is not None and key.matches(role=INPUT, budget=NOMINAL):
                ax.axhline(s["cd"], color="gray", linestyle="--", label=name)
            continue
        label = re.sub(r", \d+ steps?(\(s\))?", "", name)  # the legend: the row's text without its step count
        group = dataclasses.replace(key, steps=None) if key is not None else label
        lines.setdefault(group, (label, []))[1].append((s["steps"], s["cd"], s["cd_se"]))
    for label, points in lines.values():
        steps, cd, se = zip(*sorted(points))
        ax.errorbar(steps, cd, yerr=se, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("sampler steps")
    ax.set_ylabel("Chamfer distance (m)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curves(runs: Sequence[str], path: Path) -> Path | None:
    """Loss / CD winner-loser / switch-rate curves from the runs' Lightning CSV logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [(Path(r).name, Path(r) / "logs" / "metrics.csv") for r in runs]
    logs = [(name, csv_path) for name, csv_path in logs if csv_path.is_file()]
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(6 * len(logs), 4), layout="constrained", squeeze=False)
    for ax, (name, csv_path) in zip(axes[0], logs):
        with open(csv_path) as handle:
            rows = list(csv.DictReader(handle))
        for key in rows[0]:
            if key.startswith("train/") and key not in ("train/mse", "train/reg"):
                pairs = [(float(r["step"]), float(r[key])) for r in rows if r.get(key)]
                if pairs:
                    steps, values = zip(*pairs)
                    window = max(1, len(values) // 50)
                    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                    ax.plot(steps[: len(smooth)], smooth, label=key.removeprefix("train/"))
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_examples(examples: dict[str, np.ndarray], path: Path) -> None:
    from lidar_completion.render import render_comparison

    render_comparison(list(examples.items()), path)
