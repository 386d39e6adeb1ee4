"""The project's checkpoint format and the errors a user sees for bad files."""

from __future__ import annotations

import json

import pytest
import torch

from lidar_completion.checkpoints import CheckpointError, load_model, save_model
from lidar_completion.model import CompletionModel, ModelConfig


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
    with pytest.raises(CheckpointError, match="not a checkpoint: .*garbage.ckpt"):
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
    with pytest.raises(CheckpointError, match=r"refused: .*evil.ckpt is not a weights-only checkpoint "
                                              r"\(it would execute code: (builtins\.)?print\)") as info:
        load_model(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)



class _Touch:
    """Pickled, it would create a file when loaded."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("kind", ["torch_save", "raw_protocol_4", "raw_protocol_2"])
def test_hostile_pickles_are_refused_in_one_line_and_never_run(tmp_path, kind):
    import pickle

    marker = tmp_path / "ran"
    path = tmp_path / f"{kind}.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "extra": _Touch(marker)}
    if kind == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(kind[-1])))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"refused: {path} is not a weights-only checkpoint (it would execute code: "), message
    assert message.endswith("open)") and "\n" not in message, message
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, bytes(range(256)) * 4, b"PK\x03\x04 truncated zip"],
                         ids=["empty", "zeros", "bytes", "zip_header"])
def test_random_files_are_not_a_checkpoint_without_unsafe_advice(tmp_path, content):
    path = tmp_path / "random.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^not a checkpoint: {path}: ") as info:
        load_model(path)
    text = str(info.value)
    assert "weights_only" not in text and "\n" not in text and "will likely succeed" not in text


def _published(model: CompletionModel, path, refine: bool = False):
    """``model`` saved in the published Lightning layout (student prefixes, optional refiner file)."""
    state = {f"partial_enc.{k[len('encoder.'):]}": v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    state |= {f"generator.{k[len('denoiser.'):]}": v for k, v in model.state_dict().items() if k.startswith("denoiser.")}
    if refine:
        state = {f"model_refine.{k[len('refiner.'):]}": v for k, v in model.state_dict().items() if k.startswith("refiner.")}
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def test_a_separate_refinement_checkpoint_published_or_ours(tiny_model, tmp_path):
    from lidar_completion.checkpoints import with_refiner

    plain = CompletionModel(ModelConfig(channel_ratio=0.25, kind="student", default_steps=2, default_guidance=1.0))
    assert plain.refiner is None
    published_refiner = _published(tiny_model, tmp_path / "refine_net.ckpt", refine=True)
    ours = save_model(tiny_model, tmp_path / "with_refiner")
    for source in (published_refiner, ours):
        combined = with_refiner(plain, source)
        assert combined.config.refine_channel_ratio == 0.25
        for key, value in tiny_model.refiner.state_dict().items():
            assert torch.equal(combined.refiner.state_dict()[key], value), (source, key)
        for key, value in plain.denoiser.state_dict().items():
            assert torch.equal(combined.denoiser.state_dict()[key], value)
    # A published student file is not a refinement net; neither is our model without one.
    student = _published(tiny_model, tmp_path / "student.ckpt")
    with pytest.raises(CheckpointError, match="no refinement net inside .*expected prefix 'model_refine.'"):
        with_refiner(plain, student)
    with pytest.raises(CheckpointError, match="this model has no refinement net"):
        with_refiner(plain, save_model(plain, tmp_path / "plain"))
    with pytest.raises(CheckpointError, match="refinement checkpoint not found"):
        with_refiner(plain, tmp_path / "missing.ckpt")


@pytest.mark.parametrize("name", ["student_lite", "teacher_lite", "student_sd_lite", "student_1step_lite"])
def test_shipped_models_load_with_unchanged_state_dict_keys(name):
    """The models shipped in the package load strictly, and the model built from their
    config has exactly the keys and shapes stored in the file (none renamed by a refactor)."""
    from safetensors import safe_open

    from lidar_completion.checkpoints import SHIPPED_MODELS, find_checkpoint

    path = find_checkpoint(name)
    if path is None:
        pytest.skip(f"no shipped {name} under {SHIPPED_MODELS}")
    model = load_model(path)
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    built = {key: tuple(value.shape) for key, value in CompletionModel(model.config).state_dict().items()}
    assert built == stored
    assert any(key.startswith("encoder.stem.") for key in stored) and any(key.startswith("denoiser.") for key in stored)


def test_checkpoints_is_file_io_only():
    """The model and its config live in lidar_completion.model; checkpoints defines no module or
    config, only its errors."""
    import ast
    import inspect

    import lidar_completion.checkpoints as checkpoints

    tree = ast.parse(inspect.getsource(checkpoints))
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes == ["CheckpointError", "RefinerError"]
    assert checkpoints.CompletionModel is CompletionModel  # still importable from here
