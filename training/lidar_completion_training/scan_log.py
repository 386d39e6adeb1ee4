"""The per-scan log of an evaluation: every scored scan on disk as it comes, so an
interrupted run resumes where it stopped.

The published protocol scores every scan of sequence 08 (4,071 scans), hours to days of
sampling. ``lidar-evaluate`` appends each scan's row to ``<out>/per_scan.jsonl`` and flushes
it to disk before it counts the scan as done, so a run killed at any point loses at most the
scans in flight; ``--resume`` reads the file back and scores only what is missing. The
first line holds the settings that decide the numbers (data, sampling, the checkpoints'
digests): a resume under other settings is refused, so one table never mixes two
configurations. A row read back holds the numbers that were written (JSON writes a float64
so that it reads back bit for bit), so a resumed run's tables equal an uninterrupted run's.

Format, one JSON object a line::

    {"lidar-evaluate per-scan log": 1, "settings": {...}}
    {"setting": "<table row>", "index": <dataset index>, "row": {"cd": ..., ...}}
    ...
    {"finished": true}                      # once every row is in (then the tables are written)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["LOG_FILE", "EvaluationError", "ScanLog", "normalised"]

LOG_FILE = "per_scan.jsonl"
MAGIC = "lidar-evaluate per-scan log"
VERSION = 1


class EvaluationError(Exception):
    """A one-line reason why an evaluation cannot start (the CLI prints it, exit status 2)."""


def normalised(values: Any) -> Any:
    """``values`` as they read back from the log: Python floats and ints, lists for tuples."""
    return json.loads(json.dumps(values, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    shown = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:4]]
    return "; ".join(shown) + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")


def _read(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[int, dict[str, Any]]], bool, int]:
    """(settings or None when the file is no per-scan log, rows by setting and index,
    finished, bytes up to the last whole row). A last line without its newline (a write cut
    short by a kill) is not counted."""
    data = path.read_bytes()
    settings: dict[str, Any] | None = None
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    finished, end = False, 0
    offset = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        offset += len(line) + 1
        if offset > len(data):  # the last piece: no newline after it
            break
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise EvaluationError(f"{path}:{number}: not a per-scan row; delete the file or choose another --out") from None
        if number == 1:
            if not isinstance(entry, dict) or entry.get(MAGIC) != VERSION or not isinstance(entry.get("settings"), dict):
                return None, {}, False, 0
            settings, end = entry["settings"], offset
        elif entry.get("finished"):
            finished = True  # (end stays before it: a resumed run writes it again)
        else:
            rows.setdefault(entry["setting"], {})[int(entry["index"])] = entry["row"]
            end = offset
    return settings, rows, finished, end


class ScanLog:
    """``path``: the per-scan log of an evaluation with ``settings``; ``resume`` reads the rows
    already scored (same settings only), else a fresh log is started. Raises
    :class:`EvaluationError` for a resume that cannot be, and, without ``resume``, for a log
    of an unfinished run (it is kept: ``--resume`` continues it)."""

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], resume: bool) -> None:
        self.path = Path(path)
        settings = normalised(settings)
        self._rows: dict[str, dict[int, dict[str, Any]]] = {}
        if resume:
            if not self.path.is_file():
                raise EvaluationError(f"--resume: no per-scan log at {self.path} (start without --resume)")
            old, rows, _, end = _read(self.path)
            if old is None:
                raise EvaluationError(f"--resume: {self.path} is not a lidar-evaluate per-scan log")
            if old != settings:
                raise EvaluationError(f"--resume: {self.path} was written with other settings ({_differences(old, settings)}); "
                                      "resume with the same ones, or start over with another --out")
            self._rows = rows
            with open(self.path, "r+b") as handle:  # drop a half-written last line and the finished mark
                handle.truncate(end)
        else:
            if self.path.is_file():
                old, rows, finished, _ = _read(self.path)
                scored = sum(len(r) for r in rows.values())
                if old is not None and not finished and scored:
                    raise EvaluationError(f"{self.path} holds an unfinished evaluation ({scored} scans scored): --resume "
                                          "continues it; to start over, delete it or choose another --out")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({MAGIC: VERSION, "settings": settings}) + "\n")
        self._handle = open(self.path, "a")

    def done(self, setting: str) -> dict[int, dict[str, Any]]:
        """Rows already scored for the table row ``setting``, by dataset index."""
        return dict(self._rows.get(setting, {}))

    @property
    def scored(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def _write(self, entry: dict[str, Any]) -> None:
        self._handle.write(json.dumps(entry, default=_plain) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def add(self, setting: str, index: int, row: dict[str, Any]) -> None:
        """Record one scored scan (on disk when this returns)."""
        self._write({"setting": setting, "index": int(index), "row": row})
        self._rows.setdefault(setting, {})[int(index)] = normalised(row)

    def finish(self) -> None:
        """Mark the run complete (every row in)."""
        self._write({"finished": True})

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "ScanLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
