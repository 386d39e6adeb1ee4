"""The docs state the shipped models' radius and budget as their configs say (issue 28, item 8):
a release that changes a model's config.json and forgets the docs fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lidar_completion.checkpoints import SHIPPED_MODELS

REPO = Path(__file__).resolve().parents[1]


def _configs() -> list[dict]:
    return [json.loads((SHIPPED_MODELS / name / "config.json").read_text()) for name in ("teacher_lite", "student_lite")]


@pytest.mark.parametrize("doc", ["docs/cli.md", "docs/ros.md"])
def test_documented_radius_of_the_shipped_models_is_their_config(doc: str) -> None:
    radii = {config["max_range"] for config in _configs()}
    assert len(radii) == 1
    radius = radii.pop()
    text = (REPO / doc).read_text()
    stated = re.findall(r"the shipped\s+lite models:\s+(\d+(?:\.\d+)?) m", text)
    assert stated and all(float(value) == radius for value in stated), (doc, stated, radius)


def test_model_card_budget_and_radius_are_the_configs() -> None:
    card = (SHIPPED_MODELS / "MODEL_CARD.md").read_text()
    for config in _configs():
        assert f"**{config['max_range']:g} m** scene" in card
        assert f"**{config['n_part']:,} points**" in card
