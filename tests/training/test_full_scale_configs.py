"""The full-scale configs (config/training/*_semantickitti.yaml, issue 27): each holds the
published scene and widths, validates, builds its module at full width on the meta device (no
memory), and trains two steps on CPU on a tiny generated dataset with only its point counts,
widths and devices scaled down by overrides. The teacher's two-step export is the students'
teacher and the refinement net's base, so the four runs chain as they do on real data.

One case, ~30 s on one core: the four Lightning runs dominate.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from lidar_completion.checkpoints import load_model
from lidar_completion.config import ScanCut
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.networks import BASE_CHANNELS
from lidar_completion_training import engine
from lidar_completion_training.run_config import load_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "config" / "training"
NAMES = ("teacher", "refine", "distill_dpo", "distill_sd")
TRAIN = ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"]


def _path(name: str) -> Path:
    return CONFIGS / f"{name}_semantickitti.yaml"


def _raw(name: str) -> dict:
    return yaml.safe_load(_path(name).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_full_scale_config_holds_the_published_scene(name):
    """What the headers cite: SemanticKITTI 00-07, 09-10 (08 held out), 50 m, 18k -> 180k
    points (the refinement's ground truth x6, its input a sixth), channel ratio 1, multi-GPU."""
    raw = _raw(name)
    data, trainer = raw["data"], raw["trainer"]
    assert data["root"] == "data/semantickitti" and data["train_sequences"] == TRAIN
    assert "08" not in data["train_sequences"] and data.get("val_sequences", ["08"]) == ["08"]
    assert data["max_range"] == 50.0 and data["n_part"] == 18000
    assert data["n_full"] == (1_080_000 if name == "refine" else 180_000)
    assert raw["model"]["channel_ratio"] == 1.0 and trainer["accelerator"] == "gpu"
    if name == "refine":
        assert raw["refine"]["channel_ratio"] == 1.0 and raw["refine"]["source"] == "ground_truth"
        assert (trainer["batch_size"], trainer["lr"], trainer["devices"]) == (8, 1e-4, 1)
    else:
        assert trainer["strategy"] == "ddp" and trainer["devices"] == 2
    if name == "teacher":  # 20 epochs of 19,130 scans at 2 per GPU on 2 GPUs, Adam 1e-4
        assert trainer["max_steps"] == 20 * math.ceil(19_130 / 4) and (trainer["batch_size"], trainer["lr"]) == (2, 1e-4)
        assert raw["teacher"]["uncond_prob"] == 0.1
        # halved every 5 of the 20 epochs (release: ExponentialLR(0.5) every 5 epochs)
        assert (trainer["lr_decay"], trainer["lr_decay_every"]) == (0.5, 5 * trainer["max_steps"] // 20)
    else:  # the releases of the refinement net and of Distillation-DPO keep the rate (about) constant
        assert trainer.get("lr_decay_every", 0) == 0
    if name.startswith("distill"):  # batch 1 per GPU, lr 1e-5, clip 0.05, loser noise x1.1
        assert (trainer["batch_size"], trainer["lr"], trainer["grad_clip"]) == (1, 1e-5, 0.05)
        assert raw["distill"]["noise_scale_loser"] == 1.1 and raw["distill"]["teacher"] == "runs/teacher_semantickitti/export"
    # The header names a source for the settings and what was changed on purpose.
    header = _path(name).read_text().split("\nkind:")[0]
    assert "release" in header and "on purpose" in header


def test_dpo_and_plain_distillation_differ_only_in_mode_and_names():
    dpo, sd = _raw("distill_dpo"), _raw("distill_sd")
    assert (dpo["distill"].pop("mode"), sd["distill"].pop("mode")) == ("dpo", "sd")
    for raw in (dpo, sd):
        raw["trainer"].pop("out_dir"), raw["model"].pop("description")
    assert dpo == sd


def _meta_model(path, *args, **kwargs) -> CompletionModel:
    """What ``load_model`` would give for a full-scale export: built on the meta device."""
    with torch.device("meta"):
        return CompletionModel(ModelConfig(channel_ratio=1.0, cut=ScanCut.for_training(18000, 180000, max_range=50.0), sampler="ve", t0=400,
                                           prediction="displacement", default_guidance=1.0))


@pytest.mark.parametrize("name", NAMES)
def test_full_scale_module_builds_at_the_published_widths(name, tiny_dataset, tmp_path, monkeypatch):
    """Every net of the run at widths 32-32-64-128-256-256-128-96-96, on the meta device."""
    monkeypatch.setattr(engine, "load_model", _meta_model)
    overrides = {"data.root": str(tiny_dataset), "data.train_sequences": ["00"], "data.val_sequences": ["01"],
                 "trainer.out_dir": str(tmp_path / "run")}
    overrides |= {"distill_dpo": {"distill.teacher": str(tmp_path)}, "distill_sd": {"distill.teacher": str(tmp_path)},
                  "refine": {"refine.base": str(tmp_path)}}.get(name, {})
    config = load_run_config(_path(name), overrides)
    with torch.device("meta"):
        module = engine.build_module(config)
    params = list(module.parameters())
    assert params and all(p.is_meta for p in params), "the full-width module must not allocate"
    model = module.model
    nets = [model.encoder, model.denoiser]
    if name == "refine":
        nets.append(model.refiner)
        assert model.config.refine_channel_ratio == 1.0
    if name.startswith("distill"):
        nets += [module.teacher, *module.aux]
        assert len(module.aux) == (2 if name == "distill_dpo" else 1)
        assert (model.config.t0, model.config.default_steps, model.config.sampler) == (300, 2, "ve")
    assert model.config.channel_ratio == 1.0 and model.config.n_part == 18000 and model.config.max_range == 50.0
    for net in nets:
        assert net.widths == list(BASE_CHANNELS), type(net).__name__
    if name == "teacher":
        assert (model.config.sampler, model.config.t0, model.config.prediction) == ("ve", 400, "displacement")
    # The published denoiser: 24.2 M parameters at channel ratio 1.
    assert sum(p.numel() for p in model.denoiser.parameters()) == 24_174_515


def _small(name: str, root: Path, out: Path, previous: Path | None) -> dict:
    """Point counts / 280 (x60 for the refinement), widths x1/4, one CPU process, two steps
    logged (diagnostics on the second): everything else is the file's."""
    n_part = 64 if name != "refine" else 32
    overrides = {
        "data.root": str(root), "data.train_sequences": ["00"], "data.val_sequences": ["01"], "data.num_workers": 0,
        "data.n_part": n_part, "data.n_full": n_part * (60 if name == "refine" else 10),
        "model.channel_ratio": 0.25, "trainer.out_dir": str(out), "trainer.max_steps": 2, "trainer.diagnose_every": 2,
        "trainer.log_every": 1,
        "trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.strategy": "auto",
    }
    if name == "refine":
        overrides |= {"refine.base": str(previous), "refine.channel_ratio": 0.25}
    if name.startswith("distill"):
        overrides |= {"distill.teacher": str(previous)}
    return overrides


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_two_training_steps_of_each_full_scale_config_on_cpu(tiny_dataset, tmp_path):
    teacher_export = None
    for name in NAMES:
        out = tmp_path / name
        overrides = _small(name, tiny_dataset, out, teacher_export)
        config = load_run_config(_path(name), overrides)
        export = engine.fit(config, progress=False)
        # The run kept every setting of the file but the overridden ones.
        ran, file = yaml.safe_load((out / "run_config.yaml").read_text()), _raw(name)
        for section, values in file.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    if f"{section}.{key}" not in overrides:
                        assert ran[section][key] == value, f"{name}: {section}.{key}"
        rows = _rows(out)
        losses = [float(r[key]) for r in rows for key in r if key.startswith("train/") and r[key]]
        assert losses and all(math.isfinite(v) for v in losses), name
        assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["data_step"] == 2
        model = load_model(export)
        if name == "teacher":
            teacher_export = export
            assert (model.config.sampler, model.config.t0, model.config.prediction) == ("ve", 400, "displacement")
            assert any(r.get("diag/cd_4steps") for r in rows)
        elif name == "refine":
            assert model.refiner is not None and model.config.refine_channel_ratio == 0.25
        else:
            assert (model.config.kind, model.config.default_steps, model.config.t0) == ("student", 2, 300)
            assert any(r.get("diag/cd_2steps") for r in rows)
            assert any(r.get("train/loss_regression") for r in rows), "DMD's regression term is on"
            if name == "distill_dpo":
                assert any(r.get("train/switch_rate") for r in rows)
