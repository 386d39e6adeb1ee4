"""Distillation-DPO preferences: candidates, pairing, gap weights, the reward row and the
gradient-share measurement, on real networks and generated data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from lidar_completion.diffusion import NoiseSchedule
from lidar_completion.config import ScanCut
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion_training.dataset import CompletionDataset, PairConfig
from lidar_completion_training.metrics import chamfer_distance
from lidar_completion_training.objectives import (
    Preference,
    differentiable_chamfer,
    distillation_iteration,
    preference_pairs,
    preference_scores,
    seeded_generator,
)
from lidar_completion_training.run_config import RunConfig, load_run_config

N_PART, N_FULL = 96, 960


@pytest.fixture(scope="module")
def pairs(tiny_dataset):
    dataset = CompletionDataset(tiny_dataset, ["01"], PairConfig(cut=ScanCut.for_training(N_PART, N_FULL)))
    items = [dataset[i] for i in range(2)]
    return torch.stack([torch.from_numpy(i["partial"]) for i in items]), torch.stack([torch.from_numpy(i["full"]) for i in items])


# Two scans (columns), four candidates (rows); lower is better.
SCORES = torch.tensor([[0.30, 0.10], [0.10, 0.40], [0.20, 0.20], [0.40, 0.30]], dtype=torch.float64)


def test_best_worst_pairs_the_lowest_and_highest_score_of_each_scan():
    assert preference_pairs(SCORES, "best_worst") == [[(1, 3, 1.0)], [(0, 1, 1.0)]]


def test_listwise_pairs_every_ranked_pair_with_best_against_worst_first():
    scan_pairs = preference_pairs(SCORES, "listwise")[0]
    assert scan_pairs[0] == (1, 3, 1.0) and len(scan_pairs) == 6
    for winner, loser, _ in scan_pairs:
        assert SCORES[winner, 0] < SCORES[loser, 0]
    assert len({(w, lose) for w, lose, _ in scan_pairs}) == 6


def test_sweet_spot_rejects_the_candidate_nearest_two_sigma_below_the_mean_reward():
    # Eight candidates: one far outlier, the rest close; 2 sigma above the mean score lands
    # near the outlier only when it is far enough out; here it picks the one closest to it.
    column = torch.tensor([0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.30], dtype=torch.float64)
    target = float(column.mean() + 2 * column.std(unbiased=False))
    (winner, loser, _), = preference_pairs(column[:, None], "sweet_spot")[0]
    assert winner == 0
    assert loser == int(torch.argmin((column - target).abs()))


def test_gap_scale_makes_near_ties_count_little():
    near_tie = torch.tensor([[0.100], [0.101]], dtype=torch.float64)
    clear = torch.tensor([[0.100], [0.150]], dtype=torch.float64)
    weak = preference_pairs(near_tie, "best_worst", gap_scale=0.05)[0][0][2]
    strong = preference_pairs(clear, "best_worst", gap_scale=0.05)[0][0][2]
    assert weak == pytest.approx(0.001 / 0.1005 / 0.05) and strong == 1.0  # relative gap 1 % of a 5 % scale
    assert preference_pairs(near_tie, "best_worst")[0][0][2] == 1.0  # gap_scale 0: every pair weighs 1


def test_metrics_score_lower_is_better_and_cd_matches_the_evaluation_metric():
    rng = np.random.default_rng(0)
    gt = torch.from_numpy(rng.uniform(-5, 5, (1, 500, 3)))
    good, bad = gt + 0.01 * torch.from_numpy(rng.normal(size=gt.shape)), gt + 0.5 * torch.from_numpy(rng.normal(size=gt.shape))
    for metric in ("cd", "cd_f", "jsd_bev"):
        scores = preference_scores([good, bad], gt, metric, 0.8)
        assert scores.shape == (2, 1) and scores[0, 0] < scores[1, 0], metric
    assert preference_scores([bad], gt, "cd")[0, 0] == pytest.approx(chamfer_distance(bad[0].numpy(), gt[0].numpy()))
    assert float(differentiable_chamfer(bad.float(), gt.float())) == pytest.approx(chamfer_distance(bad[0].numpy(), gt[0].numpy()), rel=1e-4)


def test_differentiable_chamfer_moves_a_sample_towards_the_ground_truth():
    gt = torch.rand(1, 200, 3)
    sample = (gt + 0.3).requires_grad_(True)
    differentiable_chamfer(sample, gt).backward()
    with torch.no_grad():
        moved = sample - 0.05 * sample.grad * sample.shape[1]  # a small step down the gradient
    assert float(differentiable_chamfer(moved, gt)) < float(differentiable_chamfer(sample.detach(), gt))


def _iteration(pairs, **kwargs):
    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25)).eval()
    teacher = copy.deepcopy(model.denoiser).requires_grad_(False)
    aux = [copy.deepcopy(model.denoiser) for _ in range(2 if kwargs.get("preference", True) else 1)]
    model.encoder.requires_grad_(False)
    student_before = [p.detach().clone() for p in model.denoiser.parameters()]
    aux_before = [[p.detach().clone() for p in net.parameters()] for net in aux]
    optimizers = [torch.optim.SGD([p for net in aux for p in net.parameters()], lr=1e-2), torch.optim.SGD(model.denoiser.parameters(), lr=1e-2)]

    def stepper(optimizer):
        def step(loss):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step

    partial, full = pairs
    losses = distillation_iteration(
        model, NoiseSchedule(), model.denoiser, teacher, aux, partial, full, seeded_generator(0, 0),
        stepper(optimizers[0]), stepper(optimizers[1]), **kwargs,
    )
    moved = any(not torch.equal(a, b) for a, b in zip(student_before, model.denoiser.parameters()))
    aux_moved = [any(not torch.equal(a, b) for a, b in zip(before, net.parameters())) for before, net in zip(aux_before, aux)]
    return losses.logs, moved, aux_moved


@pytest.mark.parametrize("kind", ["best_worst", "sweet_spot", "listwise"])
def test_ranked_preferences_train_the_student_and_both_auxiliaries(pairs, kind):
    pairing = Preference(kind, candidates=4, start_scales=(1.0, 1.1), metric="cd_f", metric_lambda=0.8, gap_scale=0.02)
    logs, moved, aux_moved = _iteration(pairs, pairing=pairing, measure_gradients=True)
    assert moved and all(aux_moved)
    wins = [logs[f"win/c{k}"] for k in range(4)]
    assert sum(wins) == pytest.approx(1.0) and "switch_rate" not in logs
    assert logs["cd_winner"] <= logs["cd_loser"] and 0 < logs["pair_weight"] <= 1
    shares = {k: v for k, v in logs.items() if k.startswith("grad_share/")}
    assert set(shares) == {"grad_share/distillation", "grad_share/preference"}
    assert sum(shares.values()) == pytest.approx(1.0) and all(v > 0 for v in shares.values())


def test_published_pair_logs_the_switch_rate_and_the_term_shares(pairs):
    logs, moved, aux_moved = _iteration(pairs, regression_weight=1.0, regression_steps=2, measure_gradients=True)
    assert moved and all(aux_moved) and 0 <= logs["switch_rate"] <= 1
    assert {"grad_share/distillation", "grad_share/preference", "grad_share/regression"} <= set(logs)


def test_reward_row_adds_the_differentiable_chamfer_distance(pairs):
    logs, moved, _ = _iteration(pairs, preference=False, reward_weight=1.0, measure_gradients=True)
    assert moved and logs["loss_reward"] > 0
    assert logs["grad_norm/reward"] > 0 and "grad_share/preference" not in logs


def test_measuring_gradients_does_not_change_the_update(pairs):
    pairing = Preference("best_worst", candidates=3)
    torch.manual_seed(0)
    plain = _iteration(pairs, pairing=pairing)[0]
    measured = _iteration(pairs, pairing=pairing, measure_gradients=True)[0]
    assert plain["loss_generator"] == measured["loss_generator"] and plain["loss_aux"] == measured["loss_aux"]


@pytest.mark.parametrize(
    "override,message",
    [
        ({"preference": "magic"}, "distill.preference"),
        ({"preference": "listwise", "candidates": 1}, "distill.preference"),
        ({"preference": "published", "candidates": 4}, "distill.preference"),
        ({"metric": "iou"}, "distill.preference"),
        ({"start_scales": [1.0, 0.0]}, "distill.preference"),
        ({"gap_scale": -1}, "distill.gap_scale"),
        ({"reward_weight": -1}, "distill.reward_weight"),
        ({"metric_lambda": -1}, "distill.metric_lambda"),
    ],
)
def test_bad_preference_settings_are_rejected_naming_the_key(tmp_path, override, message):
    values = {"data": {"root": str(tmp_path)}, "distill": override}
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(values)


def test_preference_settings_round_trip_through_the_run_yaml(tmp_path):
    distill = {"preference": "listwise", "candidates": 4, "start_scales": [1.0, 1.1], "metric": "cd_f", "metric_lambda": 0.8, "gap_scale": 0.02}
    config = RunConfig.from_dict({"data": {"root": str(tmp_path)}, "distill": distill})
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml())
    again = load_run_config(path)
    assert again.distill.pairing() == Preference("listwise", 4, (1.0, 1.1), "cd_f", 0.8, 0.02)
    assert yaml.safe_load(config.to_yaml())["distill"]["start_scales"] == [1.0, 1.1]
