"""How a scan is cut is declared once (issue 26, item 1): the core ``ScanCut`` (ranges, height
floor, n_part, repeat) and its limits, embedded by the completion config, the training run
config, the dataset pairs and the model's ``config.json``, and read by the ROS parameter
table. These tests tie the entry points together: the same values are refused everywhere,
the cut travels from training through the export into the pipeline, and models exported
before it was recorded run as they always did."""

from __future__ import annotations

import io
import json
import tokenize
from pathlib import Path

import numpy as np
import pytest

from lidar_completion.checkpoints import SHIPPED_MODELS, load_model, save_model
from lidar_completion.completer import SceneCompleter
from lidar_completion.config import (CUT_LIMITS, PUBLISHED_CUT, UNRECORDED_RADIUS, CompletionConfig, ScanCut,
                                     effective_cut)
from lidar_completion.model import ModelConfig

REPO = Path(__file__).resolve().parents[1]

# (cut key, a value out of its limits); every entry point that takes the key must refuse it.
BAD = [("min_range", -0.5), ("min_range", 500.0), ("max_range", 0.0), ("max_range", 500.5),
       ("n_part", 15), ("n_part", 200_001), ("repeat", 0), ("repeat", 101)]
GOOD = [("min_range", 0.0), ("max_range", 500.0), ("n_part", 16), ("n_part", 200_000), ("repeat", 1), ("repeat", 100)]


def _completion(name: str, value: float) -> object:
    return CompletionConfig.from_dict({f"data.{name}": value} | ({"data.max_range": 500.0} if name == "min_range" else {}))


def _model_config(name: str, value: float) -> object:
    return ModelConfig.from_dict({"channel_ratio": 0.25, "cut": {name: value}})


def _training(name: str, value: float) -> object:
    from lidar_completion_training.run_config import RunConfig

    data = {"n_part": 100, "n_full": 1000}
    if name == "repeat":
        data["n_full"] = int(value) * data["n_part"]
    elif name == "min_range":
        pytest.skip("training cuts at the published min_range (not a run-config key)")
    else:
        data[name] = value
        if name == "n_part":
            data["n_full"] = 10 * int(value)
    return RunConfig.from_dict({"data": data})


def _pairs(name: str, value: float) -> object:
    from lidar_completion_training.dataset import PairConfig

    return PairConfig(cut=ScanCut(**{name: value} | ({"max_range": 500.0} if name == "min_range" else {})))


ENTRY_POINTS = {"completion config": _completion, "config.json": _model_config, "training run config": _training,
                "dataset pairs": _pairs}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_every_entry_point_refuses_the_same_bad_values_naming_the_key(entry: str, name: str, value: float) -> None:
    key = "n_full" if entry == "training run config" and name == "repeat" else name
    with pytest.raises(ValueError, match=rf"(data|cut)\.{key}: "):
        ENTRY_POINTS[entry](name, value)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("name,value", GOOD, ids=[f"{n}={v}" for n, v in GOOD])
def test_every_entry_point_accepts_the_limits(entry: str, name: str, value: float) -> None:
    if entry == "training run config" and name == "n_part" and value == 200_000:
        value = 20_000  # n_full = 10 x n_part must stay a sane allocation; 200000 is the same check
    ENTRY_POINTS[entry](name, value)


def test_the_ros_ranges_are_the_cut_limits_and_the_core_refuses_beyond_them() -> None:
    parameters = pytest.importorskip("lidar_completion_ros.parameters")
    specs = {spec.name: spec for spec in parameters.PARAMETERS}
    for name in ("min_range", "max_range", "n_part", "repeat"):
        spec = specs[f"data.{name}"]
        assert spec.range is not None and spec.range[1] == CUT_LIMITS[name][1], spec
        assert spec.none_value == spec.range[0], f"data.{name}: below the limits only the sentinel (the model's)"
        beyond = spec.range[1] + (1 if isinstance(spec.default, int) else 0.5)
        with pytest.raises(ValueError, match=rf"data\.{name}"):
            parameters.completion_config({**parameters.defaults(), f"data.{name}": beyond})
    # The defaults follow the model: every cut key is its sentinel.
    config = parameters.completion_config(parameters.defaults())
    assert (config.data.min_range, config.data.max_range, config.data.n_part, config.data.repeat) == (None,) * 4


