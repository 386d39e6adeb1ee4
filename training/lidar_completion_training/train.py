"""``lidar-train CONFIG.yaml [--resume] [--set section.key=value ...]``: teacher or distillation run.

The same command runs on a CPU, one GPU or several GPUs / nodes (``trainer.devices``,
``trainer.num_nodes``, ``trainer.strategy: ddp``); the run's YAML decides what is trained.

Exit status: 0 trained and exported, 2 a configuration or checkpoint error (one line), 130
stopped by Ctrl-C (one line says what was saved: the first Ctrl-C ends the run after the
current step and saves a checkpoint, a second stops at once).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected section.key=value, got {text!r}")
    from lidar_completion.config import read_yaml  # YAML scalars, 3e-5 included

    return key, read_yaml(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lidar-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run YAML (see config/training/)")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/last.ckpt; the "
                        "metrics log (<out_dir>/logs/metrics.csv) keeps the steps before it and is appended to")
    parser.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--export-only", action="store_true", help="export <out_dir>/checkpoints/last.ckpt (e.g. of a stopped run) and exit")
    args = parser.parse_args(argv)

    try:
        return _run(args)
    except KeyboardInterrupt:  # where fit() does not handle Ctrl-C itself (imports, configuration, --export-only)
        print("lidar-train: interrupted: nothing was saved", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from .run_config import load_run_config

    try:
        config = load_run_config(args.config, dict(args.overrides))
    except (OSError, ValueError) as err:
        print(f"lidar-train: invalid configuration: {err}", file=sys.stderr)
        return 2
    from lidar_completion.checkpoints import CheckpointError

    from .engine import TrainingInterrupted, export_last, fit

    try:
        if args.export_only:
            export = export_last(config)
            print(f"lidar-train: exported {config.kind} model from its last checkpoint to {export}")
            return 0
        export = fit(config, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, CheckpointError) as err:  # no checkpoint; a corrupt or poisoned one (refused)
        print(f"lidar-train: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"lidar-train: {err}", file=sys.stderr)
        return 130
    print(f"lidar-train: exported {config.kind} model to {export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
