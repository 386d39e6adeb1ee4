"""A child process whose merged stdout/stderr is collected line by line: the ROS executables
as the demo, the benchmarks and the ROS tests start and watch them.

Standard library only (no rclpy, unlike :mod:`lidar_completion_ros.runtime`), and in the core
package, so a benchmark or a test that only starts processes imports it for nothing, without the
ROS package, and it works where ROS is not installed. :func:`parameter_args` writes a node's
parameters as the ``-p name:=value`` arguments of its command line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ChildProcess", "parameter_args"]


class ChildProcess:
    """``cmd`` started with its stdout and stderr merged into one pipe that a reader thread
    drains into :attr:`lines` (and ``log``, a file, when given), so the child never blocks on a
    full pipe and callers can wait for what it prints.

    ``group``: start the child in its own session and send its signals to the whole group."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str] | None = None, name: str | None = None, *,
                 log: Path | str | None = None, cwd: Path | str | None = None, group: bool = False) -> None:
        self.cmd = [str(part) for part in cmd]
        self.name = name or Path(self.cmd[0]).name
        self.log = Path(log) if log is not None else None
        self.lines: list[str] = []
        self.killed = False  # kill() ended it (a signal went unheeded, or the caller gave up)
        self._group = group
        self._eof = False
        self._cv = threading.Condition()
        self._file = self.log.open("w") if self.log is not None else None
        self.popen = subprocess.Popen(self.cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, errors="replace", bufsize=1, start_new_session=group)
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                with self._cv:
                    self.lines.append(line.rstrip("\n"))
                    self._cv.notify_all()
                if self._file is not None:
                    self._file.write(line)
                    self._file.flush()
        finally:
            if self._file is not None:
                self._file.close()
            with self._cv:
                self._eof = True
                self._cv.notify_all()

    @property
    def output(self) -> str:
        """Everything it has printed so far."""
        with self._cv:
            return "\n".join(self.lines)

    def tail(self, n: int = 80) -> str:
        """Its last ``n`` lines."""
        with self._cv:
            return "\n".join(self.lines[-n:])

    @property
    def returncode(self) -> int | None:
        """Its exit status, or None while it runs."""
        return self.popen.poll()

    @property
    def output_ended(self) -> bool:
        """Its output is read to the end (it exited, or closed its stdout and stderr)."""
        with self._cv:
            return self._eof

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        """The first line (from the start of its output) matching ``pattern``, as soon as it is
        printed; None after ``timeout`` seconds, or as soon as its output ends (it exited) without one."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cv:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._cv.wait(min(remaining, 0.5))

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status, once it has exited and its output is read to the end;
        ``subprocess.TimeoutExpired`` (it keeps running) after ``timeout`` seconds."""
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def send_signal(self, sig: int) -> None:
        """``sig`` to it (to its group with ``group``), unless it has exited."""
        if self.popen.poll() is None:
            try:
                if self._group:
                    os.killpg(self.popen.pid, sig)
                else:
                    self.popen.send_signal(sig)
            except ProcessLookupError:  # exited in between
                pass

    def interrupt(self, timeout: float = 30.0, sig: int = signal.SIGINT) -> int:
        """Send SIGINT (or ``sig``) and wait ``timeout`` seconds for it to exit; killed if it
        has not (then :attr:`killed` is set and the status is ``-SIGKILL``). Its exit status."""
        self.send_signal(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reader.join(5)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL it (its group with ``group``) and reap it, unless it has exited."""
        if self.popen.poll() is None:
            self.killed = True
            self.send_signal(signal.SIGKILL)
            self.popen.wait(10)
        self._reader.join(5)


def parameter_args(params: Mapping[str, Any]) -> list[str]:
    """``-p name:=value`` command-line pairs for ``--ros-args`` (floats keep their decimal
    point, bools are lower case), so ROS types the values as the node declares them."""
    out: list[str] = []
    for name, value in params.items():
        if isinstance(value, (list, tuple)):  # YAML flow list: ['a', 'b'] or [0.0, 1.5]
            text = "[" + ", ".join(repr(float(v)) if isinstance(v, (int, float)) else repr(str(v))
                                   for v in value) + "]"
        else:
            text = (str(value).lower() if isinstance(value, bool)
                    else repr(value) if isinstance(value, float) else str(value))
        out += ["-p", f"{name}:={text}"]
    return out
