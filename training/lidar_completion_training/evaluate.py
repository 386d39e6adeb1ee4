"""Evaluation: completion metrics on held-out sequences, as a table, JSON, CSV and plots.

    lidar-evaluate --root data/synthetic --sequences 05 --checkpoint MODEL [--steps K] [--guidance W] [--sampler ve --t0 T]
    lidar-evaluate --root ... --sequences 05 --completed DIR        # score files made elsewhere
    lidar-evaluate --root ... --sequences 00 --completed-bag OUT_BAG --input-bag IN_BAG   # a bag completed over ROS
    lidar-evaluate report --root ... --sequences 05 --teacher T --student S --sd-student SD [--runs ...]
    lidar-evaluate beam-drop SCAN... [--keep-every 2 4] [--fov-deg 360 90] [--checkpoint MODEL]   # real scans (.beam_drop)

Every model goes through :class:`~lidar_completion.completer.SceneCompleter` and every
number through :mod:`.metrics`, so the table measures what the node and the CLI run. This
module scores; :mod:`.report` writes the tables, files, plots and paired differences, and
picks the rows it pairs by each row's :class:`~.report.RowKey` (role, sampler, steps, ...),
never by its display text.

Long runs (the published protocol: every scan of sequence 08): each scored scan is written
to ``<out>/per_scan.jsonl`` as it comes (:mod:`.scan_log`), ``--resume`` continues an
interrupted run from it, and ``--workers N`` scores scans in N processes (a scan's noise is
seeded by the scan alone, so the rows are those of one process, in scan order).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lidar_completion.config import PUBLISHED_CUT, SAMPLERS, UNRECORDED_RADIUS

from .dataset import CompletionDataset, PairConfig
from .metrics import evaluate_completion
from .report import (BAG_BUDGET_ROW, COMPLETED, COMPLETION, INPUT, INPUT_ROW, MODEL, MODEL_INPUT, NOMINAL, OUTPUT,
                     OUTPUT_BUDGET_ROW, SD_STUDENT, STUDENT, TEACHER, RowKey, find, paired_tables, plot_cd_vs_steps,
                     plot_training_curves, read_keys, render_examples, report_pairs, summarise, write_outputs)
from .scan_log import LOG_FILE, EvaluationError, ScanLog, normalised

__all__ = ["Setting", "evaluate_setting", "score_completed_bag", "main"]


@dataclass(frozen=True)
class Setting:
    """One row of the table: a model and how it is sampled (``checkpoint=None``: the input scan)."""

    name: str
    checkpoint: str | None = None
    steps: int | None = None
    guidance: float | None = None
    refine: bool = False
    # input rows only: FPS-sample the scan to this many points (or per scan index: a model's own count)
    input_points: int | dict[int, int] | None = None
    sampler: str | None = None  # None: the checkpoint's own
    t0: int | None = None
    completion_only: bool = False  # the model's completed points alone, not the scan + them
    completed: str | None = None  # score files completed elsewhere: <completed>/<sequence>/<NNNNNN>.<suffix>
    # What the row measures, as fields (paired differences and plots pick rows by it); not part
    # of the setting's identity, like ``name``'s wording is not to the numbers.
    key: RowKey | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Scoring:
    """How every scan of a run is completed and scored, whatever the setting."""

    preset: str = "model"
    n_part: int | None = None
    device: str = "cpu"
    seed: int = 0
    with_emd: bool = True
    free_space_margin: float | None = None  # None: the pipeline's; -1: the free-space stage off


class ScanScorer:
    """Scores one scan of one setting at a time: the scan's (partial, ground truth) pair and
    the setting's completer, built once per setting and kept for the next scan. One lives in
    each process that scores scans."""

    def __init__(self, dataset: CompletionDataset) -> None:
        self.dataset = dataset
        self._key: tuple[Setting, Scoring] | None = None
        self._completer: Any = None

    def _completer_for(self, setting: Setting, scoring: Scoring) -> Any:
        key = (dataclasses.replace(setting, name="", input_points=None), scoring)
        assert setting.checkpoint is not None
        if key != self._key:
            from lidar_completion.completer import SceneCompleter
            from lidar_completion.config import free_space_margin, load_config

            overrides: dict[str, Any] = {"data.preset": scoring.preset, "data.n_part": scoring.n_part, "sampling.steps": setting.steps,
                         "sampling.guidance": setting.guidance, "sampling.seed": scoring.seed, "refine": setting.refine,
                         "device": scoring.device, "sampling.sampler": setting.sampler, "sampling.t0": setting.t0,
                         "data.completion_only": setting.completion_only}
            config = load_config(**overrides)
            margin = scoring.free_space_margin
            if margin is not None:
                config = config.with_free_space_margin(free_space_margin(margin))
            self._completer, self._key = SceneCompleter.from_checkpoint(setting.checkpoint, config), key
        return self._completer

    def score(self, setting: Setting, scoring: Scoring, index: int, keep: bool = False
              ) -> tuple[int, dict[str, Any] | None, np.ndarray | None]:
        """(index, the scan's row or None when it was skipped, the scored points if ``keep``)."""
        if setting.completed is not None:
            return self._score_file(setting, scoring, index, keep)
        partial, full = self.dataset.pair(index)
        if setting.checkpoint is None:
            pred, nfe, seconds = partial, 0, 0.0
            count = setting.input_points.get(index) if isinstance(setting.input_points, dict) else setting.input_points
            if count:
                from lidar_completion.points import farthest_point_sample

                pred = farthest_point_sample(partial, count)
        else:
            result = self._completer_for(setting, scoring).complete(partial)
            pred, nfe, seconds = result.points, result.nfe, result.timings_ms["total"] / 1000
        row = evaluate_completion(pred, full, with_emd=scoring.with_emd) | {
            "nfe": nfe, "time_s": seconds, "points": len(pred), "steps": setting.steps or 0}
        return index, normalised(row), pred if keep else None

    def _score_file(self, setting: Setting, scoring: Scoring, index: int, keep: bool
                    ) -> tuple[int, dict[str, Any] | None, np.ndarray | None]:
        """A file completed elsewhere, named ``<sequence>/<NNNNNN>.<suffix>``; a missing or
        unreadable one is skipped with a message."""
        from lidar_completion.io import PointFileError, read_points

        assert setting.completed is not None
        sequence, i = self.dataset.locate(index)
        matches = sorted((Path(setting.completed) / sequence.name).glob(f"{i:06d}.*"))
        if not matches:
            print(f"lidar-evaluate: no completed file for {sequence.name}/{i:06d}, skipped", file=sys.stderr)
            return index, None, None
        try:
            pred = read_points(matches[0])
        except PointFileError as err:
            print(f"lidar-evaluate: {err}, skipped", file=sys.stderr)
            return index, None, None
        row = evaluate_completion(pred, self.dataset.pair(index)[1], with_emd=scoring.with_emd) | {"nfe": 0, "time_s": 0.0}
        return index, normalised(row), pred if keep else None


_WORKER: ScanScorer | None = None


def _start_worker(root: str, sequences: list[str], config: PairConfig, threads: int) -> None:
    """A scoring process: its own dataset and completer; Ctrl-C is the parent's to handle."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)
    _WORKER = ScanScorer(CompletionDataset(root, sequences, config))


def _score_in_worker(task: tuple[Setting, Scoring, int, bool]) -> tuple[int, dict[str, Any] | None, np.ndarray | None]:
    assert _WORKER is not None
    return _WORKER.score(*task)


class Workers:
    """``count`` spawned processes that score scans of ``dataset``, started on first use and
    kept across settings (each builds a setting's completer once). Each runs
    ``torch.get_num_threads() // count`` threads (at least one). Use as a context manager:
    leaving it stops them (at once after an error or Ctrl-C)."""

    def __init__(self, count: int, dataset: CompletionDataset) -> None:
        self.count = count
        self._dataset = dataset
        self._pool: Any = None

    def score(self, setting: Setting, scoring: Scoring, indices: Sequence[int], keep: Collection[int]
              ) -> Iterator[tuple[int, dict[str, Any] | None, np.ndarray | None]]:
        """Results as they come (not in scan order)."""
        if self._pool is None:
            import multiprocessing

            import torch

            d = self._dataset
            root = str(d.sequences[0].path.parents[1])
            threads = max(1, torch.get_num_threads() // self.count)
            # spawn: a forked copy of a process that already runs torch threads (or CUDA) can hang.
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.count, _start_worker, (root, [s.name for s in d.sequences], d.config, threads))
        def one(index: int) -> Setting:  # a per-scan budget travels with its own scan only
            counts = setting.input_points
            return dataclasses.replace(setting, input_points={index: counts[index]}) if isinstance(counts, dict) else setting

        tasks = [(one(index), scoring, index, index in keep) for index in indices]
        return self._pool.imap_unordered(_score_in_worker, tasks, chunksize=1)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if self._pool is not None:
            if kind is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None


def _scans(root: str, sequences: Sequence[str], max_scans: int | None, stride: int, max_range: float | None) -> tuple[CompletionDataset, list[int]]:
    """Held-out pairs; scan and ground truth cut as in training (the published cut) at ``max_range``
    (the model's trained radius; ``UNRECORDED_RADIUS`` for none)."""
    cut = dataclasses.replace(PUBLISHED_CUT, max_range=max_range or UNRECORDED_RADIUS)
    dataset = CompletionDataset(root, list(sequences), PairConfig(cut=cut))
    indices = list(range(0, len(dataset), stride))[:max_scans]
    return dataset, indices


def evaluate_setting(
    setting: Setting,
    dataset: CompletionDataset,
    indices: Sequence[int],
    *,
    preset: str = "model",
    n_part: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    keep: dict[int, np.ndarray] | None = None,
    with_emd: bool = True,
    free_space_margin: float | None = None,
    keep_indices: Collection[int] | None = None,
    log: ScanLog | None = None,
    workers: Workers | None = None,
) -> list[dict[str, float]]:
    """Per-scan metrics (plus ``nfe``, ``time_s``, ``points``, ``steps``) of one setting, in
    the order of ``indices`` (a skipped completed file has no row); ``free_space_margin``
    overrides the pipeline's (-1: the free-space stage off).

    ``keep`` gets the scored points of ``keep_indices`` (default: every scan). ``log``: rows
    already in it are taken from it, each new one is added as it comes. ``workers``: the new
    scans are scored in those processes."""
    from tqdm import tqdm

    scoring = Scoring(preset, n_part, device, seed, with_emd, free_space_margin)
    rows = log.done(setting.name) if log is not None else {}
    wanted = set() if keep is None else set(indices if keep_indices is None else keep_indices)
    todo = [i for i in indices if i not in rows]
    local = ScanScorer(dataset)
    if workers is not None and workers.count > 1 and len(todo) > 1:
        results = workers.score(setting, scoring, todo, wanted)
    else:
        results = (local.score(setting, scoring, i, i in wanted) for i in todo)
    with tqdm(total=len(indices), initial=len(indices) - len(todo), desc=setting.name, leave=False) as bar:
        for index, row, pred in results:
            if row is not None:
                rows[index] = row
                if log is not None:
                    log.add(setting.name, index, row)
            if pred is not None and keep is not None:
                keep[index] = pred
            bar.update()
    for index in wanted - set(todo):  # scored by an earlier run: only their rows were kept
        pred = local.score(setting, scoring, index, True)[2] if keep is not None and index in rows else None
        if keep is not None and pred is not None:
            keep[index] = pred
    return [rows[i] for i in indices if i in rows]


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="SemanticKITTI-layout root (with maps)")
    parser.add_argument("--sequences", nargs="+", required=True, help="held-out sequences, e.g. 05")
    parser.add_argument("--max-scans", type=int, default=None)
    parser.add_argument("--stride", type=int, default=1, help="use every k-th scan")
    parser.add_argument("--preset", default="model", help="point budget: model (the checkpoint's own, default), lite or full")
    parser.add_argument("--n-part", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/eval"))
    parser.add_argument("--max-range", type=float, help="scene radius in m (default: the model's trained radius, else 50)")
    parser.add_argument("--free-space-margin", type=float, metavar="M",
                        help="the pipeline's data.free_space_margin (m; default its own, 0.2); -1 = stage off")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="score scans in N processes (the same rows as 1; each process loads the model and the maps)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the interrupted run whose {LOG_FILE} is in --out (same settings only)")


# Arguments that do not change a single number of the tables (where they go, how fast, what is drawn).
_NOT_SETTINGS = {"out", "workers", "resume", "picture", "picture_note", "input_bag", "completed_bag", "runs", "examples", "merge"}


def _digest(path: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) of a checkpoint: the file, or every file of an export directory."""
    path, digest = Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _open_log(args: argparse.Namespace, command: str, models: Sequence[str]) -> ScanLog:
    """The run's per-scan log in ``--out``: its settings are every argument that changes a
    number, the root as an absolute path and the digest of each model's weights (a checkpoint
    retrained in place is another setting)."""
    settings = {key: value for key, value in sorted(vars(args).items()) if key not in _NOT_SETTINGS}
    settings |= {"command": command, "root": str(Path(args.root).resolve())}
    settings |= {f"{name}_digest": _digest(getattr(args, name)) for name in models if getattr(args, name)}
    return ScanLog(args.out / LOG_FILE, settings, args.resume)


def _interrupted(log: ScanLog) -> int:
    print(f"lidar-evaluate: interrupted: the {log.scored} scans scored so far are in {log.path}; "
          "the same command with --resume continues", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report(argv[1:])
    if argv[:1] == ["beam-drop"]:  # real scans without ground truth: drop rings, score against the scan
        from .beam_drop import main as beam_drop_main

        return beam_drop_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lidar-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model to run through the completion pipeline")
    source.add_argument("--completed", type=Path, help="directory of completed scans named <sequence>/<NNNNNN>.(ply|npy|bin|pcd)")
    source.add_argument("--completed-bag", type=Path,
                        help="bag of completed scans (e.g. recorded from the ROS node) of one sequence; needs --input-bag")
    parser.add_argument("--input-bag", type=Path, help="with --completed-bag: the bag that was completed (its stamps number the frames)")
    parser.add_argument("--picture", type=Path, help="with --completed-bag: PNG of the middle frame (input, completion, ground truth)")
    parser.add_argument("--picture-note", default="", help="appended to the picture's title")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the checkpoint's own")
    parser.add_argument("--t0", type=int, help="start timestep of the sampler (default: the checkpoint's own)")
    parser.add_argument("--refine", action="store_true")
    parser.add_argument("--completion-only", action="store_true",
                        help="score the model's completed points alone (the model study), not the default output "
                        "(the scan + what completion adds) against the input rows")
    parser.add_argument("--no-emd", action="store_true", help="skip EMD (exact optimal transport; the slowest metric)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.completed_bag and (args.resume or args.workers != 1):
        parser.error("--resume and --workers apply to --checkpoint and --completed, not --completed-bag")
    max_range = args.max_range
    if max_range is None and args.checkpoint:
        from lidar_completion.checkpoints import load_model

        max_range = load_model(args.checkpoint).config.max_range
    dataset, indices = _scans(args.root, args.sequences, args.max_scans, args.stride, max_range)
    with_emd = not args.no_emd
    if args.completed_bag:
        if args.input_bag is None or len(args.sequences) != 1:
            parser.error("--completed-bag needs --input-bag and exactly one of --sequences")
        name = f"completion ({args.completed_bag.name})"
        frames = score_completed_bag(dataset, args.input_bag, args.completed_bag, with_emd=with_emd)
        if not frames:
            print(f"lidar-evaluate: no completed scan in {args.completed_bag} matches a scan of {args.input_bag}", file=sys.stderr)
            return 2
        rows = [_prefixed(f, "completion_") | {"points": f["output_points"]} for f in frames]
        baseline = [_prefixed(f, "input_") | {"points": f["input_points"]} for f in frames]
        at_budget = [_prefixed(f, "budget_") | {"points": f["budget_points"]} for f in frames]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "frames.json").write_text(json.dumps(frames, indent=2))
        if args.picture:
            _picture(dataset, args.input_bag, args.completed_bag, frames, args.picture, max_range or UNRECORDED_RADIUS, args.picture_note)
        summary = {INPUT_ROW: summarise(baseline), BAG_BUDGET_ROW: summarise(at_budget), name: summarise(rows)}
        per_scan = {INPUT_ROW: baseline, BAG_BUDGET_ROW: at_budget, name: rows}
        keys = {INPUT_ROW: RowKey(INPUT), BAG_BUDGET_ROW: RowKey(INPUT, budget=COMPLETION), name: RowKey(COMPLETED)}
        print(write_outputs(args.out, summary, per_scan, keys))
        print(f"lidar-evaluate: {len(rows)} completed scans; table, JSON (frames.json: per frame), CSV and plot in {args.out}")
        return 0
    try:
        log = _open_log(args, "checkpoint" if args.checkpoint else "completed", ["checkpoint"])
    except EvaluationError as err:
        print(f"lidar-evaluate: {err}", file=sys.stderr)
        return 2
    try:
        with log, Workers(args.workers, dataset) as workers:
            if not args.completed:
                return _evaluate_checkpoint(args, dataset, indices, with_emd, log, workers)
            name = str(args.completed)
            rows = evaluate_setting(Setting(name, completed=name, key=RowKey(COMPLETED)), dataset, indices, with_emd=with_emd,
                                    log=log, workers=workers)
            if not rows:
                print("lidar-evaluate: nothing to evaluate", file=sys.stderr)
                return 2
            log.finish()
    except KeyboardInterrupt:
        return _interrupted(log)
    print(write_outputs(args.out, {name: summarise(rows)}, {name: rows}, {name: RowKey(COMPLETED)}))
    print(f"lidar-evaluate: {len(rows)} scans; table, JSON, CSV and plot in {args.out}")
    return 0


def _evaluate_checkpoint(args: argparse.Namespace, dataset: CompletionDataset, indices: Sequence[int],
                         with_emd: bool, log: ScanLog | None = None, workers: Workers | None = None) -> int:
    """What users get against what they had: the input (all points in range), the input FPS'd
    to the output's size, the default output (the scan + what completion adds) and the
    completion alone (``--completion-only``: that row only)."""
    name = Path(args.checkpoint).name
    output_row, alone_row = f"{name} (scan + completion)", f"{name}, completion only"
    common = dict(preset=args.preset, n_part=args.n_part, device=args.device, seed=args.seed, with_emd=with_emd,
                  free_space_margin=args.free_space_margin, log=log, workers=workers)
    model = dict(checkpoint=args.checkpoint, steps=args.steps, guidance=args.guidance, refine=args.refine,
                 sampler=args.sampler, t0=args.t0)
    model_key = RowKey(MODEL, args.sampler, args.steps, args.t0, args.guidance, args.refine)
    per_scan: dict[str, list[dict[str, float]]] = {}
    settings = [Setting(alone_row, completion_only=True, key=dataclasses.replace(model_key, completion_only=True), **model)]
    if not args.completion_only:
        output = Setting(output_row, key=model_key, **model)
        per_scan[output_row] = rows = evaluate_setting(output, dataset, indices, **common)
        output_points = {i: int(row["points"]) for i, row in zip(indices, rows)}
        settings = [Setting(INPUT_ROW, key=RowKey(INPUT)),
                    Setting(OUTPUT_BUDGET_ROW, input_points=output_points, key=RowKey(INPUT, budget=OUTPUT)), output, *settings]
    for setting in settings:
        if setting.name not in per_scan:
            per_scan[setting.name] = evaluate_setting(setting, dataset, indices, **common)
    if log is not None:
        log.finish()
    keys = {setting.name: setting.key for setting in settings}  # (in table order)
    per_scan = {name: per_scan[name] for name in keys}
    summary = {name: summarise(rows) for name, rows in per_scan.items()}
    print(write_outputs(args.out, summary, per_scan, keys))
    if (input_row := find(keys, role=INPUT, budget=None)) is not None:
        paired = paired_tables(per_scan, [(find(keys, role=MODEL, completion_only=False), input_row)])
        (args.out / "paired.md").write_text(paired + "\n")
        print(paired)
    print(f"lidar-evaluate: {len(indices)} scans; table, JSON, CSV and plot in {args.out}")
    return 0


def _prefixed(frame: dict[str, float], prefix: str) -> dict[str, float]:
    """The metrics under ``prefix`` of a :func:`score_completed_bag` row, unprefixed, as a table row."""
    return {k.removeprefix(prefix): v for k, v in frame.items() if k.startswith(prefix)} | {"nfe": 0, "time_s": 0.0}


def score_completed_bag(dataset: CompletionDataset, input_bag: Path, completed_bag: Path, *,
                        with_emd: bool = False) -> list[dict[str, float]]:
    """One row per completed scan of ``completed_bag`` whose stamp is a scan of ``input_bag``
    (a bag of ``dataset``'s one sequence, scan ``i`` its ``i``-th message): ``frame``, ``stamp``
    (s), ``input_points`` (the scan's static points in range), ``output_points`` (the output's
    points within the radius: the node's output also holds the scan beyond it), ``gt_points``,
    then every metric against the ground truth of the input scan (``input_<metric>``), of the
    input farthest-point sampled to the completion's point count (``budget_<metric>``: the line
    to beat, same number of points) and of the completion (``completion_<metric>``)."""
    from lidar_completion.bags import read_clouds
    from lidar_completion.points import farthest_point_sample, in_range

    stamps = {cloud.stamp_ns: i for i, cloud in enumerate(read_clouds(input_bag))}
    frames = []
    for cloud in read_clouds(completed_bag):
        index = stamps.get(cloud.stamp_ns)
        if index is None:
            print(f"lidar-evaluate: completed scan at {cloud.stamp_ns} ns is no scan of {input_bag}, skipped", file=sys.stderr)
            continue
        partial, full = dataset.pair(index)
        # The node's output holds the whole scan (far points too): score it where the ground
        # truth is, within the radius.
        output = cloud.xyz[in_range(cloud.xyz, max_range=dataset.config.cut.max_range)]
        before = evaluate_completion(partial, full, with_emd=with_emd)
        budget = farthest_point_sample(partial, len(output)) if 0 < len(output) < len(partial) else partial
        at_budget = evaluate_completion(budget, full, with_emd=with_emd)
        after = evaluate_completion(output, full, with_emd=with_emd)
        frames.append({"frame": index, "stamp": cloud.stamp_ns / 1e9, "input_points": len(partial),
                       "output_points": len(output), "gt_points": len(full), "budget_points": len(budget),
                       **{f"input_{k}": v for k, v in before.items()}, **{f"budget_{k}": v for k, v in at_budget.items()},
                       **{f"completion_{k}": v for k, v in after.items()}})
    return frames


def _picture(dataset: CompletionDataset, input_bag: Path, completed_bag: Path, frames: list[dict[str, float]],
             path: Path, max_range: float, note: str) -> Path:
    """Input scan, completion and ground truth of the middle scored frame, side by side."""
    from lidar_completion.bags import read_clouds
    from lidar_completion.render import render_comparison

    pick = frames[len(frames) // 2]
    stamp = round(pick["stamp"] * 1e9)
    scan = next(c for c in read_clouds(input_bag) if c.stamp_ns == stamp)
    completion = next(c for c in read_clouds(completed_bag) if c.stamp_ns == stamp)
    title = (f"frame {pick['frame']}: CD {pick['input_cd']:.3f} m (input) -> {pick['completion_cd']:.3f} m "
             f"(completion){'  ' + note if note else ''}")
    return render_comparison([("input scan", scan.xyz), ("completion", completion.xyz),
                              ("ground truth", dataset.pair(int(pick["frame"]))[1])], path, max_range=max_range, title=title)


def _is_input(key: RowKey | None) -> bool:
    return key is not None and key.role == INPUT


def report(argv: Sequence[str]) -> int:
    """The model-card table, each metric as mean ± standard error over the scans: the input
    scan (whole, FPS'd to the completion's budget, FPS'd to what the model sees), the teacher
    with both samplers at its full and the student's step count (and the sampled-CD-vs-steps
    curve), the plain-distillation and the Distillation-DPO student, with and without refinement."""
    parser = argparse.ArgumentParser(prog="lidar-evaluate report", description=report.__doc__)
    _common_args(parser)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True, help="Distillation-DPO student")
    parser.add_argument("--sd-student", help="plain score-distillation student (ablation)")
    parser.add_argument("--student-steps", type=int, default=None, help="default: the student's own")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--teacher-guidance", type=float, default=None, help="default: the teacher's own")
    parser.add_argument("--teacher-t0", type=int, default=None, help="start timestep of the teacher's VE rows (default: its own)")
    parser.add_argument("--curve-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16], help="teacher step counts of the CD-vs-steps curve")
    parser.add_argument("--emd", action="store_true", help="also compute EMD (exact optimal transport; slow)")
    parser.add_argument("--runs", nargs="*", default=[], help="training run dirs for the curves plot")
    parser.add_argument("--examples", type=int, default=1, help="scans drawn in completions.png")
    parser.add_argument("--rows", nargs="+", choices=("inputs", "teacher", "students"), default=["inputs", "teacher", "students"],
                        help="which groups of rows to compute (e.g. the teacher's while the students still train)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier report dirs whose rows join this table")
    args = parser.parse_args(argv)
    from lidar_completion.checkpoints import load_model

    teacher, student = load_model(args.teacher).config, load_model(args.student)
    k = args.student_steps or student.config.default_steps
    dpo, sd = f"Distillation-DPO student, {k} step(s)", f"plain distillation student, {k} step(s)"
    n_input = args.n_part or student.config.n_part
    budget = n_input * 10 if n_input else None
    guidance = teacher.default_guidance if args.teacher_guidance is None else args.teacher_guidance
    teacher_t0 = args.teacher_t0 or teacher.t0
    student_t0 = student.config.t0 if student.config.sampler == "ve" else None
    settings = [Setting(INPUT_ROW, key=RowKey(INPUT))]
    if n_input and "inputs" in args.rows:
        settings += [Setting(f"input scan, FPS to {budget:,} points (the nominal budget)", input_points=budget,
                             key=RowKey(INPUT, budget=NOMINAL)),
                     Setting(f"input scan, FPS to {n_input:,} points (what the model sees)", input_points=n_input,
                             key=RowKey(INPUT, budget=MODEL_INPUT))]
    if "inputs" not in args.rows:
        settings = []
    curve = sorted({*args.curve_steps, k, args.teacher_steps}) if "teacher" in args.rows else []
    for n in curve:
        settings.append(Setting(f"teacher, {n} steps, VE sampler (t0 {teacher_t0}), guidance {guidance:g}",
                                args.teacher, n, guidance, sampler="ve", t0=args.teacher_t0,
                                key=RowKey(TEACHER, "ve", n, teacher_t0, guidance)))
    if "teacher" in args.rows and student_t0 is not None and student_t0 != teacher_t0:
        # The teacher from the student's own start: the distillation's gain at equal steps.
        settings.append(Setting(f"teacher, {k} steps, VE sampler (t0 {student_t0}, the student's), guidance {guidance:g}",
                                args.teacher, k, guidance, sampler="ve", t0=student_t0,
                                key=RowKey(TEACHER, "ve", k, student_t0, guidance)))
    for n in sorted({k, args.teacher_steps}) if "teacher" in args.rows else []:
        settings.append(Setting(f"teacher, {n} steps, published DPM-Solver++ (t0 999), guidance {guidance:g}",
                                args.teacher, n, guidance, sampler="dpmsolver++", t0=999,
                                key=RowKey(TEACHER, "dpmsolver++", n, 999, guidance)))
    if args.sd_student and "students" in args.rows:
        settings.append(Setting(sd, args.sd_student, k, 1.0, key=RowKey(SD_STUDENT, steps=k, guidance=1.0)))
    if "students" in args.rows:
        settings.append(Setting(dpo, args.student, k, 1.0, key=RowKey(STUDENT, steps=k, guidance=1.0)))
    if student.refiner is not None and "students" in args.rows:
        settings.append(Setting(f"{dpo} + refinement", args.student, k, 1.0, True,
                                key=RowKey(STUDENT, steps=k, guidance=1.0, refine=True)))
    max_range = args.max_range or student.config.max_range
    dataset, indices = _scans(args.root, args.sequences, args.max_scans, args.stride, max_range)
    summary, per_scan, drawn = {}, {}, {}
    keys: dict[str, RowKey | None] = {}
    shown = indices[: args.examples]
    try:
        log = _open_log(args, "report", ["teacher", "student", "sd_student"])
    except EvaluationError as err:
        print(f"lidar-evaluate report: {err}", file=sys.stderr)
        return 2
    try:
        with log, Workers(args.workers, dataset) as workers:
            for setting in settings:  # (grows by the budget row once the DPO student's counts are known)
                kept: dict[int, np.ndarray] = {}
                drawn_here = setting.checkpoint is None or setting.steps in (k, args.teacher_steps)
                rows = evaluate_setting(setting, dataset, indices, preset=args.preset, n_part=args.n_part,
                                        device=args.device, seed=args.seed, keep=kept, with_emd=args.emd,
                                        free_space_margin=args.free_space_margin, keep_indices=shown if drawn_here else (),
                                        log=log, workers=workers)
                summary[setting.name], per_scan[setting.name] = summarise(rows), rows
                keys[setting.name] = setting.key
                if drawn_here:
                    for index in shown:
                        drawn[f"{setting.name} (scan {index})"] = kept[index]
                s = summary[setting.name]
                print(f"{setting.name}: CD {s['cd']:.3f} ± {s['cd_se']:.3f} m, JSD-BEV {s['jsd_bev']:.3f}, "
                      f"{s['time_s']:.2f} s/frame", flush=True)
                if setting.key == RowKey(STUDENT, steps=k, guidance=1.0):
                    # The line to beat at the same budget: the scan FPS'd to the student's own count,
                    # scan by scan (the pipeline's filters leave fewer points than the nominal budget).
                    counts = {i: int(row["points"]) for i, row in zip(indices, rows)}
                    settings.append(Setting(BAG_BUDGET_ROW, input_points=counts, key=RowKey(INPUT, budget=COMPLETION)))
            log.finish()
    except KeyboardInterrupt:
        return _interrupted(log)
    for index in shown:
        drawn[f"ground truth (scan {index})"] = dataset.pair(index)[1]
    for earlier in args.merge:  # rows computed by an earlier run on the same scans
        loaded = json.loads((earlier / "summary.json").read_text())
        summary, per_scan = loaded["summary"] | summary, loaded["per_scan"] | per_scan
        keys = read_keys(earlier, list(loaded["summary"])) | keys
    # The input rows (the lines to beat) lead the table, whichever run computed them.
    summary = dict(sorted(summary.items(), key=lambda row: not _is_input(keys.get(row[0]))))
    keys = {name: keys.get(name) for name in summary}  # (in table order: the first row of a kind is paired)
    table = write_outputs(args.out, summary, per_scan, keys)
    pairs = report_pairs(keys, steps=k, teacher_steps=args.teacher_steps, teacher_t0=teacher_t0, student_t0=student_t0)
    # CD decides the claims; the others show what a preference for CD trades (F-score, IoU: higher is better).
    paired = paired_tables(per_scan, pairs)
    (args.out / "paired.md").write_text(paired + "\n")
    render_examples(drawn, args.out / "completions.png")
    plot_cd_vs_steps(summary, keys, args.out / "cd_vs_steps.png")
    curves = plot_training_curves(args.runs, args.out / "training_curves.png")
    print(table)
    print(paired)
    print(f"lidar-evaluate: {len(indices)} scans of {', '.join(args.sequences)}; outputs in {args.out}"
          + (f"; curves {curves}" if curves else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
