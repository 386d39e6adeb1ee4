"""A small generated SemanticKITTI-layout dataset shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Two lite sequences of 6 scans with their ground-truth maps."""
    from lidar_completion_training import maps, synthetic

    root = tmp_path_factory.mktemp("synthetic")
    assert synthetic.main(["--out", str(root), "--sequences", "2", "--scans", "6", "--seed", "3", "--preset", "lite"]) == 0
    assert maps.main(["--root", str(root)]) == 0
    return root
