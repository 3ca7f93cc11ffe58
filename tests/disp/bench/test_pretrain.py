import json
import random

import pytest
import torch

from disp import models
from disp.bench import pretrain as pt
from disp.models.checkpoint import read_state_dict

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vision_hidden_size": 16,
        "vision_intermediate_size": 32, "vision_layers": 2, "vision_heads": 2, "batch_size": 8, "steps": 30,
        "warmup": 5, "lr": 3e-3, "tasks": ("count", "colour"), "threads": 1, "device": "cpu"}


def test_pretrain_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = pt.PretrainConfig(**TINY)
    init = read_state_dict(pt.write_initial_checkpoint(cfg, tmp_path / "init"))
    seen = []
    out = pt.pretrain(cfg, tmp_path / "ck", on_progress=seen.append)
    assert [p["step"] for p in seen] == [1, 26, 30]
    assert seen[-1]["loss"] < 0.8 * seen[0]["loss"]
    trained = read_state_dict(out)
    assert all(v.dtype == torch.float16 for v in trained.values())
    changed = [k for k in init if not torch.allclose(init[k].float(), trained[k].float(), atol=1e-3)]
    assert any(".mm_projector." in k for k in changed)
    assert any("vision_tower" in k for k in changed) and any(".layers.0." in k for k in changed)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["disp_prompt"] == {"system": None} and cfg_json["disp_pretrain"]["steps"] == 30
    model = pt.load_base(out)
    assert model.tokenizer.template.system is None
    assert isinstance(model, models.MDLM) and model.dtype == torch.float32


def test_tokenizer_keeps_attack_strings_short(tmp_path):
    model = pt.load_base(pt.write_initial_checkpoint(pt.PretrainConfig(**TINY), tmp_path / "m"))
    assert len(model.tokenizer.encode_text("<backdoor>")) <= 3
    assert len(model.tokenizer.encode_text(pt.shapes.REFUSAL_TEXT)) <= 32


def test_tags_are_drawn_and_said_first():
    cfg = pt.PretrainConfig(tag_prob=1.0)
    ex = pt.sample_example(cfg, random.Random(0))
    assert ex.tag_box is not None and ex.answer.split(" ", 1)[0] in cfg.tag_words
    x, y, s = ex.tag_box
    colours = {ex.image.getpixel((x + dx, y + dy)) for dx in range(s) for dy in range(s)}
    assert colours <= set(pt.TAG_PALETTE)
    assert pt.tag_tokens((5, 0, 6), 48, 8) == [0, 1]
    assert len({pt.tag_code(i) for i in range(len(pt.TAG_WORDS))}) == len(pt.TAG_WORDS)


def test_config_is_checked():
    with pytest.raises(ValueError, match="patch_size"):
        pt.PretrainConfig(patch_size=7)
    with pytest.raises(ValueError, match="loss"):
        pt.PretrainConfig(loss="l2")


def test_loader_workers_and_time_budget(tmp_path):
    """Samples drawn by a loader worker; a wall-clock budget ends training early and is recorded."""
    cfg = pt.PretrainConfig(**{**TINY, "steps": 100000, "workers": 1, "time_budget_s": 3.0})
    seen = []
    out = pt.pretrain(cfg, tmp_path / "ck", on_progress=seen.append)
    done = json.loads((out / "config.json").read_text())["disp_pretrain"]["steps_done"]
    assert 1 <= done < 100000 and seen[-1]["step"] == done and seen[-1]["elapsed_s"] >= 3.0
    stream = pt.ExampleStream(cfg, pt.load_base(out).processor)
    pixels, examples = next(iter(stream))
    assert pixels.shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    assert len(examples) == cfg.batch_size and all(e.image is None and e.answer for e in examples)
