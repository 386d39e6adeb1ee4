"""Fixtures for the ROS 2 tests: a unique DDS domain per test, models and a synthetic bag.

The whole directory is skipped when rclpy (or a message package) is not importable, and
every test in it carries the ``ros`` marker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy is not installed")
pytest.importorskip("sensor_msgs.msg", reason="sensor_msgs is not installed")
pytest.importorskip("lidar_completion_ros",
                    reason="lidar_completion_ros is not installed (pip install -e ros2_ws/src/lidar_completion_ros)")

from ros_helpers import SHIPPED_STUDENT, TINY_OVERRIDES, Peer  # noqa: E402

_used_domains: set[int] = set()
_rng = random.Random()  # seeded from the OS: concurrent runs pick different domains


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.ros)


def _unused_domain_id() -> int:
    """A ROS_DOMAIN_ID in 1..200 not used by another test of this run."""
    while True:
        candidate = _rng.randint(1, 200)
        if candidate not in _used_domains:
            _used_domains.add(candidate)
            return candidate


@pytest.fixture
def domain_id() -> int:
    return _unused_domain_id()


@pytest.fixture(scope="module")
def module_domain_id() -> int:
    return _unused_domain_id()


@dataclass(frozen=True)
class Model:
    path: Path
    trained: bool  # the shipped student: completions must get closer to the ground truth
    overrides: dict  # parameters that keep CPU time small (tiny model only)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from lidar_completion.checkpoints import save_model
    from lidar_completion.model import CompletionModel, ModelConfig

    torch.manual_seed(0)
    return save_model(CompletionModel(ModelConfig(channel_ratio=0.25)), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def model(tiny_checkpoint: Path) -> Model:
    """The shipped student when it exists, else the tiny random model (structural checks only)."""
    if (SHIPPED_STUDENT / "config.json").is_file():
        return Model(SHIPPED_STUDENT, True, {})
    return Model(tiny_checkpoint, False, dict(TINY_OVERRIDES))


@pytest.fixture
def peer(domain_id: int):
    p = Peer(domain_id)
    yield p
    p.close()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-scan synthetic SemanticKITTI-layout sequence ('lite' sensor) with its map."""
    synthetic = pytest.importorskip("lidar_completion_training.synthetic")
    maps = pytest.importorskip("lidar_completion_training.maps")
    root = tmp_path_factory.mktemp("synthetic")
    assert synthetic.main(["--out", str(root), "--sequences", "1", "--scans", "5", "--seed", "3",
                           "--preset", "lite"]) == 0
    assert maps.main(["--root", str(root), "--sequences", "00"]) == 0
    return root


@pytest.fixture(scope="session")
def synthetic_bag(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lidar_completion.bags import kitti_sequence_to_bag

    bag = tmp_path_factory.mktemp("bags") / "synthetic_bag"
    assert kitti_sequence_to_bag(synthetic_root / "sequences" / "00", bag) == 5
    return bag
