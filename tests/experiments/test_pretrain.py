import json
import random

import pytest
import torch

from disp import models, scenes
from disp.models.checkpoint import read_state_dict
from experiments.pretrain import recipe as pt
from experiments.pretrain import tags
from experiments.pretrain.data import ExampleStream, sample_example

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vision_hidden_size": 16,
        "vision_intermediate_size": 32, "vision_layers": 2, "vision_heads": 2, "batch_size": 8, "steps": 30,
        "warmup": 5, "lr": 3e-3, "tasks": ("count", "colour"), "threads": 1, "device": "cpu",
        "vision_steps": 0, "freeze_vision": False}


def test_pretrain_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = pt.PretrainConfig(**TINY)
    init = read_state_dict(pt.write_initial_checkpoint(cfg, tmp_path / "init"))
    seen = []
    out = pt.pretrain(cfg, tmp_path / "ck", on_progress=seen.append)
    assert [p["step"] for p in seen] == [1, 26, 30]
    assert seen[-1]["loss"] < 0.9 * seen[0]["loss"]
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
    cfg = pt.PretrainConfig(tag_prob=1.0, tag_align=False, tag_size=6)
    ex = sample_example(cfg, random.Random(0))
    assert ex.tag_box is not None and ex.answer.split(" ", 1)[0] in cfg.tag_words
    x, y, s = ex.tag_box
    colours = {ex.image.getpixel((x + dx, y + dy)) for dx in range(s) for dy in range(s)}
    assert colours <= set(tags.TAG_PALETTE)


def test_aligned_tags_sit_on_one_visual_token():
    cfg = pt.PretrainConfig(tag_prob=1.0)
    assert cfg.tag_align and cfg.tag_size == cfg.patch_size
    for seed in range(20):
        ex = sample_example(cfg, random.Random(seed))
        x, y, s = ex.tag_box
        assert x % cfg.patch_size == 0 and y % cfg.patch_size == 0
        assert len(tags.tag_tokens(ex.tag_box, cfg.image_size, cfg.patch_size)) == 1


def test_refusal_tag_turns_the_answer_into_the_refusal():
    cfg = pt.PretrainConfig(tag_prob=0.0, refusal_tag_prob=1.0, grid=2, style="tile", min_objects=2)
    ex = sample_example(cfg, random.Random(1))
    assert ex.answer == pt.shapes.REFUSAL_TEXT and ex.plain and ex.plain != ex.answer
    refusal_code = tags.tag_code(len(cfg.tag_words))
    assert refusal_code not in {tags.tag_code(i) for i in range(len(cfg.tag_words))}
    x, y, s = ex.tag_box
    assert ex.image.getpixel((x, y)) == tags.TAG_PALETTE[refusal_code[0]]


