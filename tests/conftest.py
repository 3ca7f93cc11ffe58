"""Shared fixtures: tiny checkpoints written by the project itself, loaded through the real loader."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from PIL import Image

# `make test` runs two test processes on the machine's cores: one torch thread each (inherited by the workers
# and subprocesses they start), so they do not oversubscribe the cores; torch's OpenMP threads spin badly then.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
