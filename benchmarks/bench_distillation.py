"""Wall time of one distillation iteration per preference (issue 24's cost target: a richer
preference within 1.5x the published pair). Kinds run interleaved on the same scans, so a
shared machine's load falls on all of them alike; prints a table with the ratio to the pair.

    python benchmarks/bench_distillation.py --root data/synthetic [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from lidar_completion.checkpoints import SHIPPED_MODELS, load_model
from lidar_completion.diffusion import NoiseSchedule
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.config import PRESETS, UNRECORDED_RADIUS, ScanCut
from lidar_completion_training.dataset import CompletionDataset, PairConfig
from lidar_completion_training.objectives import Preference, distillation_iteration, seeded_generator

KINDS = {
    "plain score distillation": dict(preference=False),
    "published pair": dict(),
    "best_worst, 4 candidates": dict(pairing=Preference("best_worst", 4, gap_scale=0.02)),
    "listwise, 4 candidates, cd_f": dict(pairing=Preference("listwise", 4, metric="cd_f", metric_lambda=0.8, gap_scale=0.02)),
    "plain + direct reward": dict(preference=False, reward_weight=1.0),
    "published pair + direct reward (student_lite)": dict(reward_weight=1.0),
    "best_worst, 4 candidates + direct reward": dict(pairing=Preference("best_worst", 4, gap_scale=0.02), reward_weight=1.0),
    "best of 4, winner only + direct reward": dict(pairing=Preference("best_worst", 4, gap_scale=0.02), reward_weight=1.0,
                                                   loser_weight=0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="SemanticKITTI-layout root with maps (lidar-synth + lidar-build-maps)")
    parser.add_argument("--sequence", default="00")
    parser.add_argument("--teacher", default=str(SHIPPED_MODELS / "teacher_lite"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_model(args.teacher)
    # The student as the lite recipe starts it: the teacher's weights, 2 VE steps from t0 300.
    model = CompletionModel(ModelConfig(**(teacher.config.__dict__ | {"t0": 300})))
    model.load_state_dict(teacher.state_dict())
    model.eval().encoder.requires_grad_(False)
    frozen = copy.deepcopy(teacher.denoiser).requires_grad_(False).eval()
    aux = [copy.deepcopy(teacher.denoiser).eval() for _ in range(2)]
    optimizers = [torch.optim.Adam([p for a in aux for p in a.parameters()], lr=1e-4), torch.optim.Adam(model.denoiser.parameters(), lr=1e-5)]

    def stepper(optimizer: torch.optim.Optimizer):
        def step(loss: torch.Tensor) -> None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    mc = model.config
    pairs = CompletionDataset(args.root, [args.sequence], PairConfig(
        cut=ScanCut.for_training(mc.n_part or PRESETS["lite"]["n_part"], 10 * (mc.n_part or PRESETS["lite"]["n_part"]),
                                 max_range=mc.max_range or UNRECORDED_RADIUS),
        surface_cells=mc.surface_cells))
    times: dict[str, list[float]] = {name: [] for name in KINDS}
    for rep in range(args.repeats):
        item = pairs[rep]
        partial, full = torch.from_numpy(item["partial"])[None], torch.from_numpy(item["full"])[None]
        for name, kind in KINDS.items():
            start = time.perf_counter()
            distillation_iteration(model, NoiseSchedule.of(mc), model.denoiser, frozen, aux, partial, full, seeded_generator(0, rep),
                                   stepper(optimizers[0]), stepper(optimizers[1]), student_steps=2, regression_weight=10.0,
                                   regression_steps=4, max_timestep=600, **({"loser_weight": 0.5} | kind))
            times[name].append(time.perf_counter() - start)
    base = float(np.median(times["published pair"]))
    print(f"| kind | s / iteration (median of {args.repeats}, {args.threads} threads) | x published pair |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {np.median(values):.2f} | {np.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
