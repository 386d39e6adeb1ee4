"""The whole job on one machine: bag -> completion node over DDS -> bag, picture and metrics.

    python -m lidar_completion_ros.demo --root out/demo/data --bag out/demo/input_bag --out out/demo

(``scripts/demo.sh`` makes the synthetic sequence, its ground-truth map and the bag first,
then calls this.) Starts three real processes -- the completion node, ``bag_record`` on
``points_completed`` and ``bag_replay`` of the bag in lock-step with the node -- and watches
the node's ``~/debug/timings`` for per-frame latency. Then the training package's
``lidar-evaluate --completed-bag`` (run as a command: this package never imports the training
package) scores every completed frame against the sequence's ground truth (the input scan is
scored too, as the baseline) and renders input / completion / ground truth of one frame to
``comparison.png``; the demo prints a table with the node's timings beside the metrics and
writes ``metrics.json`` and ``frames.csv``. Without the training package it says so and
prints the timings alone.

Uses the shipped student (``lidar_completion/models/student_lite``); without it, a random
tiny model stands in, with a loud warning: the pipeline runs, the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lidar_completion.children import ChildProcess, parameter_args

REPO = Path(__file__).resolve().parents[4]
PROG = "demo"


def _say(text: str) -> None:
    print(f"[{PROG}] {text}", flush=True)


def _warn_loudly(text: str) -> None:
    bar = "!" * 100
    print(f"\n{bar}\n!! WARNING: {text}\n{bar}\n", file=sys.stderr, flush=True)


def _model(out: Path) -> tuple[Path, dict[str, Any], bool]:
    """(checkpoint, parameter overrides, trained?)."""
    from lidar_completion.checkpoints import SHIPPED_MODELS

    shipped = SHIPPED_MODELS / "student_lite"
    if (shipped / "config.json").is_file():  # with its refinement net: the product's densest, best-scoring output
        return shipped, {"refine": True}, True
    _warn_loudly(f"no shipped student at {shipped}: using a RANDOM tiny model instead.\n"
                 "!! The pipeline runs end to end, but the completions and metrics below are meaningless.")
    import torch

    from lidar_completion.checkpoints import save_model
    from lidar_completion.model import CompletionModel, ModelConfig

    torch.manual_seed(0)
    path = save_model(CompletionModel(ModelConfig(channel_ratio=0.25, description="random demo stand-in")),
                      out / "random_tiny_model")
    return path, {"sampling.steps": 1, "sampling.guidance": 1.0}, False


def run_pipeline(bag: Path, out: Path, checkpoint: Path, overrides: dict[str, Any], n_scans: int,
                 domain_id: int, params_file: Path) -> tuple[dict[int, dict[str, float]], dict[str, int], Path]:
    """Node + recorder + lock-step replay; returns per-stamp timings, node counters, output bag."""
    from diagnostic_msgs.msg import DiagnosticArray

    from lidar_completion_ros.messages import stamp_ns
    from lidar_completion_ros.runtime import PrivateNode

    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), PYTHONUNBUFFERED="1")
    env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(REPO / "config" / "fastdds_large_data.xml"))
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "FASTDDS_DEFAULT_PROFILES_FILE")})
    py = sys.executable
    params = {"checkpoint": str(checkpoint), "qos.input.reliability": "reliable", "qos.input.depth": 10,
              "diagnostics.period": 0.5, **overrides}
    node = ChildProcess([py, "-m", "lidar_completion_ros.node", "--ros-args", "--params-file", str(params_file),
                         *parameter_args(params)], env, "completion_node", log=out / "node.log")
    completed_bag = out / "completed_bag"
    monitor = PrivateNode("demo_monitor", domain_id)
    timings: dict[int, dict[str, float]] = {}
    subscribers = [0]

    def on_timings(msg: DiagnosticArray) -> None:
        timings[stamp_ns(msg.header)] = {kv.key: float(kv.value) for kv in msg.status[0].values}

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            for kv in status.values:
                if status.name.startswith("completion_node: ") and kv.key == "output_subscribers":
                    subscribers[0] = int(kv.value)

    monitor.node.create_subscription(DiagnosticArray, "/completion_node/debug/timings", on_timings, 50)
    monitor.node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 50)
    spin = monitor.spin_until

    recorder = replay = None
    try:
        _say("starting the completion node (model load + warm-up inference) ...")
        if node.wait_for(r"ready: ", 300) is None:
            raise RuntimeError(f"the node did not start; see {node.log}:\n{node.tail(15)}")
        recorder = ChildProcess([py, "-m", "lidar_completion_ros.bag_record", "--topic", "points_completed", "--out",
                                 str(completed_bag), "--count", str(n_scans), "--timeout", "900"],
                                env, "bag_record", log=out / "bag_record.log")
        if not spin(lambda: subscribers[0] >= 1, 60):
            raise RuntimeError("the node never saw the recorder subscribe")
        _say(f"replaying {bag} through the node over DDS (lock-step: each scan waits for its completion) ...")
        replay = ChildProcess([py, "-m", "lidar_completion_ros.bag_replay", str(bag), "--wait-for", "points_completed",
                               "--wait-timeout", "300"], env, "bag_replay", log=out / "bag_replay.log")
        spin(lambda: replay.returncode is not None, 1800)
        spin(lambda: recorder.returncode is not None and len(timings) >= n_scans, 30)
    finally:
        for child in (replay, recorder):
            if child is not None:
                child.interrupt(60)
        node_code = node.interrupt(60)
        monitor.close()
    match = re.search(r"summary: (.*)", node.output)
    counters = {k: int(v) for k, v in (i.split("=") for i in match.group(1).split())} if match else {}
    if node_code != 0:
        _say(f"warning: the node exited with status {node_code}; see {node.log}")
    return timings, counters, completed_bag


def evaluate_command() -> list[str] | None:
    """The training package's ``lidar-evaluate`` (this interpreter's first), or None when it is not installed.

    The ROS package never imports the training package (the vehicle image has neither
    Lightning nor POT): scoring runs as that command, in its own process."""
    found = shutil.which("lidar-evaluate", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return [found] if found else None


def score(args: argparse.Namespace, completed_bag: Path, max_range: float, note: str) -> list[dict[str, Any]] | None:
    """Per-frame metrics of the completed bag from ``lidar-evaluate --completed-bag`` (which also draws
    ``comparison.png``); None, said plainly, when the training package is not installed."""
    command = evaluate_command()
    if command is None:
        _say("no metrics: scoring needs the training package's `lidar-evaluate` (pip install -e training), which is "
             "not installed here; the table below has the node's timings only")
        return None
    out = args.out / "evaluation"
    cmd = [*command, "--root", str(args.root), "--sequences", args.sequence, "--completed-bag", str(completed_bag),
           "--input-bag", str(args.bag), "--max-range", f"{max_range:g}", "--no-emd", "--out", str(out),
           "--picture", str(args.out / "comparison.png"), "--picture-note", note]
    _say(f"scoring against the ground truth: {' '.join(cmd)}")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (args.out / "evaluate.log").write_text(done.stdout)
    if done.returncode != 0:
        _say(f"warning: lidar-evaluate exited with status {done.returncode}; see {args.out / 'evaluate.log'}:\n"
             + "\n".join(done.stdout.splitlines()[-10:]))
        return None
    return json.loads((out / "frames.json").read_text())


def frame_rows(outputs: list, in_stamps: list[int], timings: dict[int, dict[str, float]],
               scored: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One row per completed scan of an input stamp: the node's timings, then its metrics when ``scored``
    (a scan ``lidar-evaluate`` did not score is left out)."""
    metrics = {round(f["stamp"] * 1e9): f for f in scored or []}
    frames = {stamp: i for i, stamp in enumerate(in_stamps)}
    rows = []
    for cloud in outputs:
        if cloud.stamp_ns not in frames:
            continue
        t = timings.get(cloud.stamp_ns, {})
        row = {"frame": frames[cloud.stamp_ns], "stamp": cloud.stamp_ns / 1e9,
               "input_points": int(t.get("input_points", 0)), "output_points": len(cloud.xyz),
               **{k: t.get(k, float("nan")) for k in ("processing_ms", "model_ms", "overhead_ms")}}
        if scored is not None:
            if cloud.stamp_ns not in metrics:
                continue
            row |= {k: v for k, v in metrics[cloud.stamp_ns].items() if k not in row}
        rows.append(row)
    return rows


