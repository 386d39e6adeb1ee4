"""``lidar-train CONFIG.yaml [--resume] [--set section.key=value ...]``: teacher or distillation run.

The same command runs on a CPU, one GPU or several GPUs / nodes (``trainer.devices``,
``trainer.num_nodes``, ``trainer.strategy: ddp``); the run's YAML decides what is trained.
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

    from .run_config import load_run_config

    try:
        config = load_run_config(args.config, dict(args.overrides))
    except (OSError, ValueError) as err:
        print(f"lidar-train: invalid configuration: {err}", file=sys.stderr)
        return 2
    from .engine import export_last, fit

    try:
        if args.export_only:
            export = export_last(config)
            print(f"lidar-train: exported {config.kind} model from its last checkpoint to {export}")
            return 0
        export = fit(config, resume=args.resume, progress=not args.no_progress)
    except FileNotFoundError as err:  # --resume / --export-only without a checkpoint
        print(f"lidar-train: {err}", file=sys.stderr)
        return 2
    print(f"lidar-train: exported {config.kind} model to {export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
