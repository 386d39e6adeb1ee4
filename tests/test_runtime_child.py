"""lidar_completion.children.ChildProcess without DDS: small ``python -c`` children that
print, sleep, exit or handle SIGINT."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from lidar_completion.children import ChildProcess


def child(body: str, **kwargs) -> ChildProcess:
    """``body`` run by a fresh interpreter, unbuffered, ``sys``/``signal``/``time`` imported."""
    return ChildProcess([sys.executable, "-u", "-c", "import signal, sys, time\n" + body], name="child", **kwargs)


def test_wait_for_returns_the_first_matching_line_and_the_log_has_all_output(tmp_path):
    proc = child("print('one'); print('two 2', file=sys.stderr); sys.stdout.flush(); time.sleep(0.2); print('three 3')",
                 log=tmp_path / "child.log")
    try:
        match = proc.wait_for(r"(\w+) (\d)", 30)
        assert match is not None and match.group(1) == "two"  # stderr merged, first match wins
        assert proc.wait_for(r"three", 30) is not None
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert proc.lines == ["one", "two 2", "three 3"]
    assert proc.output == "one\ntwo 2\nthree 3" and proc.tail(1) == "three 3"
    assert (tmp_path / "child.log").read_text() == "one\ntwo 2\nthree 3\n"


def test_wait_for_returns_none_as_soon_as_the_child_exits_without_a_match():
    proc = child("print('bye'); sys.exit(4)")
    start = time.monotonic()
    assert proc.wait_for(r"never", 60) is None
    assert time.monotonic() - start < 30  # not the timeout
    assert proc.output_ended and proc.wait(30) == 4 and proc.returncode == 4


def test_wait_for_times_out_while_the_child_runs():
    proc = child("print('up'); time.sleep(30)")
    try:
        assert proc.wait_for(r"up", 30) is not None
        start = time.monotonic()
        assert proc.wait_for(r"never", 0.3) is None
        assert time.monotonic() - start >= 0.3
        assert proc.returncode is None and not proc.output_ended
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.1)
    finally:
        proc.kill()
    assert proc.killed and proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("group", [False, True])
def test_interrupt_returns_the_exit_status_of_a_child_that_handles_sigint(group):
    proc = child("signal.signal(signal.SIGINT, lambda *_: sys.exit(3))\nprint('ready')\ntime.sleep(30)\nprint('late')",
                 group=group)
    try:
        assert proc.wait_for(r"ready", 30) is not None
        assert proc.interrupt(30) == 3
    finally:
        proc.kill()
    assert not proc.killed and proc.lines == ["ready"]


def test_interrupt_kills_a_child_that_ignores_sigint():
    proc = child("signal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready')\ntime.sleep(30)")
    try:
        assert proc.wait_for(r"ready", 30) is not None
        start = time.monotonic()
        assert proc.interrupt(0.5) == -signal.SIGKILL
        assert time.monotonic() - start < 15
    finally:
        proc.kill()
    assert proc.killed and proc.output_ended


def test_signals_to_an_exited_child_are_no_ops():
    proc = child("print('done')")
    assert proc.wait(30) == 0
    assert proc.interrupt(1) == 0
    proc.kill()
    assert not proc.killed
