"""Running ROS executables: a managed node's autostart, exit statuses and clean shutdown;
spinning until a condition, and a private monitor node (the bag tools, the demo, the
benchmarks and the tests)."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions

from .parameters import StartupError

__all__ = ["EXIT_FAILURES", "EXIT_STARTUP", "PrivateNode", "run_managed_node", "spin_until", "summary_line"]

EXIT_STARTUP, EXIT_FAILURES = 2, 3


def spin_until(spinner: Any, predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> bool:
    """Serve callbacks on this thread until ``predicate()`` is true (True), or ``timeout``
    seconds pass or the context shuts down (False). ``spinner``: an executor, or a node
    (spun with ``rclpy.spin_once``); either carries its own context."""
    once = getattr(spinner, "spin_once", None) or (lambda timeout_sec: rclpy.spin_once(spinner, timeout_sec=timeout_sec))
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not spinner.context.ok():
            return False
        once(timeout_sec=min(step, remaining))
    return True


class PrivateNode:
    """A node on its own context and ROS domain, with its own single-threaded executor and
    no signal handlers (the process keeps its own): a monitor beside the processes it
    watches. ``close()`` shuts it down."""

    def __init__(self, name: str, domain_id: int) -> None:
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def spin_until(self, predicate: Callable[[], Any], timeout: float) -> bool:
        """:func:`spin_until` on this node's executor."""
        return spin_until(self.executor, predicate, timeout)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def summary_line(counts: dict[str, int]) -> str:
    """``summary: received=5 completed=5 ...`` (tests and the demo parse it)."""
    return "summary: " + " ".join(f"{k}={n}" for k, n in counts.items())


def _params_files(args: list[str]) -> list[str]:
    """The ``--params-file`` paths among the ``--ros-args`` of a command line."""
    found, in_ros_args = [], False
    for i, token in enumerate(args):
        if token == "--ros-args":
            in_ros_args = True
        elif token == "--":
            in_ros_args = False
        elif in_ros_args and token == "--params-file" and i + 1 < len(args):
            found.append(args[i + 1])
    return found


def init_ros(args: list[str] | None = None) -> None:
    """``rclpy.init(args=args)``; a missing or unreadable ``--params-file``, or ROS arguments
    rcl cannot parse (a malformed parameter YAML, a bad ``-p``), raise :class:`StartupError`
    with one line, instead of rcl's error log line and traceback (its output is held back
    while it parses and shown only when it succeeds)."""
    for path in _params_files(list(sys.argv if args is None else args)):
        if not os.path.isfile(path):
            raise StartupError(f"--params-file {path}: {'not a file' if os.path.exists(path) else 'no such file'}")
        if not os.access(path, os.R_OK):
            raise StartupError(f"--params-file {path}: not readable")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            rclpy.init(args=args)
        except Exception as err:  # RCLError: "failed to initialize rcl: Couldn't parse params file: ..."
            text = re.sub(r"^failed to initialize rcl:\s*", "", str(err).strip())
            text = re.sub(r",\s*at \S+:\d+", "", text)  # rcl's source locations
            raise StartupError(f"bad ROS arguments: {' '.join(text.split())}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        output = held.read()
    if output:
        os.write(2, output)


def run_managed_node(make_node: Any, name: str, args: list[str] | None = None) -> int:
    """Spin ``make_node()`` until SIGINT/SIGTERM (0), the lifecycle shutdown transition (0:
    the node's ``finalized``), a start-up failure (2, one FATAL line) or the node's ``fatal``
    reason (3). The node has ``autostart``, ``configure_error``, ``fatal`` and
    ``close() -> counters`` (which stops it, abandoning the inference in flight), and may have
    ``finalized`` and ``worker_running()``; with autostart it is configured and activated here.
    A missing or malformed ``--params-file`` is a start-up failure too (:func:`init_ros`).

    When ``close()`` could not stop an inference (one network call outlasting the node's
    wait), the process ends with ``os._exit(status)`` after the summary line, instead of
    letting the interpreter tear down under a thread that is still inside torch (which
    aborts: ``terminate called without an active exception``, status -6)."""
    logger = rclpy.logging.get_logger(name)
    try:
        init_ros(args)
    except StartupError as err:
        logger.fatal(f"cannot start: {err}")
        return EXIT_STARTUP
    executor = SingleThreadedExecutor()  # before the slow start-up, while the context is surely valid
    node = None
    status = 0
    try:
        node = make_node()
        executor.add_node(node)
        if node.autostart:
            for transition in (node.trigger_configure, node.trigger_activate):
                if transition() != TransitionCallbackReturn.SUCCESS:
                    raise StartupError(node.configure_error or f"{transition.__name__} failed")
        while not node.fatal and not getattr(node, "finalized", False):
            executor.spin_once(timeout_sec=0.2)
        if node.fatal:
            logger.fatal(node.fatal)
            status = EXIT_FAILURES
    except StartupError as err:
        logger.fatal(f"cannot start: {err}")
        status = EXIT_STARTUP
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise
        # A signal shut the context down mid-start-up or between start-up and spin: a clean stop.
    finally:
        left_behind = False
        if node is not None:
            print(f"[{name}] {summary_line(node.close())}", file=sys.stderr, flush=True)
            left_behind = bool(getattr(node, "worker_running", lambda: False)())
            try:
                node.destroy_node()
            except Exception:  # the context may already be shut down by the signal handler
                pass
        rclpy.try_shutdown()
    if left_behind:
        print(f"[{name}] the inference in flight did not stop in time: exiting without waiting for it "
              "(its scans are counted as dropped.abandoned)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(status)
    return status
