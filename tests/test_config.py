"""Config files as users write them: exponents without a dot, and wrong types named by key."""

from __future__ import annotations

import pytest

from lidar_completion.config import CompletionConfig, load_config, read_yaml
from lidar_completion.model import ModelConfig


def test_exponents_without_a_dot_are_numbers(tmp_path):
    assert read_yaml("a: 3e-5\nb: -1E3\nc: 12\nd: 1.5e-3\ne: 2e5x\nf: '3e-5'") == {
        "a": 3e-5, "b": -1000.0, "c": 12, "d": 1.5e-3, "e": "2e5x", "f": "3e-5"}
    path = tmp_path / "completion.yaml"
    path.write_text("completion:\n  data:\n    max_range: 4e1\n  sampling:\n    guidance: 1e0\n")
    config = load_config(path)
    assert (config.data.max_range, config.sampling.guidance) == (40.0, 1.0)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"data": {"max_range": "far"}}, "data.max_range: must be a number, got 'far'"),
        ({"sampling": {"steps": 2.5}}, "sampling.steps: must be an integer, got 2.5"),
        ({"data": {"repeat": True}}, "data.repeat: must be an integer, got True"),
        ({"data": {"preset": None}}, "data.preset: must be set (got null)"),
        ({"data": [1, 2]}, "data: must be a mapping, got list"),
        ({"device": 0}, "device: must be a string, got 0"),
    ],
)
def test_wrong_types_are_config_errors_naming_the_key(values, message):
    with pytest.raises(ValueError) as err:
        CompletionConfig.from_dict(values)
    assert str(err.value) == message


def test_model_config_types_are_checked_too():
    with pytest.raises(ValueError, match="channel_ratio: must be a number"):
        ModelConfig.from_dict({"channel_ratio": "wide"})
    assert ModelConfig.from_dict({"channel_ratio": 1, "t0": None}).channel_ratio == 1


def test_free_space_margin_is_a_distance_or_null():
    assert CompletionConfig().data.free_space_margin == 0.2
    assert CompletionConfig.from_dict({"data": {"free_space_margin": None}}).data.free_space_margin is None
    with pytest.raises(ValueError, match=r"data.free_space_margin: must be in \[0, 10\] m"):
        CompletionConfig.from_dict({"data.free_space_margin": -0.5})
    assert CompletionConfig().with_free_space_margin(None).data.free_space_margin is None
    assert CompletionConfig().with_free_space_margin(0.5).data.free_space_margin == 0.5
    with pytest.raises(ValueError, match="data.free_space_margin"):
        CompletionConfig().with_free_space_margin(-0.5)


def test_stage_off_has_one_spelling_per_layer_and_one_conversion():
    """None in the core config; -1 (STAGE_OFF) in the ROS parameter and lidar-evaluate's flag,
    both converted by config.free_space_margin; another negative is refused, not "off"."""
    from lidar_completion.config import STAGE_OFF, free_space_margin

    assert STAGE_OFF == -1.0 and free_space_margin(-1) is None and free_space_margin(None) is None
    assert free_space_margin(0.0) == 0.0 and free_space_margin(0.5) == 0.5
    with pytest.raises(ValueError, match="data.free_space_margin"):
        CompletionConfig().with_free_space_margin(free_space_margin(-0.5))
    parameters = pytest.importorskip("lidar_completion_ros.parameters")
    for value, expected in ((-1.0, None), (-1, None), (0.5, 0.5), (0, 0.0)):
        config = parameters.completion_config({**parameters.defaults(), "data.free_space_margin": value})
        assert config.data.free_space_margin == expected
    with pytest.raises(ValueError, match="data.free_space_margin"):
        parameters.completion_config({**parameters.defaults(), "data.free_space_margin": -0.5})


def test_max_range_unset_is_the_models_radius():
    """Issue 28, item 9: ``data.max_range`` defaults to the radius the model was trained on
    (the node's shipped YAML leaves it at 0 = unset), so no setting of ours is capped."""
    from lidar_completion.config import UNRECORDED_RADIUS, completion_radius, effective_range

    data = CompletionConfig().data
    assert data.max_range is None
    assert completion_radius(None, 10.0) == 10.0 and completion_radius(None, None) == UNRECORDED_RADIUS == 50.0
    assert completion_radius(30.0, 10.0) == 10.0 and completion_radius(8.0, 10.0) == 8.0
    assert completion_radius(30.0, None) == 30.0
    assert effective_range(data, 10.0) == (3.5, 10.0)
    with pytest.raises(ValueError, match=r"data.min_range: 12 m leaves no range band: the model completes up "
                                         r"to 10 m \(the model's trained radius\)"):
        effective_range(CompletionConfig.from_dict({"data.min_range": 12.0}).data, 10.0)
    with pytest.raises(ValueError, match="data.min_range"):
        CompletionConfig.from_dict({"data.min_range": 500.0})