def test_training_cut_travels_through_the_export_into_the_pipeline(tmp_path: Path) -> None:
    """A teacher trained with repeat 5 (n_full = 5 n_part) and a 12 m radius exports that cut;
    the pipeline then samples 5 points per scan point inside 3.5-12 m above the floor."""
    from lidar_completion_training import maps, synthetic
    from lidar_completion_training.engine import TeacherModule
    from lidar_completion_training.run_config import RunConfig

    root = tmp_path / "data"
    assert synthetic.main(["--out", str(root), "--sequences", "1", "--scans", "2", "--seed", "3", "--preset", "lite"]) == 0
    assert maps.main(["--root", str(root)]) == 0
    run = RunConfig.from_dict({"data": {"root": str(root), "train_sequences": ["00"], "n_part": 64, "n_full": 320,
                                        "max_range": 12.0}, "model": {"channel_ratio": 0.25}})
    assert run.data.cut == ScanCut(min_range=3.5, max_range=12.0, min_z=-4.0, n_part=64, repeat=5)
    exported = TeacherModule(run).export(tmp_path / "teacher")
    written = json.loads((exported / "config.json").read_text())
    assert written["cut"] == {"min_range": 3.5, "max_range": 12.0, "min_z": -4.0, "n_part": 64, "repeat": 5}
    assert "n_part" not in written and "max_range" not in written  # declared once, in the cut
    model = load_model(exported)
    assert model.config.cut == run.data.cut and (model.config.n_part, model.config.max_range) == (64, 12.0)

    completer = SceneCompleter(model, CompletionConfig.from_dict({"device": "cpu", "sampling.steps": 1}))
    assert completer.cut == run.data.cut and completer.config.data.repeat == 5 and completer.config.data.min_range == 3.5
    scan = np.array([[5.0, 0, -1.0], [6.0, 1, -4.5], [2.0, 0, 0.0], [13.0, 0, 0.0], [7.0, -1, 0.5]], np.float32)
    kept = completer.points_in_band(scan)
    np.testing.assert_array_equal(kept, scan[[0, 4]])  # not below the floor, inside 3.5-12 m
    partial, _ = completer.preprocess(np.repeat(scan[[0, 4]], 40, axis=0) + np.random.default_rng(0).normal(0, 0.3, (80, 3)).astype(np.float32))
    sampled, _, _ = completer.sample_scans(partial[None])
    assert sampled.shape[1] == 5 * len(partial)

    # The data.* keys set override the model's cut; the radius stays capped at the model's.
    override = SceneCompleter(model, CompletionConfig.from_dict({"device": "cpu", "data.repeat": 2, "data.min_range": 1.0,
                                                                 "data.max_range": 40.0}))
    assert (override.cut.repeat, override.cut.min_range, override.cut.max_range) == (2, 1.0, 12.0)


@pytest.mark.parametrize("name", ["student_lite", "student_1step_lite", "teacher_lite", "student_sd_lite"])
def test_a_config_json_from_before_the_cut_runs_as_it_always_did(name: str, tmp_path: Path) -> None:
    """The shipped models' config.json (top-level n_part / max_range, no "cut") load with the
    cut the pipeline always used: 3.5 m, no height floor, repeat 10; saved again, the cut is
    written and reads back the same."""
    if not (SHIPPED_MODELS / name / "config.json").is_file():
        pytest.skip(f"{name} is not in this checkout")
    values = json.loads((SHIPPED_MODELS / name / "config.json").read_text())
    assert "cut" not in values
    model = load_model(SHIPPED_MODELS / name)
    assert model.config.cut == ScanCut(min_range=3.5, max_range=values["max_range"], min_z=None, n_part=values["n_part"],
                                       repeat=10)
    completer = SceneCompleter(model, CompletionConfig.from_dict({"device": "cpu"}))
    assert (completer.n_part, completer.max_range, completer.config.data.min_range, completer.config.data.repeat) == (
        values["n_part"], values["max_range"], 3.5, 10)
    again = load_model(save_model(model, tmp_path / name))
    assert again.config == model.config
    assert json.loads((tmp_path / name / "config.json").read_text())["cut"]["min_z"] is None


