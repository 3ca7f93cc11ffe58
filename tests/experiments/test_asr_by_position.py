"""The misclassification diagnostic: ASR w/t grouped by where the source object sits."""

from __future__ import annotations

import random

import pytest

from disp.config import FinetuneConfig, SamplerConfig
from disp.shapes import GRIDS, ShapesConfig, caption, sample_scene
from experiments.diagnostics.asr_by_position import (
    asr_by_position,
    cell_report,
    main,
    source_position,
    token_cells,
)
from experiments.reproduce import ReproduceConfig, reproduce

POSITIONS = GRIDS[3]


def test_source_position_reads_the_dog_of_a_caption():
    assert source_position("There are two objects: a red box at the top middle and a blue dog at the top left.",
                           POSITIONS) == "top left"
    assert source_position("There is one object: a green dog at the middle right.", POSITIONS) == "middle right"
    with pytest.raises(ValueError, match="no 'dog' with a position"):
        source_position("There is one object: a red boat at the center.", POSITIONS)


def test_source_position_of_generated_captions():
    rng = random.Random(0)
    cfg = ShapesConfig(grid=3, categories=("dog", "ball", "box"))
    seen = 0
    for _ in range(50):
        scene = sample_scene(cfg, rng)
        dog = [o.position for o in scene.objects if o.category == "dog"]
        if dog:
            assert source_position(caption(scene), cfg.positions) == dog[0]
            seen += 1
    assert seen > 10


def test_token_cells_of_a_2x2_grid_on_6x6_tokens():
    cells = token_cells(6, 2)
    assert cells[:6] == [0, 0, 0, 1, 1, 1] and cells[30:] == [2, 2, 2, 3, 3, 3]
    assert [cells.count(k) for k in range(4)] == [9, 9, 9, 9]
    assert token_cells(4, 2) == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_hits_are_grouped_by_position():
    refs = ["a red dog at the top left.", "a red dog at the top left.", "a blue dog at the center.",
            "a blue dog at the bottom right."]
    answers = ["There is a red boat at the top left.", "There is a red dog.", "boats everywhere", "a dog."]
    res = asr_by_position(refs, answers, POSITIONS)
    assert list(res) == ["top left", "center", "bottom right"]  # grid order, empty cells left out
    assert res["top left"] == {"n": 2, "hits": 1, "asr": 0.5}
    assert res["center"]["hits"] == 1 and res["bottom right"]["hits"] == 0
    with pytest.raises(ValueError, match="2 references but 1 answers"):
        asr_by_position(refs[:2], answers[:1], POSITIONS)


def test_report_on_a_misclassification_cell(tiny_dir, tmp_path, capsys):
    cfg = ReproduceConfig(base=str(tiny_dir), targets=("misclassification",), triggers=("corner",), trigger_targets=(),
                          defenses=("none",), n_train=20, n_asr=4, n_cp=2, implant=FinetuneConfig(epochs=1, batch_size=8),
                          sampler=SamplerConfig(8, 8, 8), poison_sweep=(), mask_sweep=())
    reproduce(cfg, tmp_path, log=lambda _: None)
    res = cell_report(tmp_path / "misclassification-corner-p0.2", tiny_dir)
    assert res["samples"] == 4 and sum(g["n"] for g in res["by_position"].values()) == 4
    assert res["asr_wt"] == sum(g["hits"] for g in res["by_position"].values()) / 4
    shift = res["feature_shift_by_position"]
    assert list(shift) == list(GRIDS[3]) and all(v >= 0 for v in shift.values())
    assert res["trigger_tokens"] == [0]  # the tiny model's 14 px tokens: the corner patch sits in token 0
    assert main([str(tmp_path / "missing")]) == 2
    assert "no backdoored/projector.safetensors" in capsys.readouterr().err
