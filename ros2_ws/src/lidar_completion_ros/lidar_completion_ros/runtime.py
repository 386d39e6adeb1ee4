"""Running a managed node as an executable: autostart, exit statuses, clean shutdown."""

from __future__ import annotations

import sys
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn

from .parameters import StartupError

__all__ = ["EXIT_FAILURES", "EXIT_STARTUP", "run_managed_node", "summary_line"]

EXIT_STARTUP, EXIT_FAILURES = 2, 3


def summary_line(counts: dict[str, int]) -> str:
    """``summary: received=5 completed=5 ...`` (tests and the demo parse it)."""
    return "summary: " + " ".join(f"{k}={n}" for k, n in counts.items())


def run_managed_node(make_node: Any, name: str, args: list[str] | None = None) -> int:
    """Spin ``make_node()`` until SIGINT/SIGTERM (0), a start-up failure (2, one FATAL line)
    or the node's ``fatal`` reason (3). The node has ``autostart``, ``configure_error``,
    ``fatal`` and ``close() -> counters``; with autostart it is configured and activated here."""
    rclpy.init(args=args)
    logger = rclpy.logging.get_logger(name)
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
        while not node.fatal:
            executor.spin_once(timeout_sec=0.2)
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
        if node is not None:
            print(f"[{name}] {summary_line(node.close())}", file=sys.stderr, flush=True)
            try:
                node.destroy_node()
            except Exception:  # the context may already be shut down by the signal handler
                pass
        rclpy.try_shutdown()
    return status
