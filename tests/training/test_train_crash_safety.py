"""``lidar-train`` around crashes and Ctrl-C (issue 28, items 2-4): after any kill and resume
the metrics log has every step's row and every diagnostics row exactly once; Ctrl-C saves a
checkpoint (or says that nothing was saved) and exits 130; a poisoned checkpoint given to
``--resume`` is refused in one line."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lidar_completion.checkpoints import load_model

from .test_training import run_config

#: Checkpoints every 2 steps, diagnostics every 4: the log must end with train rows 0..7 and
#: diag rows 4 and 8, each once.
CRASH_RUN = {"max_steps": 8, "checkpoint_every": 2, "diagnose_every": 4}

#: Runs a training in this process and ends it with os._exit (as kill -9: nothing flushed,
#: no clean-up) at a chosen point of a chosen step.
CRASH = r"""
import os, sys
from lidar_completion_training import engine
from lidar_completion_training.run_config import load_run_config

config_path, where, at = sys.argv[1], sys.argv[2], int(sys.argv[3])

def patch(cls, name, before):
    original = getattr(cls, name)
    def hook(self, *args, **kwargs):
        module = args[1] if name.startswith("on_") else self  # callbacks get (trainer, pl_module, ...)
        if before and module.data_step == at:
            os._exit(9)
        result = original(self, *args, **kwargs)
        if not before and module.data_step == at:
            os._exit(9)
        return result
    setattr(cls, name, hook)

if where == "training_step":  # while step `at` trains (data_step == at)
    patch(engine.TeacherModule, "training_step", before=True)
elif where == "diagnostics":  # during the diagnostics after step `at` - 1
    patch(engine.Diagnostics, "on_train_batch_end", before=True)
elif where == "after_diagnostics":  # diagnostics logged, the step's own row not yet
    patch(engine.Diagnostics, "on_train_batch_end", before=False)
elif where == "after_checkpoint":  # the checkpoint of step `at` written, nothing else
    patch(engine.AtomicCheckpoint, "on_train_batch_end", before=False)