def test_legacy_and_unrecorded_cuts() -> None:
    assert ModelConfig.from_dict({"channel_ratio": 0.25, "n_part": None, "max_range": None}).cut is None
    assert ModelConfig.from_dict({"channel_ratio": 0.25, "max_range": 20.0}).cut == ScanCut(
        min_range=3.5, max_range=20.0, min_z=None, n_part=2000, repeat=10)  # n_part: the lite preset, as before
    with pytest.raises(ValueError, match="cut: given with the older n_part"):
        ModelConfig.from_dict({"channel_ratio": 0.25, "n_part": 64, "cut": {"n_part": 64}})
    with pytest.raises(ValueError, match="unknown cut keys: 'cut.radius'"):
        ModelConfig.from_dict({"channel_ratio": 0.25, "cut": {"radius": 64}})
    with pytest.raises(ValueError, match=r"cut\.max_range: must be > min_range"):
        ModelConfig.from_dict({"channel_ratio": 0.25, "cut": {"min_range": 5.0, "max_range": 4.0}})
    # A model that records no cut (a published .ckpt): the published values, no radius to cap at.
    data = CompletionConfig.from_dict({"data.max_range": 80.0}).data
    assert effective_cut(data, None) == ScanCut(min_range=3.5, max_range=80.0, min_z=None, n_part=2000, repeat=10)
    assert effective_cut(CompletionConfig().data, None).max_range == UNRECORDED_RADIUS == PUBLISHED_CUT.max_range


def test_the_repeat_of_training_is_n_full_over_n_part_and_nothing_else() -> None:
    from lidar_completion_training.dataset import PairConfig
    from lidar_completion_training.run_config import RunConfig

    run = RunConfig.from_dict({"data": {"n_part": 1000, "n_full": 60_000}})  # a refinement run's x6 ground truth
    assert run.data.cut.repeat == 60
    pairs = PairConfig(cut=run.data.cut)
    assert (pairs.n_part, pairs.n_full) == (1000, 60_000)
    with pytest.raises(ValueError, match="data.n_full: must be a multiple of data.n_part"):
        RunConfig.from_dict({"data": {"n_part": 96, "n_full": 1000}})


def _numbers(path: Path) -> list[str]:
    """The numeric literals of a Python file's code (not its strings or comments)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [t.string for t in tokens if t.type == tokenize.NUMBER]


def test_the_cut_defaults_are_written_once() -> None:
    """Besides the behaviour above: the published cut's numbers appear as code only in ScanCut
    (config.py), not again in the training config, the dataset, the ROS table or the
    training/evaluation glue that used to repeat them."""
    config_numbers = _numbers(REPO / "src/lidar_completion/config.py")
    for literal in ("3.5", "50.0", "18_000", "200_000"):
        assert config_numbers.count(literal) == 1, f"{literal} more than once in config.py"
    published = {"3.5", "50.0", "18_000", "18000", "180_000", "180000", "200_000", "200000", "500.0"}
    for relative, allowed in (("training/lidar_completion_training/run_config.py", set()),
                              ("training/lidar_completion_training/dataset.py", set()),
                              ("training/lidar_completion_training/engine.py", set()),
                              ("training/lidar_completion_training/evaluate.py", set()),
                              ("training/lidar_completion_training/diagnostics.py", set()),
                              ("src/lidar_completion/model.py", {"3.5"}),  # the published student's guidance
                              ("src/lidar_completion/completer.py", set()),
                              # sampling.guidance's own limit is 50.0
                              ("ros2_ws/src/lidar_completion_ros/lidar_completion_ros/parameters.py", {"50.0"})):
        found = (published - allowed) & set(_numbers(REPO / relative))
        assert not found, f"{relative} repeats the cut's numbers {sorted(found)}: use config.ScanCut / PUBLISHED_CUT"
    # The sampler's repeat of training is the cut's, never recomputed from the data keys.
    engine = (REPO / "training/lidar_completion_training/engine.py").read_text()
    assert "n_full // " not in engine and "data.cut.repeat" in engine


def test_shipped_models_are_untouched_by_the_new_format() -> None:
    """The shipped files stay as they are (format 1, no cut): the loader reads them."""
    for directory in sorted(p for p in SHIPPED_MODELS.iterdir() if (p / "config.json").is_file()):
        copy = json.loads((directory / "config.json").read_text())
        assert copy.get("format_version", 1) <= 2
        assert ModelConfig.from_dict(copy).cut is not None, directory.name
