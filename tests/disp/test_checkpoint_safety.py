"""A checkpoint is read only from its own directory: index shard names are plain names, links may not
leave the directory; `models.check` compares tensor shapes with config.json without loading weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from disp import models
from disp.models.checkpoint import INDEX_FILE, CheckpointError, read_state_dict


def copy_dir(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def rewrite_index(folder: Path, shard_name) -> None:
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"] = {k: shard_name(v) for k, v in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps(index))


def header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})  # noqa: SIM118
    return shapes


@pytest.mark.parametrize("how", ["dotdot", "absolute", "subfolder"])
def test_index_cannot_name_another_checkpoints_shards(tiny_dir, tmp_path, how):
    victim = copy_dir(tiny_dir, tmp_path / "victim")
    attacker = copy_dir(tiny_dir, tmp_path / "attacker")
    names = {
        "dotdot": lambda s: f"../victim/{s}",
        "absolute": lambda s: str(victim / s),
        "subfolder": lambda s: f"sub/{s}",
    }
    rewrite_index(attacker, names[how])
    with pytest.raises(CheckpointError, match="shard name .*plain file name"):
        read_state_dict(attacker)
    with pytest.raises(CheckpointError):
        models.load(attacker)


def test_links_may_not_leave_the_checkpoint(tiny_dir, tmp_path):
    victim = copy_dir(tiny_dir, tmp_path / "victim")
    attacker = copy_dir(tiny_dir, tmp_path / "attacker")
    shard = next(attacker.glob("model-*.safetensors"))
    shard.unlink()
    os.symlink(victim / shard.name, shard)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        read_state_dict(attacker)
    shard.unlink()  # a link inside the directory is fine
    (attacker / "real.bin.safetensors").write_bytes((victim / shard.name).read_bytes())
    os.symlink(attacker / "real.bin.safetensors", shard)
    assert read_state_dict(attacker).keys() == read_state_dict(tiny_dir).keys()


def test_single_file_link_outside_is_refused(tiny_dir, tmp_path):
    state_dir = tmp_path / "single"
    state_dir.mkdir()
    os.symlink(next(tiny_dir.glob("model-*.safetensors")), state_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        read_state_dict(state_dir)


def test_check_compares_shapes_with_the_config_without_loading(tiny_dir):
    shapes = header_shapes(tiny_dir)
    assert models.check(tiny_dir, shapes) == "llada-v"
    name = next(k for k in shapes if k.startswith("model.mm_projector."))
    with pytest.raises(CheckpointError, match=f"shape mismatches .*{name}"):
        models.check(tiny_dir, {**shapes, name: (3, 3)})
    missing = dict(shapes)
    missing.pop(name)
    with pytest.raises(CheckpointError, match="missing keys"):
        models.check(tiny_dir, missing)
    with pytest.raises(CheckpointError, match="unexpected keys .*extra.weight"):
        models.check(tiny_dir, {**shapes, "extra.weight": (1,)})
    projector = {k: v for k, v in shapes.items() if k.startswith("model.mm_projector.")}
    assert models.check(tiny_dir, projector, projector_only=True) == "llada-v"
    with pytest.raises(CheckpointError, match="only model.mm_projector"):
        models.check(tiny_dir, shapes, projector_only=True)


def test_check_refuses_a_missing_tokenizer(tiny_dir, tmp_path):
    folder = copy_dir(tiny_dir, tmp_path / "notok")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        models.check(folder, header_shapes(folder))


def test_check_handles_lavida(tmp_path):
    from disp.models.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "lavida", family="lavida", seed=0)
    assert models.check(folder, header_shapes(folder)) == "lavida"
