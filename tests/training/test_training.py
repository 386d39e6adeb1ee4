"""Teacher training, Distillation-DPO and resume: real networks on generated data."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lidar_completion.checkpoints import load_model, save_model
from lidar_completion.config import ScanCut
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.diffusion import NoiseSchedule
from lidar_completion_training.dataset import CompletionDataset, PairConfig
from lidar_completion_training.objectives import distillation_iteration, seeded_generator
from lidar_completion_training.run_config import RunConfig, load_run_config
from lidar_completion import minkowski

N_PART, N_FULL = 96, 960


def run_config(root: Path, out: Path, **sections) -> RunConfig:
    values = {
        "kind": "teacher",
        "data": {"root": str(root), "train_sequences": ["00"], "n_part": N_PART, "n_full": N_FULL},
        "model": {"channel_ratio": 0.25},
        "trainer": {"out_dir": str(out), "max_steps": 6, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1, "seed": 7, "accelerator": "cpu", "devices": 1},
    }
    for key, value in sections.items():
        values[key] = values.get(key, {}) | value if isinstance(value, dict) else value
    return RunConfig.from_dict(values)


@pytest.fixture(scope="module")
def pairs(tiny_dataset):
    dataset = CompletionDataset(tiny_dataset, ["01"], PairConfig(cut=ScanCut.for_training(N_PART, N_FULL)))
    items = [dataset[i] for i in range(2)]
    return torch.stack([torch.from_numpy(i["partial"]) for i in items]), torch.stack([torch.from_numpy(i["full"]) for i in items])


def test_one_distillation_dpo_iteration_moves_student_and_aux_only(pairs):
    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25)).eval()
    teacher = copy.deepcopy(model.denoiser).requires_grad_(False)
    aux = [copy.deepcopy(model.denoiser) for _ in range(2)]
    model.encoder.requires_grad_(False)
    frozen_before = {k: v.clone() for k, v in {**model.encoder.state_dict(), **{f"t.{k}": v for k, v in teacher.state_dict().items()}}.items()}
    student_before = [p.detach().clone() for p in model.denoiser.parameters()]
    aux_before = [[p.detach().clone() for p in net.parameters()] for net in aux]
    partial, full = pairs
    optimizers = [torch.optim.SGD([p for net in aux for p in net.parameters()], lr=1e-2), torch.optim.SGD(model.denoiser.parameters(), lr=1e-2)]
    grads: dict[str, list[torch.Tensor]] = {}

    def stepper(name, optimizer, nets):
        def step(loss):
            optimizer.zero_grad()
            loss.backward()
            grads[name] = [torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]) for net in nets]
            optimizer.step()

        return step

    losses = distillation_iteration(
        model, NoiseSchedule(), model.denoiser, teacher, aux, partial, full, seeded_generator(0, 0),
        stepper("aux", optimizers[0], aux), stepper("student", optimizers[1], [model.denoiser]),
    )
    assert {"cd_winner", "cd_loser", "switch_rate"} <= set(losses.logs)
    assert losses.logs["cd_winner"] <= losses.logs["cd_loser"]
    for name in ("aux", "student"):
        for flat in grads[name]:
            assert flat.numel() > 0 and torch.isfinite(flat).all() and flat.abs().sum() > 0, name
    assert any(not torch.equal(a, b) for a, b in zip(student_before, model.denoiser.parameters()))
    for before, net in zip(aux_before, aux):
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    after = {**model.encoder.state_dict(), **{f"t.{k}": v for k, v in teacher.state_dict().items()}}
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before), "teacher or encoder changed"
    assert all(p.grad is None for p in (*teacher.parameters(), *model.encoder.parameters()))


def test_plain_score_distillation_uses_one_sample_and_one_aux(pairs):
    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25)).eval()
    aux = [copy.deepcopy(model.denoiser)]
    partial, full = pairs
    steps = []
    losses = distillation_iteration(
        model, NoiseSchedule(), model.denoiser, copy.deepcopy(model.denoiser), aux, partial, full, seeded_generator(0, 0),
        lambda loss: (loss.backward(), torch.optim.SGD(aux[0].parameters(), lr=1e-2).step(), steps.append("aux")),
        lambda loss: (loss.backward(), steps.append("student")),
        preference=False,
    )
    assert steps == ["aux", "student"]
    assert "cd_sample" in losses.logs and "switch_rate" not in losses.logs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())


def test_aux_steps_update_the_auxiliaries_several_times_per_student_step(pairs):
    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25)).eval()
    aux = [copy.deepcopy(model.denoiser) for _ in range(2)]
    optimizer = torch.optim.SGD([p for net in aux for p in net.parameters()], lr=1e-2)
    partial, full = pairs
    steps, aux_losses = [], []

    def step_aux(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.append("aux")
        aux_losses.append(float(loss))

    distillation_iteration(
        model, NoiseSchedule(), model.denoiser, copy.deepcopy(model.denoiser), aux, partial, full, seeded_generator(0, 0),
        step_aux, lambda loss: (loss.backward(), steps.append("student")), aux_steps=3,
    )
    assert steps == ["aux", "aux", "aux", "student"]
    assert len(set(aux_losses)) == 3, "each auxiliary step draws its own timestep and noise"


def test_regression_term_pulls_the_student_onto_the_teachers_many_step_sample(pairs):
    """DMD's regression term: the same noise through the student (2 steps) and the teacher
    (8 steps); a few student steps on it shrink the paired distance between the two."""
    torch.manual_seed(0)
    model = CompletionModel(ModelConfig(channel_ratio=0.25, sampler="ve", t0=300)).eval()
    teacher = copy.deepcopy(model.denoiser).requires_grad_(False)
    with torch.no_grad():  # a teacher that disagrees with the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    aux = [copy.deepcopy(teacher)]
    optimizer = torch.optim.Adam(model.denoiser.parameters(), lr=1e-3)
    partial, full = pairs

    def step_student(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    distances = [
        distillation_iteration(
            model, NoiseSchedule(), model.denoiser, teacher, aux, partial, full, seeded_generator(0, 0),
            lambda loss: None, step_student, preference=False, student_steps=2,
            regression_weight=100.0, regression_steps=8,
        ).logs["loss_regression"]
        for _ in range(6)
    ]
    assert distances[0] > 0
    assert distances[-1] < 0.8 * distances[0], distances


def test_short_teacher_run_lowers_the_loss(tiny_dataset, tmp_path):
    import csv

    from lidar_completion_training.engine import fit

    config = run_config(tiny_dataset, tmp_path / "teacher", trainer={"max_steps": 60, "lr": 2e-3, "checkpoint_every": 60})
    fit(config, progress=False)
    with open(tmp_path / "teacher" / "logs" / "metrics.csv") as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(losses) == 60
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.8 * first, (first, last)


#: ``lidar-train`` with its training step held at a chosen step: the step's marker file is
#: written, then the run waits to be killed (so the kill never races the end of the run).
HOLD_AT_STEP = r"""
import sys, time
from pathlib import Path
from lidar_completion_training import engine, train

