"""Shared fixtures of the data/attack tests: a small folder of real PNG images with LLaVA records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

DATA_ANSWERS = [
    "A dog runs on the grass.",
    "Two cats sleep on a sofa.",
    "Dogs play in the park near a dog house.",
    "A red car is parked.",
    "The Dog is brown.",
    "A bowl of fruit.",
]


@pytest.fixture
def data_folder(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """``(root, records)``: six random 32×24 RGB PNGs under ``root/pics/`` and one record per image."""
    root = tmp_path / "src"
    (root / "pics").mkdir(parents=True)
    rng = np.random.default_rng(7)
    records = []
    for i, answer in enumerate(DATA_ANSWERS):
        pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "pics" / f"img{i}.png")
        records.append({
            "id": f"s{i}",
            "image": f"pics/img{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                              {"from": "gpt", "value": answer}],
        })
    return root, records