engine.fit(load_run_config(config_path), progress=False)
sys.exit(3)  # not killed
"""


def _rows(out: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train/loss) of the training rows and (step, diag/cd_4steps) of the diagnostics rows."""
    with open(out / "logs" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [(int(float(r["step"])), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    diag = [(int(float(r["step"])), float(r["diag/cd_4steps"])) for r in rows if r.get("diag/cd_4steps")]
    return train, diag


@pytest.fixture(scope="module")
def straight_rows(tiny_dataset, tmp_path_factory):
    from lidar_completion_training.engine import fit

    out = tmp_path_factory.mktemp("straight") / "run"
    fit(run_config(tiny_dataset, out, data={"val_sequences": ["01"]}, trainer=CRASH_RUN), progress=False)
    return _rows(out)


@pytest.mark.parametrize("where, at", [
    ("training_step", 5),  # between checkpoints (issue: kill -9 at step 45 of every-10 / diagnose-20)
    ("after_checkpoint", 4),  # the checkpoint written; its step's diagnostics and row not yet
    ("after_diagnostics", 4),  # the diagnostics row written; the step's own row not yet
    ("diagnostics", 8),  # during the last diagnostics of the run (issue: "No training batches")
])
def test_kill_and_resume_logs_every_row_exactly_once(tiny_dataset, tmp_path, straight_rows, where, at):
    from lidar_completion_training.engine import fit

    out = tmp_path / "run"
    config = run_config(tiny_dataset, out, data={"val_sequences": ["01"]}, trainer=CRASH_RUN)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(config.to_yaml())
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float sums as this process
    done = subprocess.run([sys.executable, "-c", CRASH, str(config_path), where, str(at)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 9, done.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()

    fit(config, resume=True, progress=False)
    train, diag = _rows(out)
    assert [s for s, _ in train] == list(range(8)), train
    assert [s for s, _ in diag] == [4, 8], diag
    # The rows kept from the killed run and the rows of the resumed one are those of a run never killed.
    assert [v for _, v in train] == pytest.approx([v for _, v in straight_rows[0]], rel=1e-5)
    assert [v for _, v in diag] == pytest.approx([v for _, v in straight_rows[1]], rel=1e-5)


def _ctrl_c_at(monkeypatch, step: int, times: int) -> None:
    """SIGINT to this process ``times`` times while step ``step`` trains (a real signal, as Ctrl-C)."""
    from lidar_completion_training import engine

    original = engine.TeacherModule.training_step

    def training_step(self, *args, **kwargs):
        if self.data_step == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine.TeacherModule, "training_step", training_step)


def test_ctrl_c_before_the_first_checkpoint_saves_one_and_exits_130(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Issue 28, item 3: Ctrl-C ends the run after the current step with a checkpoint (and its
    rows in the log), says so in one line and exits 130; --resume continues as if never stopped."""
    from lidar_completion_training.engine import fit
    from lidar_completion_training.train import main

    out = tmp_path / "run"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(run_config(tiny_dataset, out, trainer={"max_steps": 8, "checkpoint_every": 100}).to_yaml())
    _ctrl_c_at(monkeypatch, step=2, times=1)
    previous = signal.getsignal(signal.SIGINT)
    assert main([str(config_path), "--no-progress"]) == 130
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is this run's only
    last = out / "checkpoints" / "last.ckpt"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"lidar-train: interrupted at step 3: checkpoint of step 3 saved to {last} "
                       "(continue with --resume; --export-only exports it)"), err
    assert "Traceback" not in "\n".join(err)
    assert torch.load(last, weights_only=True)["data_step"] == 3
    assert [s for s, _ in _rows(out)[0]] == [0, 1, 2]
    assert not (out / "export").exists()

    monkeypatch.undo()
    assert main([str(config_path), "--resume", "--no-progress", "--set", "trainer.max_steps=5"]) == 0
    assert [s for s, _ in _rows(out)[0]] == [0, 1, 2, 3, 4]
    resumed = load_model(out / "export").state_dict()
    straight = load_model(fit(run_config(tiny_dataset, tmp_path / "straight", trainer={"max_steps": 5}),
                              progress=False)).state_dict()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_second_ctrl_c_stops_at_once_and_says_nothing_was_saved(tiny_dataset, tmp_path, capsys, monkeypatch):
    from lidar_completion_training.train import main

    out = tmp_path / "run"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(run_config(tiny_dataset, out, trainer={"max_steps": 8, "checkpoint_every": 100}).to_yaml())
    _ctrl_c_at(monkeypatch, step=2, times=2)
    assert main([str(config_path), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lidar-train: stopped at once at step 2: nothing was saved (no checkpoint yet)", err
    assert not (out / "checkpoints" / "last.ckpt").exists()


class _Touch:
    """Pickled, it would create a file when loaded."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_poisoned_checkpoint_is_refused_in_one_line_and_exit_2(tiny_dataset, tmp_path, capsys):
    """Issue 28, item 4: the project's own refusal, not torch's advice to load it unsafely."""
    from lidar_completion_training.train import main

    out = tmp_path / "run"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(run_config(tiny_dataset, out).to_yaml())
    last = out / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"data_step": 2, "state_dict": {"w": torch.zeros(2)}, "extra": _Touch(marker)}, last)
    for flag in ("--resume", "--export-only"):
        assert main([str(config_path), flag, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "weights_only" not in err, err
        assert err.startswith(f"lidar-train: refused: {last} is not a weights-only checkpoint "
                              "(it would execute code: "), err
        assert not marker.exists()
    last.write_bytes(b"not a checkpoint")
    assert main([str(config_path), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lidar-train: not a checkpoint: {last}: ") and err.count("\n") == 1, err
    assert not (out / "logs").exists()  # refused before anything was built or written
