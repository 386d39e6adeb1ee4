"""The project's checkpoint format and the errors a user sees for bad files."""

from __future__ import annotations

import json

import pytest
import torch

from lidar_completion.checkpoints import CheckpointError, CompletionModel, ModelConfig, load_model, save_model


@pytest.fixture()
def tiny_model() -> CompletionModel:
    torch.manual_seed(0)
    return CompletionModel(ModelConfig(channel_ratio=0.25, refine_channel_ratio=0.25, kind="student", default_steps=2, default_guidance=1.0))


def test_save_and_load_round_trip(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "model")
    loaded = load_model(path)
    assert loaded.config == tiny_model.config
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert not loaded.training


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope"):
        load_model(tmp_path / "nope")


def test_truncated_weights_give_one_clear_error(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "model")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        load_model(path)


def test_shape_mismatch_names_first_key_and_shapes(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["channel_ratio"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"key 'encoder.stem.0.kernel' has shape \[27, 3, 8\], expected \[27, 3, 16\]"):
        load_model(path)


def test_bad_config_value_is_rejected(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "model")
    (path / "config.json").write_text(json.dumps({"voxel_size": -1}))
    with pytest.raises(CheckpointError, match="voxel_size"):
        load_model(path)


def test_corrupt_pickle_and_foreign_layouts(tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.ckpt: cannot read checkpoint"):
        load_model(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"backbone.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a known published layout .*'backbone.weight'"):
        load_model(foreign)


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(path)
