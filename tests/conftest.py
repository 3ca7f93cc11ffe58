"""Shared fixtures: tiny checkpoints written by the project itself, loaded through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from disp.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llada-v", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from disp import models

    return models.load(tiny_dir)


@pytest.fixture
def solid_images() -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 90)]]


# The longest files first: `make test` runs two processes and pytest-xdist (--dist loadfile) hands out
# whole files in collection order, so a long file collected last would run alone at the end.
LONGEST_FIRST = (
    "tests/experiments/test_quick_bar.py",
    "tests/worker/test_faults.py",
    "tests/api/test_demo.py",
    "tests/api/test_security_fuzz.py",
)


def pytest_collection_modifyitems(items) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
