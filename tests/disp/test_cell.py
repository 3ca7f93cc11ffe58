"""A SHAPES backdoor cell's caches: built once, refused when made with other settings, movable."""

from __future__ import annotations

import json

import pytest

from disp.cell import CellConfig, build_data, check_cell_settings
from disp.shapes import config_of_checkpoint


def test_a_cell_built_with_other_settings_is_refused(tmp_path):
    cell = tmp_path / "insertion-corner-p0.2"
    check_cell_settings(cell, tmp_path / "base", CellConfig(seed=1))
    check_cell_settings(cell, tmp_path / "base", CellConfig(seed=1, batch_size=4))  # batch: same cell
    with pytest.raises(ValueError, match=r"other settings \(seed: 1, now 2; train_tasks: \['describe'\], now "
                                         r"\['count'\]\); use another work"):
        check_cell_settings(cell, tmp_path / "base", CellConfig(seed=2, train_tasks=("count",)))
    assert json.loads((cell / "settings.json").read_text())["seed"] == 1  # the stored record is kept


def test_a_work_dir_can_be_moved(tiny_dir, tmp_path):
    """The data record names its files relative to its folder, so a moved work dir is reused where it now is."""
    shapes = config_of_checkpoint(tiny_dir)
    cfg = CellConfig(n_train=6, n_asr=2, n_cp=2, seed=1)
    build_data(tmp_path / "a" / "data-insertion", "insertion", tiny_dir, cfg, shapes)
    (tmp_path / "a").rename(tmp_path / "b")
    root = tmp_path / "b" / "data-insertion"
    paths = build_data(root, "insertion", tiny_dir, cfg, shapes)
    assert set(paths) == {"train", "asr", "cp"}
    assert all(p.is_file() and p.parent == root for p in paths.values())
    assert not (tmp_path / "a").exists()


def test_a_cache_without_a_settings_record_is_refused(tiny_dir, tmp_path):
    old = tmp_path / "data-insertion"
    old.mkdir()
    (old / "done.json").write_text("{}")  # a cache from before settings were recorded
    with pytest.raises(ValueError, match="data built without a settings record"):
        build_data(old, "insertion", tiny_dir, CellConfig(n_train=10), config_of_checkpoint(tiny_dir))


def test_a_record_older_than_a_new_field_reads_as_that_fields_old_behaviour(tmp_path):
    """FinetuneConfig.bf16_cpu came after cells were cached: a record without it is an implant in float32."""
    from dataclasses import asdict

    from disp.cell import check_settings
    from disp.config import FinetuneConfig

    implant = asdict(FinetuneConfig())
    old = {k: v for k, v in implant.items() if k != "bf16_cpu"}
    (tmp_path / "settings.json").write_text(json.dumps({"seed": 1, "implant": old}))
    check_settings(tmp_path, {"seed": 1, "implant": implant}, what="an implant")  # accepted
    with pytest.raises(ValueError, match="bf16_cpu"):
        check_settings(tmp_path, {"seed": 1, "implant": {**implant, "bf16_cpu": True}}, what="an implant")