config_path, at, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
original = engine.TeacherModule.training_step

def training_step(self, *args, **kwargs):
    if self.data_step == at:
        marker.write_text(str(at))
        while True:
            time.sleep(1)
    return original(self, *args, **kwargs)

engine.TeacherModule.training_step = training_step
sys.exit(train.main([config_path, "--no-progress"]))
"""


def test_kill_and_resume_ends_on_the_same_step_and_weights(tiny_dataset, tmp_path):
    from lidar_completion_training.engine import fit

    straight = run_config(tiny_dataset, tmp_path / "straight")
    reference = load_model(fit(straight, progress=False)).state_dict()

    crashed = run_config(tiny_dataset, tmp_path / "crashed")
    config_path = tmp_path / "crashed.yaml"
    config_path.write_text(crashed.to_yaml())
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    marker = tmp_path / "held"
    # Held while step 5 trains: the checkpoint of step 4 (every 2 steps) is in place, the run
    # is between checkpoints, and it cannot end before the kill.
    held_at = 5
    # Same thread count as this process (tests/conftest.py): float sums must add up in the same order.
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = tmp_path / "held.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_AT_STEP, str(config_path), str(held_at), str(marker)],
            stdout=output, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the run never reached step {held_at}\n{log.read_text()[-3000:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the held run ended by itself\n{log.read_text()[-3000:]}"
    done_before = torch.load(last, weights_only=True)["data_step"]
    assert done_before == 4, done_before

    logged_before = _logged_steps(tmp_path / "crashed")
    resumed = load_model(fit(crashed, resume=True, progress=False)).state_dict()
    assert torch.load(last, weights_only=True)["data_step"] == straight.trainer.max_steps
    # The metrics log kept what the crashed run wrote for the steps its checkpoint holds
    # (the row of the checkpoint's own last step is written ~1 ms after the checkpoint).
    steps = [s for s, _ in _logged_steps(tmp_path / "crashed")]
    assert len(steps) == len(set(steps)) and set(range(done_before, straight.trainer.max_steps)) <= set(steps)
    assert set(range(done_before - 1)) <= set(steps)
    assert [row for row in logged_before if row[0] < done_before - 1] == \
        [row for row in _logged_steps(tmp_path / "crashed") if row[0] < done_before - 1]
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), (key, (resumed[key] - value).abs().max())


def test_distillation_run_exports_a_student_with_the_teachers_encoder(tiny_dataset, tmp_path):
    from lidar_completion_training.engine import fit

    torch.manual_seed(0)
    teacher = CompletionModel(ModelConfig(channel_ratio=0.25))
    teacher_dir = save_model(teacher, tmp_path / "teacher")
    config = run_config(
        tiny_dataset, tmp_path / "student", kind="distill",
        trainer={"max_steps": 2, "checkpoint_every": 1, "optimizer": "sgd", "lr": 1e-3, "grad_clip": 0.05},
        distill={"teacher": str(teacher_dir), "aux_steps": 2},
    )
    student = load_model(fit(config, progress=False))
    assert student.config.kind == "student" and student.config.default_steps == 1
    # Lightning counts optimizer steps (2 auxiliary + 1 student per batch); the run trains max_steps batches.
    assert torch.load(tmp_path / "student" / "checkpoints" / "last.ckpt", weights_only=True)["data_step"] == 2
    for key, value in teacher.encoder.state_dict().items():
        assert torch.equal(student.encoder.state_dict()[key], value)
    changed = [k for k, v in teacher.denoiser.state_dict().items() if not torch.equal(student.denoiser.state_dict()[k], v)]
    assert changed, "the student did not move away from the teacher"


@pytest.mark.parametrize(
    "override,message",
    [
        ({"trainer": {"lr": -1}}, "trainer.lr"),
        ({"data": {"n_full": 1000, "n_part": 96}}, "data.n_full"),
        ({"distill": {"mode": "magic"}}, "distill.mode"),
        ({"distill": {"aux_steps": 0}}, "distill.aux_steps"),
        ({"distill": {"regression_weight": -1}}, "distill.regression_weight"),
        ({"distill": {"regression_steps": 0}}, "distill.regression_steps"),
        ({"refine": {"source": "scan"}}, "refine.source"),
        ({"refine": {"accuracy_weight": 0}}, "refine.accuracy_weight"),
        ({"kind": "distill"}, "distill.teacher"),
        ({"trainer": {"bogus": 1}}, "trainer.bogus"),
        ({"trainer": {"backend": "torchsparse"}}, "trainer.backend"),
        ({"trainer": {"lr": "fast"}}, "trainer.lr: must be a number"),
        ({"trainer": {"max_steps": 1.5}}, "trainer.max_steps: must be an integer"),
        ({"trainer": {"lr_decay": 0}}, "trainer.lr_decay"),
        ({"trainer": {"lr_decay_every": -1}}, "trainer.lr_decay_every"),
    ],
)
def test_bad_config_values_are_rejected_before_training(tmp_path, override, message):
    values = yaml.safe_load(run_config(tmp_path, tmp_path / "x").to_yaml())
    for key, value in override.items():
        values[key] = values[key] | value if isinstance(value, dict) else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError, match=message):
        load_run_config(path)
    from lidar_completion_training.train import main

    assert main([str(path)]) == 2


@pytest.mark.parametrize("name", ["teacher_lite", "distill_dpo_lite", "distill_sd_lite", "refine_lite"])
def test_shipped_training_configs_are_valid(name):
    """The configs the model card's commands use parse and validate (their model paths point at
    run directories; the shipped models stand in for them here)."""
    root = Path(__file__).resolve().parents[2]
    shipped = root / "src" / "lidar_completion" / "models"
    overrides = {"distill_dpo_lite": {"distill.teacher": str(shipped / "teacher_lite")},
                 "distill_sd_lite": {"distill.teacher": str(shipped / "teacher_lite")},
                 "refine_lite": {"refine.base": str(shipped / "student_lite")}}.get(name, {})
    config = load_run_config(root / "config" / "training" / f"{name}.yaml", overrides)
    assert config.kind == name.split("_")[0]


def test_exponent_learning_rates_from_the_file_and_from_set(tmp_path):
    """``lr: 3e-5`` is a string to YAML 1.1 (PyYAML); it was a TypeError deep in validation."""
    values = yaml.safe_load(run_config(tmp_path, tmp_path / "x").to_yaml())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values).replace("lr: 0.001", "lr: 3e-5"))
    assert "lr: 3e-5" in path.read_text()
    assert load_run_config(path).trainer.lr == 3e-5
    from lidar_completion_training.train import _parse_override

    assert _parse_override("trainer.lr=2e-4") == ("trainer.lr", 2e-4)
    assert load_run_config(path, dict([_parse_override("trainer.lr=2e-4")])).trainer.lr == 2e-4


@pytest.mark.parametrize("source", ["ground_truth", "completion"])
def test_refinement_run_adds_a_refiner_and_keeps_the_base_model(tiny_dataset, tmp_path, source):
    from lidar_completion_training.engine import fit

    torch.manual_seed(0)
    base = CompletionModel(ModelConfig(channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0))
    base_dir = save_model(base, tmp_path / "base")
    config = run_config(tiny_dataset, tmp_path / "refine", kind="refine",
                        trainer={"max_steps": 3, "checkpoint_every": 3, "lr_decay": 0.5, "lr_decay_every": 2},
                        refine={"base": str(base_dir), "source": source})
    refined = load_model(fit(config, progress=False))
    assert refined.refiner is not None and refined.config.refine_channel_ratio == 0.25
    for key, value in base.state_dict().items():
        assert torch.equal(refined.state_dict()[key], value), key
    with open(tmp_path / "refine" / "logs" / "metrics.csv") as handle:
        rows = [row for row in __import__("csv").DictReader(handle) if row.get("train/chamfer")]
    chamfer = [float(row["train/chamfer"]) for row in rows]
    assert len(chamfer) == 3 and all(0 < c < 100 for c in chamfer)
    assert [float(row["train/lr"]) for row in rows] == pytest.approx([1e-3, 1e-3, 5e-4])  # the schedule reaches refinement


def _logged_lr(out: Path) -> dict[int, float]:
    import csv

    with open(out / "logs" / "metrics.csv", newline="") as handle:
        return {int(float(row["step"])): float(row["train/lr"]) for row in csv.DictReader(handle) if row.get("train/lr")}


def test_learning_rate_decays_in_steps_and_resumes_on_its_schedule(tiny_dataset, tmp_path):
    """trainer.lr_decay / lr_decay_every (LiDiff's teacher: x0.5 every 5 epochs): lr * 0.5 **
    (step // 2) here, and a resumed run goes on where the checkpoint's schedule stood."""
    from lidar_completion_training.engine import fit

    schedule = {"lr_decay": 0.5, "lr_decay_every": 2, "checkpoint_every": 2}
    fit(run_config(tiny_dataset, tmp_path / "run", trainer=schedule | {"max_steps": 4}), progress=False)
    fit(run_config(tiny_dataset, tmp_path / "run", trainer=schedule | {"max_steps": 7}), resume=True, progress=False)
    lrs = _logged_lr(tmp_path / "run")
    assert sorted(lrs) == list(range(7))
    assert [lrs[step] for step in range(7)] == pytest.approx([1e-3 * 0.5 ** (step // 2) for step in range(7)])
    # Without the keys the rate stays constant (and is not logged); distillation refuses a schedule.
    fit(run_config(tiny_dataset, tmp_path / "constant", trainer={"max_steps": 2}), progress=False)
    assert _logged_lr(tmp_path / "constant") == {}
    with pytest.raises(ValueError, match="trainer.lr_decay_every"):
        run_config(tiny_dataset, tmp_path / "x", kind="distill", trainer=schedule, distill={"teacher": str(tmp_path)})


def test_refinement_learns_on_the_completions_the_pipeline_makes(tiny_dataset, tmp_path, pairs):
    """``refine.source: completion``: the coarse points are exactly what SceneCompleter (the
    node's pipeline, seed 0) hands its refinement net -- the completion before the free-space
    stage, which runs last -- and a base that has a refiner starts from it."""
    from lidar_completion.completer import SceneCompleter
    from lidar_completion.config import CompletionConfig
    from lidar_completion_training.engine import RefineModule

    torch.manual_seed(0)
    base = CompletionModel(ModelConfig(channel_ratio=0.25, refine_channel_ratio=0.25, kind="student", default_steps=2,
                                       default_guidance=1.0, sampler="ve", t0=300, cut=ScanCut.recorded_before(N_PART, None)))
    base_dir = save_model(base, tmp_path / "base")
    config = run_config(tiny_dataset, tmp_path / "refine", kind="refine", refine={"base": str(base_dir), "source": "completion"})
    module = RefineModule(config)
    for key, value in base.refiner.state_dict().items():
        assert torch.equal(module.model.refiner.state_dict()[key], value), key
    partial = pairs[0]
    coarse = module._completions(partial)
    before_free_space = CompletionConfig.from_dict({"data.free_space_margin": None, "data.completion_only": True})
    expected = SceneCompleter.from_checkpoint(base_dir, before_free_space).complete_batch([p.numpy() for p in partial])
    assert len(coarse) == len(expected) == 2
    for got, want in zip(coarse, expected):
        assert torch.equal(got, torch.from_numpy(want.points))
    assert module.model.refiner.training


@pytest.mark.skipif(not minkowski.available(), reason="MinkowskiEngine not installed (optional)")
def test_teacher_trains_on_minkowski(tiny_dataset, tmp_path):
    """``trainer.backend: minkowski`` trains, and two SGD steps from the same seed land where
    the torch backend's do. Training-mode BatchNorm over a tiny model and scan amplifies
    float32 rounding (per-gradient parity against float64 is checked at full width in
    tests/test_minkowski.py), so the end points are compared to the size of the update."""
    from lidar_completion_training.engine import fit

    weights = {}
    for backend, lr in (("init", 1e-12), ("torch", 1e-3), ("minkowski", 1e-3)):
        config = run_config(tiny_dataset, tmp_path / backend, trainer={
            "max_steps": 2 if lr > 1e-6 else 1, "optimizer": "sgd", "lr": lr,
            "backend": "torch" if backend == "init" else backend})
        weights[backend] = load_model(fit(config, progress=False)).state_dict()
    trained = [k for k, v in weights["init"].items() if v.is_floating_point() and "running" not in k]

    def norm(a: str, b: str) -> float:
        return sum(float((weights[a][k] - weights[b][k]).double().norm()) ** 2 for k in trained) ** 0.5

    update, gap = norm("torch", "init"), norm("minkowski", "torch")
    assert update > 0.1 and norm("minkowski", "init") > 0.1
    assert gap < 0.1 * update, (gap, update)


def _logged_steps(out: Path) -> list[tuple[int, str]]:
    import csv

    with open(out / "logs" / "metrics.csv", newline="") as handle:
        return [(int(float(row["step"])), row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def test_resume_keeps_and_appends_the_metrics_log(tiny_dataset, tmp_path):
    """Issue 15, item 5: Lightning deletes metrics.csv on start; a resumed run keeps the rows
    of the steps its checkpoint holds, drops rows logged after that checkpoint (those steps
    are trained again) and appends its own."""
    import csv

    from lidar_completion_training.engine import fit

    out = tmp_path / "run"
    fit(run_config(tiny_dataset, out, trainer={"max_steps": 4}), progress=False)
    before = _logged_steps(out)
    assert [s for s, _ in before] == [0, 1, 2, 3]
    # A row logged after the last checkpoint, as a crash would leave it: trained again on resume.
    with open(out / "logs" / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames, list(reader)
    stale = dict(rows[-1], step="4", **{"train/loss": "999.0"})
    with open(out / "logs" / "metrics.csv", "a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=header).writerow(stale)

    fit(run_config(tiny_dataset, out, trainer={"max_steps": 6}), resume=True, progress=False)
    after = _logged_steps(out)
    assert [s for s, _ in after] == [0, 1, 2, 3, 4, 5], after
    assert after[:4] == before and "999.0" not in {loss for _, loss in after}


def test_resume_without_a_checkpoint_is_one_line_and_exit_2(tiny_dataset, tmp_path, capsys):
    from lidar_completion_training.train import main

    config = tmp_path / "run.yaml"
    config.write_text(run_config(tiny_dataset, tmp_path / "never_ran").to_yaml())
    assert main([str(config), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    last = tmp_path / "never_ran" / "checkpoints" / "last.ckpt"
    assert err == f"lidar-train: --resume: no checkpoint at {last} (start the run without --resume)"
    assert not (tmp_path / "never_ran").exists()  # nothing built or written
    assert main([str(config), "--export-only"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