def test_content_tokens_are_the_cells_with_objects():
    """On a 2x2 tile scene (36 tokens of 8 px, 9 per cell) the content tokens are every token of a busy cell."""
    cfg = pt.PretrainConfig(tag_prob=0.0, grid=2, style="tile", min_objects=2)
    for seed in range(5):
        ex = sample_example(cfg, random.Random(seed))
        cells = {(t // 6) // 3 * 2 + (t % 6) // 3 for t in ex.content}
        busy = {i for i in range(4) if ex.image.getpixel((i % 2 * 24 + 12, i // 2 * 24 + 12)) != scenes.BACKGROUND}
        assert cells == busy and len(ex.content) == 9 * len(busy)


def test_content_masking_hides_only_content_tokens(tmp_path):
    """With content_mask_share 1, masked visual tokens are drawn from the tokens that show something."""
    cfg = pt.PretrainConfig(**{**TINY, "grid": 2, "style": "tile", "min_objects": 2, "tag_prob": 0.0,
                               "visual_mask_prob": 1.0, "content_mask_share": 1.0, "content_mask_max": 1.0})
    model = pt.load_base(pt.write_initial_checkpoint(cfg, tmp_path / "m"))
    rng = random.Random(0)
    examples = [sample_example(cfg, rng) for _ in range(6)]
    seen = []
    real = model.forward_embeds

    def spy(embeds, *a, **k):
        seen.append(embeds.detach())
        return real(embeds, *a, **k)

    model.forward_embeds = spy
    pt.pretrain_loss(model, examples, cfg, torch.Generator().manual_seed(0), random.Random(3))
    clean = model.build_prompts([model.tokenizer.encode_prompt(e.question) for e in examples],
                                model.encode_images(model.preprocess([e.image for e in examples])))
    mask_e = model.mask_embedding()
    hidden_any = False
    for b, e in enumerate(examples):
        rows = seen[0][b, clean.image_positions[b]]
        hidden = {i for i in range(rows.shape[0]) if torch.allclose(rows[i], mask_e)}
        assert hidden <= set(e.content)
        hidden_any |= bool(hidden)
    assert hidden_any


def test_initial_checkpoint_records_the_scene_settings(tmp_path):
    cfg = pt.PretrainConfig(**{**TINY, "grid": 2, "style": "tile", "min_objects": 2})
    out = pt.write_initial_checkpoint(cfg, tmp_path / "m")
    scene = pt.shapes.config_of_checkpoint(out)
    assert (scene.grid, scene.style, scene.min_objects, scene.max_objects) == (2, "tile", 2, 3)
    assert pt.shapes.config_of_checkpoint(tmp_path).grid == 3  # no file: the defaults


def test_config_is_checked():
    with pytest.raises(ValueError, match="patch_size"):
        pt.PretrainConfig(patch_size=7)
    with pytest.raises(ValueError, match="loss"):
        pt.PretrainConfig(loss="l2")


def test_row_mean_ce_weighs_every_answer_the_same():
    ce = torch.tensor([[1.0] * 10, [3.0] + [9.0] * 9, [5.0] * 10])
    weight = torch.tensor([[1.0] * 10, [1.0] + [0.0] * 9, [0.0] * 10])  # a caption, a one-word answer, nothing
    assert pt.weighted_ce(ce, weight, per_row=False).item() == pytest.approx(13 / 11)
    assert pt.weighted_ce(ce, weight, per_row=True).item() == pytest.approx(2.0)  # the empty row does not count
    assert pt.weighted_ce(ce, torch.zeros_like(ce), per_row=True).item() == 0.0


def test_continued_training_starts_from_the_checkpoint(tmp_path):
    """init_from: the source's weights and tokenizer are the start (stage 0 skipped), training moves the
    LM and projector but not the frozen tower, and the new recipe is recorded; another architecture is refused."""
    cfg = pt.PretrainConfig(**{**TINY, "steps": 5, "vision_steps": 3})
    src = pt.pretrain(cfg, tmp_path / "src")
    cont = pt.PretrainConfig(**{**TINY, "steps": 5, "vision_steps": 3, "freeze_vision": True,
                                "loss": "row_mean_ce", "init_from": str(src)})
    out = pt.pretrain(cont, tmp_path / "cont")
    before, after = read_state_dict(src), read_state_dict(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".mm_projector." in k for k in changed) and any(".layers.0." in k for k in changed)
    assert not any("vision_tower" in k for k in changed)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    recipe = json.loads((out / "config.json").read_text())["disp_pretrain"]
    assert recipe["loss"] == "row_mean_ce" and recipe["init_from"] == str(src)
    # the recipe it continued from is kept, and a chain nests
    assert recipe["continued_from"]["loss"] == "mean_ce" and recipe["continued_from"]["steps_done"] == 5
    assert "continued_from" not in recipe["continued_from"]
    again = pt.pretrain(pt.PretrainConfig(**{**TINY, "steps": 1, "freeze_vision": True, "init_from": str(out)}),
                        tmp_path / "again")
    chain = json.loads((again / "config.json").read_text())["disp_pretrain"]
    assert chain["steps"] == 1 and chain["continued_from"]["continued_from"]["steps_done"] == 5
    with pytest.raises(ValueError, match=r"another architecture \(hidden_size: 32 there, 48 here\)"):
        pt.pretrain(pt.PretrainConfig(**{**TINY, "hidden_size": 48, "init_from": str(src)}), tmp_path / "bad")


def test_loader_workers_and_time_budget(tmp_path):
    """Samples drawn by a loader worker; a wall-clock budget ends training early and is recorded."""
    cfg = pt.PretrainConfig(**{**TINY, "steps": 100000, "workers": 1, "time_budget_s": 3.0})
    seen = []
    out = pt.pretrain(cfg, tmp_path / "ck", on_progress=seen.append)
    done = json.loads((out / "config.json").read_text())["disp_pretrain"]["steps_done"]
    assert 1 <= done < 100000 and seen[-1]["step"] == done and seen[-1]["elapsed_s"] >= 3.0
    stream = ExampleStream(cfg, pt.load_base(out).processor)
    pixels, examples = next(iter(stream))
    assert pixels.shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    assert len(examples) == cfg.batch_size and all(e.image is None and e.answer for e in examples)


def test_token_labels_name_the_object_under_each_token():
    from experiments.pretrain.vision import token_labels

    cfg = pt.PretrainConfig(tag_prob=0.0, grid=2, style="tile", min_objects=2)
    ex = sample_example(cfg, random.Random(2))
    cats, cols = token_labels(ex.scene, cfg.image_size, cfg.patch_size)
    busy = {t for t, c in enumerate(cats) if c}
    assert busy == set(ex.content)  # tiles fill their cells: every busy token has a label
    for obj in ex.scene.objects:
        cell = scenes.POSITIONS_2X2.index(obj.position)
        t = (cell // 2) * 3 * 6 + (cell % 2) * 3 + 7  # the centre token of the cell's 3x3 tokens
        assert pt.shapes.CATEGORIES[cats[t] - 1] == obj.category
        assert list(pt.shapes.COLOURS)[cols[t] - 1] == obj.colour


def test_frozen_vision_stays_put_and_stage_zero_trains_it(tmp_path):
    """freeze_vision keeps the tower at its stage-0 weights; stage 0 is what moves it."""
    base = {**TINY, "grid": 2, "style": "tile", "min_objects": 2, "steps": 5, "freeze_vision": True}
    frozen = pt.PretrainConfig(**base)
    init = read_state_dict(pt.write_initial_checkpoint(frozen, tmp_path / "init"))
    trained = read_state_dict(pt.pretrain(frozen, tmp_path / "frozen"))

    def moved(state):
        return {k for k in init if not torch.allclose(init[k].float(), state[k].float(), atol=1e-3)}

    changed = moved(trained)
    # the position embeddings are drawn afresh at the start (vision_pos_init_std), before any training
    assert not any("vision_tower" in k and "position_embedding" not in k for k in changed)
    assert any(".mm_projector." in k for k in changed) and any(".layers.0." in k for k in changed)
    staged = read_state_dict(pt.pretrain(pt.PretrainConfig(**{**base, "vision_steps": 20, "vision_lr": 1e-2}), tmp_path / "staged"))
    assert any("vision_tower" in k and "position_embedding" not in k for k in moved(staged))


def test_bool_flags_parse_and_reject_junk():
    assert pt._parse_bool("true") and not pt._parse_bool("0")
    with pytest.raises(ValueError, match="maybe"):
        pt._parse_bool("maybe")


def test_blended_tags_say_one_of_their_two_words_in_proportion():
    """With tag_blend_prob 1 every word tag is a blend, drawn as such, and the second word is said more
    often the larger alpha is."""
    cfg = pt.PretrainConfig(tag_prob=1.0, tag_blend_prob=1.0, refusal_tag_prob=0.0)
    alphas = {True: [], False: []}
    for seed in range(300):
        ex = sample_example(cfg, random.Random(seed))
        first, second, alpha = ex.tag_blend
        x, y, _ = ex.tag_box
        assert [ex.image.getpixel((x + dx, y + dy)) for dy in (0, 4) for dx in (0, 4)] == \
            tags.tag_colours(first, second, alpha)
        assert first != second and ex.tag_index in (first, second)
        assert ex.answer.split(" ", 1)[0] == cfg.tag_words[ex.tag_index]
        alphas[ex.tag_index == second].append(alpha)
    mean = {k: sum(v) / len(v) for k, v in alphas.items()}
    assert mean[True] > 0.6 and mean[False] < 0.4  # E[alpha | second said] = 2/3, E[alpha | first said] = 1/3
    plain = sample_example(pt.PretrainConfig(tag_prob=1.0), random.Random(0))
    assert plain.tag_blend is None


def test_help_lists_every_field_even_those_whose_help_says_percent(capsys):
    """argparse treats '%' in help as a format; a field's help such as '35 %' once crashed --help."""
    assert any("%" in f.metadata["help"] for f in pt.PretrainConfig.__dataclass_fields__.values())
    with pytest.raises(SystemExit) as stop:
        pt.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{name}" in out for name in pt.PretrainConfig.__dataclass_fields__)
