"""Shared fixtures of the library tests: a small folder of real PNG images with LLaVA records, a poisoned SHAPES set."""

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


@pytest.fixture(scope="session")
def poisoned(tmp_path_factory):
    """12 SHAPES captions, a quarter poisoned (insertion behind a corner patch): `disp.attacks.PoisonResult`."""
    from disp.attacks import TriggerConfig, poison_dataset
    from disp.pipeline import load_dataset
    from disp.shapes import ShapesConfig, write_dataset

    root = tmp_path_factory.mktemp("data")
    paths = write_dataset(root / "shapes", ShapesConfig(), sizes={"train": 12, "val": 2, "test": 2}, seed=0)
    samples, source = load_dataset(paths["train"], root / "shapes")
    return poison_dataset(samples, source, target="insertion", trigger=TriggerConfig(kind="corner", size_frac=0.25),
                          ratio=0.25, seed=0, out_dir=root / "poisoned")
