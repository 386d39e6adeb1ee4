"""Launch files, parameter YAML, RViz config and package metadata agree with the node.

These run everywhere (no DDS traffic); the launch-description tests that need the ROS
``launch`` package are skipped where it is not importable (it is not on PyPI).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from lidar_completion.config import flatten_keys
from lidar_completion_ros import node as node_module
from lidar_completion_ros.parameters import COMPLETION_KEYS, PARAMETERS, completion_config, defaults
from lidar_completion_ros.ros_parameters import descriptor

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "ros2_ws" / "src" / "lidar_completion_ros"
COMPLETION_LAUNCH = PACKAGE / "launch" / "completion.launch.py"
DEMO_LAUNCH = PACKAGE / "launch" / "demo.launch.py"
NODE_YAML = PACKAGE / "config" / "completion_node.yaml"
DOCUMENTED_ARGS = {"input_topic", "output_topic", "params_file", "checkpoint", "device", "namespace", "use_sim_time",
                   "autostart", "respawn", "respawn_delay"}




def _declared_args(path: Path) -> dict[str, str | None]:
    """``DeclareLaunchArgument(name, default_value=...)`` calls: name -> default (None if none)."""
    found: dict[str, str | None] = {}
    for call in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "DeclareLaunchArgument":
            name = call.args[0]
            assert isinstance(name, ast.Constant), f"{path}: argument name must be a literal"
            default = next((k.value for k in call.keywords if k.arg == "default_value"), None)
            found[name.value] = default.value if isinstance(default, ast.Constant) else (
                None if default is None else "<expr>")
            assert any(k.arg == "description" for k in call.keywords), f"{name.value}: no description"
    return found


# ----------------------------------------------------------------------------- launch files
@pytest.mark.parametrize("path", [COMPLETION_LAUNCH, DEMO_LAUNCH], ids=lambda p: p.name)
def test_launch_file_is_valid_python_with_a_description(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    functions = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    compile(tree, str(path), "exec")


def test_completion_launch_declares_the_documented_arguments() -> None:
    args = _declared_args(COMPLETION_LAUNCH)
    assert set(args) == DOCUMENTED_ARGS
    assert args["input_topic"] == "points_raw" and args["output_topic"] == "points_completed"
    assert args["use_sim_time"] == "false"
    assert args["checkpoint"] == "" and args["device"] == ""  # empty: keep the YAML's value
    assert args["autostart"] == "true" and args["respawn"] == "false" and args["respawn_delay"] == "2.0"
    text = COMPLETION_LAUNCH.read_text()
    # The node's topic names are what the launch file remaps.
    assert f'"{node_module.INPUT_TOPIC}"' in text and f'"{node_module.OUTPUT_TOPIC}"' in text
    assert 'executable="completion_node"' in text and "completion_node.yaml" in text
    assert "respawn=" in text and "respawn_delay=" in text and '"autostart"' in text


def test_demo_launch_declares_its_arguments() -> None:
    args = _declared_args(DEMO_LAUNCH)
    assert {"bag", "record", "rviz", "input_topic", "output_topic", "checkpoint", "device"} <= set(args)
    assert args["bag"] is None  # required


def test_launch_files_are_documented() -> None:
    docs = (REPO / "docs" / "ros.md").read_text()
    for name in DOCUMENTED_ARGS:
        assert f"`{name}`" in docs, f"launch argument {name} missing from docs/ros.md"


@pytest.mark.skipif(importlib.util.find_spec("launch") is None or importlib.util.find_spec("launch_ros") is None,
                    reason="ROS 'launch'/'launch_ros' not importable here (not on PyPI)")
def test_launch_description_builds(monkeypatch: pytest.MonkeyPatch) -> None:  # pragma: no cover - ROS hosts
    import ament_index_python.packages as packages
    from launch.actions import DeclareLaunchArgument

    from launch import LaunchContext

    monkeypatch.setattr(packages, "get_package_share_directory", lambda _: str(PACKAGE))
    spec = importlib.util.spec_from_file_location("completion_launch", COMPLETION_LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    names = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert names == DOCUMENTED_ARGS
    context = LaunchContext()
    for entity in description.entities:
        entity.visit(context)
    node = module._node(context)[0]
    assert node.node_executable == "completion_node"


# ----------------------------------------------------------------------------- parameter YAML
def _yaml_parameters() -> dict[str, Any]:
    data = yaml.safe_load(NODE_YAML.read_text())
    assert list(data) == ["/**"], "parameters apply to the node under any name/namespace"
    return flatten_keys(data["/**"]["ros__parameters"])


def test_yaml_keys_match_declared_parameters_both_ways() -> None:
    in_yaml = _yaml_parameters()
    declared = {spec.name for spec in node_module.PARAMETERS}
    assert set(in_yaml) - declared == set(), "YAML keys the node does not declare"
    assert declared - set(in_yaml) == set(), "declared parameters missing from the YAML"


def test_yaml_values_have_the_declared_types_and_defaults() -> None:
    in_yaml = _yaml_parameters()
    for spec in PARAMETERS:
        value = in_yaml[spec.name]
        assert type(value) is type(spec.default), f"{spec.name}: {value!r} is not a {spec.type_name}"
        assert value == spec.default, f"{spec.name}: YAML {value!r} != declared default {spec.default!r}"
        if spec.range is not None:
            assert spec.range[0] <= value <= spec.range[1]
        if spec.choices is not None and "cuda:N" not in spec.choices:
            assert value in spec.choices


def test_yaml_builds_a_valid_core_config() -> None:
    config = completion_config(_yaml_parameters())
    assert config.data.max_range is None and config.data.preset == "model" and config.data.n_part is None  # the model's radius
    assert config.sampling.steps is None and config.sampling.guidance is None  # the checkpoint's own
    assert config.refine is False


def test_completion_keys_are_the_core_config_keys() -> None:
    from lidar_completion.config import CompletionConfig

    assert set(COMPLETION_KEYS) == set(flatten_keys(CompletionConfig().to_dict()))


def _nudge(value: float | int, direction: int) -> float | int:
    if isinstance(value, float):
        return value + direction * max(1e-6, abs(value) * 1e-9) if math.isfinite(value) else value
    return value + direction


@pytest.mark.parametrize("spec", [s for s in PARAMETERS if s.name in COMPLETION_KEYS and s.range],
                         ids=lambda s: s.name)
def test_declared_ranges_agree_with_the_core_config(spec) -> None:
    """The descriptor ranges shown by ``ros2 param describe`` never admit what the core rejects
    at the edges, and the core accepts the range ends (sentinels and cross-field rules aside)."""
    base = defaults()
    low, high = spec.range
    for outside in (_nudge(type(spec.default)(low), -1), _nudge(type(spec.default)(high), +1)):
        with pytest.raises(ValueError, match=r"data\.|sampling\."):  # names the key (or its partner)
            completion_config({**base, spec.name: outside})
    fixups = {"data.min_range": {"data.max_range": 500.0}, "data.max_range": {"data.min_range": 0.0}}
    for inside in (low, high):
        value = type(spec.default)(inside)
        if spec.none_value is not None and value == spec.none_value:
            continue
        if spec.name == "data.min_range" and value == high:
            continue  # needs min < max <= 500: cross-field, the core's call
        if spec.name == "data.max_range" and value == low:
            continue
        if spec.name == "data.n_part" and value < 16:
            continue
        completion_config({**base, **fixups.get(spec.name, {}), spec.name: value})


def test_every_parameter_has_a_description_and_sane_descriptor() -> None:
    for spec in PARAMETERS:
        described = descriptor(spec)
        assert described.description and described.name == spec.name
        if spec.range is not None:
            ranges = described.floating_point_range or described.integer_range
            assert len(ranges) == 1 and ranges[0].from_value == spec.range[0] and ranges[0].to_value == spec.range[1]
            if isinstance(spec.default, float):
                assert described.floating_point_range and not described.integer_range


def test_parameters_are_documented_in_a_table() -> None:
    docs = (REPO / "docs" / "ros.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in docs.splitlines() if line.startswith("| `")}
    assert {spec.name for spec in PARAMETERS} <= rows


# ----------------------------------------------------------------------------- RViz config
def test_rviz_config_shows_input_and_completion_in_distinct_colours() -> None:
    rviz = yaml.safe_load((PACKAGE / "config" / "completion.rviz").read_text())
    manager = rviz["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "velodyne"
    clouds = {d["Topic"]["Value"]: d for d in manager["Displays"] if d["Class"].endswith("/PointCloud2")}
    assert set(clouds) == {"/points_raw", "/points_completed"}
    colours = {topic: (d["Color Transformer"], d["Color"]) for topic, d in clouds.items()}
    assert colours["/points_raw"] != colours["/points_completed"]
    assert all(d["Enabled"] for d in clouds.values())
    # The output's measured (1) and completed (0) points in two colours, by the measured field.
    output = clouds["/points_completed"]
    assert (output["Color Transformer"], output["Channel Name"], output["Use rainbow"]) == ("Intensity", "measured", False)
    assert (output["Autocompute Intensity Bounds"], output["Min Intensity"], output["Max Intensity"]) == (False, 0, 1)
    assert output["Min Color"] != output["Max Color"]


# ----------------------------------------------------------------------------- package metadata
def _exec_depends() -> set[str]:
    root = ET.parse(PACKAGE / "package.xml").getroot()
    assert root.findtext("name") == "lidar_completion_ros"
    assert root.find("export/build_type").text == "ament_python"
    return {e.text for e in root.findall("exec_depend")}


#: Imported but installed with pip, not rosdep (package.xml says so in a comment).
PIP_INSTALLED = {"lidar_completion", "lidar_completion_training", "torch", "lidar_completion_ros"}
ROSDEP_KEYS = {"numpy": "python3-numpy", "yaml": "python3-yaml"}


def test_package_xml_declares_every_runtime_import_and_executable() -> None:
    import sys

    depends = _exec_depends()
    sources = sorted((PACKAGE / "lidar_completion_ros").glob("*.py")) + sorted((PACKAGE / "launch").glob("*.py"))
    imported: set[str] = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Node":
                package = next((k.value for k in node.keywords if k.arg == "package"), None)
                if isinstance(package, ast.Constant):  # an executable a launch file starts
                    imported.add(package.value)
    needed = {ROSDEP_KEYS.get(m, m) for m in imported - set(sys.stdlib_module_names) - PIP_INSTALLED}
    assert "rclpy" in needed and "rviz2" in needed and "lifecycle_msgs" not in imported
    assert needed - depends == set(), "imported or started but not in package.xml"
    # rclpy.lifecycle needs lifecycle_msgs at run time.
    assert {"lifecycle_msgs", "builtin_interfaces", "tf2_ros"} <= depends


def test_package_has_no_symlinks_out_of_it() -> None:
    for path in PACKAGE.rglob("*"):
        if path.is_symlink():
            assert PACKAGE in path.resolve().parents, f"{path} points out of the package"
    for name in ("launch", "config"):
        assert (PACKAGE / name).is_dir() and not (PACKAGE / name).is_symlink()
    # The top-level launch/ and config/ files are the package's (one copy of each file).
    assert (REPO / "launch").resolve() == (PACKAGE / "launch").resolve()
    for name in ("completion_node.yaml", "completion.rviz", "fastdds_large_data.xml"):
        assert (REPO / "config" / name).resolve() == (PACKAGE / "config" / name).resolve()


def test_setup_installs_scripts_and_share_files() -> None:
    cfg = (PACKAGE / "setup.cfg").read_text()
    assert "script_dir=$base/lib/lidar_completion_ros" in cfg
    assert "install_scripts=$base/lib/lidar_completion_ros" in cfg
    assert (PACKAGE / "resource" / "lidar_completion_ros").is_file()
    setup_py = (PACKAGE / "setup.py").read_text()
    for script in ("completion_node = lidar_completion_ros.node:main",
                   "bag_replay = lidar_completion_ros.bag_replay:main",
                   "bag_record = lidar_completion_ros.bag_record:main"):
        assert script in setup_py
    assert (PACKAGE / "launch" / "completion.launch.py").is_file()
    assert (PACKAGE / "config" / "completion_node.yaml").is_file()
    assert (PACKAGE / "config" / "completion.rviz").is_file()


def test_setup_data_files_list_the_launch_and_config_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import setuptools

    captured: dict[str, Any] = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir("/")  # the globs must not depend on the working directory
    spec = importlib.util.spec_from_file_location("ros_pkg_setup", PACKAGE / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = dict(captured["data_files"])
    assert data["share/lidar_completion_ros/launch"] == ["launch/completion.launch.py", "launch/demo.launch.py"]
    assert data["share/lidar_completion_ros/config"] == ["config/completion_node.yaml", "config/completion.rviz",
                                                        "config/fastdds_large_data.xml"]
    assert data["share/ament_index/resource_index/packages"] == ["resource/lidar_completion_ros"]


def test_install_without_symlink_install_copies_real_files(tmp_path: Path) -> None:
    """What ``colcon build`` (no ``--symlink-install``) does for ament_python data files:
    setup.py's install_data copies launch/ and config/ into share/ as plain files."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "setup.py", "-q", "install_data", "-d", str(tmp_path)], cwd=PACKAGE,
                   check=True, capture_output=True, timeout=300)
    share = tmp_path / "share" / "lidar_completion_ros"
    for name in ("launch/completion.launch.py", "launch/demo.launch.py", "config/completion_node.yaml",
                 "config/completion.rviz", "config/fastdds_large_data.xml", "package.xml"):
        installed = share / name
        assert installed.is_file() and not installed.is_symlink(), name
        assert installed.read_bytes() == (PACKAGE / name).read_bytes(), name