# (title, key, width, decimals); groups are separated by " | ". "in" = the input scan vs ground truth,
# "in@out" = the input farthest-point sampled to the completion's point count (same budget).
TIMING_COLUMNS = [("frame", "frame", 5, 0), ("in pts", "input_points", 7, 0), ("out pts", "output_points", 7, 0),
                  ("node ms", "processing_ms", 8, 0), ("model ms", "model_ms", 8, 0), ("ovh ms", "overhead_ms", 6, 2)]
METRIC_COLUMNS = [[("CD in", "input_cd", 6, 3), ("in@out", "budget_cd", 6, 3), ("CD out", "completion_cd", 6, 3)],
                  [("F in", "input_fscore", 5, 3), ("F out", "completion_fscore", 5, 3)],
                  [("JSD-BEV in", "input_jsd_bev", 10, 3), ("out", "completion_jsd_bev", 5, 3)],
                  [("IoU.5 in", "input_iou_0.5", 8, 3), ("out", "completion_iou_0.5", 5, 3)]]


def table(rows: list[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """The per-frame table (metric columns when the rows have them) and the mean of every number."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if isinstance(rows[0][k], (int, float))}
    groups = [TIMING_COLUMNS] + [g for g in METRIC_COLUMNS if all(key in rows[0] for _, key, _, _ in g)]

    header = " | ".join(" ".join(f"{title:>{width}}" for title, _, width, _ in group) for group in groups)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(" | ".join(" ".join(f"{row[key]:>{w}.{d}f}" for _, key, w, d in group) for group in groups))
    lines.append("-" * len(header))
    lines.append(" | ".join(" ".join("mean".rjust(w) if key == "frame" else f"{mean[key]:>{w}.{d}f}"
                                     for _, key, w, d in group) for group in groups))
    return "\n".join(lines), mean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lidar_completion_ros.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="SemanticKITTI-layout root with the map built")
    parser.add_argument("--sequence", default="00")
    parser.add_argument("--bag", type=Path, required=True, help="bag of the sequence (lidar-kitti-to-bag)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--params-file", type=Path, default=REPO / "config" / "completion_node.yaml",
                        help="node parameter YAML (default: the repository's config/completion_node.yaml)")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: random 1..200)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)

    from lidar_completion.bags import read_clouds

    inputs = list(read_clouds(args.bag))
    checkpoint, overrides, trained = _model(args.out)
    domain = args.domain_id or int.from_bytes(os.urandom(1), "little") % 200 + 1
    _say(f"model {checkpoint}{'' if trained else ' (RANDOM stand-in)'}; {len(inputs)} scans; ROS_DOMAIN_ID={domain}")
    timings, counters, completed_bag = run_pipeline(args.bag, args.out, checkpoint, overrides, len(inputs), domain,
                                                  args.params_file)
    outputs = list(read_clouds(completed_bag)) if completed_bag.exists() else []
    _say(f"node counters: {counters}")
    if not outputs:
        _say("no completed scan came back; see the logs in " + str(args.out))
        return 1

    # Score at the radius the model completes (a lite model is trained on, and capped to, 20 m).
    from lidar_completion.checkpoints import load_model
    from lidar_completion.config import UNRECORDED_RADIUS

    max_range = min(UNRECORDED_RADIUS, load_model(checkpoint).config.max_range or UNRECORDED_RADIUS)
    scored = score(args, completed_bag, max_range, "" if trained else "[RANDOM MODEL]")
    rows = frame_rows(outputs, [c.stamp_ns for c in inputs], timings, scored)
    if not rows:
        _say("no completed scan was scored; see " + str(args.out / "evaluate.log"))
        return 1
    text, mean = table(rows)
    print("\nper frame (times in ms" + ("; CD in metres, F-score at 5-10 cm, IoU on 0.5 m voxels; 'in' = the input "
                                       "scan vs ground truth)" if scored is not None else ")"))
    print(text)
    picture = args.out / "comparison.png"
    if scored is None:  # no ground truth without the training package: input and completion only
        from lidar_completion.render import render_comparison

        pick = rows[len(rows) // 2]
        cloud = next(c for c in outputs if c.stamp_ns == round(pick["stamp"] * 1e9))
        render_comparison([("input scan", inputs[pick["frame"]].xyz), ("completion (via ROS node)", cloud.xyz)], picture,
                          max_range=max_range, title=f"frame {pick['frame']}{'' if trained else '  [RANDOM MODEL]'}")
    summary = {"checkpoint": str(checkpoint), "trained_model": trained, "scans": len(inputs), "scored": scored is not None,
               "completed": len(outputs), "node_counters": counters, "frames": rows, "mean": mean,
               "wall_s": time.monotonic() - start}
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    keys = list(rows[0])
    (args.out / "frames.csv").write_text(
        "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    cd = (f"; mean CD {mean['input_cd']:.3f} m (input, {mean['input_points']:,.0f} points; FPS'd to the "
          f"completion's {mean['output_points']:,.0f}: {mean['budget_cd']:.3f} m) -> {mean['completion_cd']:.3f} m (completion)"
          if scored is not None else "; not scored (no training package)")
    print(f"\ncompleted {len(outputs)}/{len(inputs)} scans (node: {counters.get('dropped', '?')} dropped, "
          f"{counters.get('rejected', '?')} rejected){cd}")
    print(f"picture: {picture}\nmetrics: {args.out / 'metrics.json'}, {args.out / 'frames.csv'}\n"
          f"bags:    {args.bag} -> {completed_bag}\nlogs:    {args.out}/node.log, bag_replay.log, bag_record.log"
          + (", evaluate.log" if scored is not None else ""))
    if not trained:
        _warn_loudly("these numbers come from a RANDOM model (no shipped student found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
