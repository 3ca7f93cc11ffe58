"""SHAPES scenes and the data set built on them: drawing, questions, answers, splits."""

import json
import random

import pytest

from disp import scenes, shapes
from disp.scenes import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    POSITIONS,
    POSITIONS_2X2,
    Scene,
    ShapeObject,
    render_scene,
)
from disp.shapes import (
    ATTACK_STRINGS,
    DESCRIBE_PROMPT,
    TASKS,
    ShapesConfig,
    corpus,
    generate_split,
    vocabulary,
    words,
    write_dataset,
)


def anchor_pixel(obj: ShapeObject, size: int, jitter: int = 0, grid: int = 3,
                 style: str = "pictogram") -> tuple[int, int]:
    """A pixel inside the object's filled area (for a tile: a pixel in its full colour)."""
    x0, y0, side = scenes.object_box(obj, size, jitter, grid)
    if style == "tile":
        texture = scenes._TEXTURES[obj.category]
        return next((x, y) for y in range(y0 + side // 2, y0 + side) for x in range(x0 + side // 2, x0 + side)
                    if texture(x, y))
    ax, ay = scenes.ANCHORS[obj.category]
    return int(x0 + ax * side), int(y0 + ay * side)



def _qa(record):
    human, gpt = record["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n")
    return human["value"].removeprefix("<image>\n"), gpt["value"]


def test_attack_categories_and_prompt_exist():
    cfg = ShapesConfig()
    assert {"dog", "boat"} <= set(cfg.categories)
    assert DESCRIBE_PROMPT in shapes.QUESTIONS["describe"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 50},
        {"image_size": 21},
        {"categories": ("dog", "cat")},
        {"colours": ("red", "red")},
        {"positions": ("center",), "grid": 2},
        {"grid": 4},
        {"style": "sketch"},
        {"image_size": 51, "grid": 2},
        {"tasks": ("poem",)},
        {"min_objects": 0},
        {"max_objects": 7, "colours": ("red", "blue")},
        {"jitter": 5},
        {"holdout_fraction": 1.0},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ShapesConfig(**kwargs)


def test_records_are_deterministic_and_seeded():
    cfg = ShapesConfig()
    a = generate_split(cfg, 50, "train", seed=3)
    assert a == generate_split(cfg, 50, "train", seed=3)
    assert a != generate_split(cfg, 50, "train", seed=4)
    assert json.loads(json.dumps(a)) == a


def test_written_dataset_is_byte_identical(tmp_path):
    cfg = ShapesConfig()
    sizes = {"train": 12, "val": 4, "test": 4}
    p1 = write_dataset(tmp_path / "a", cfg, sizes, seed=1)
    p2 = write_dataset(tmp_path / "b", cfg, sizes, seed=1)
    for split in sizes:
        assert p1[split].read_bytes() == p2[split].read_bytes()
        records = json.loads(p1[split].read_text())
        assert len(records) == sizes[split]
        for rec in records:
            img1 = (tmp_path / "a" / rec["image"]).read_bytes()
            assert img1 == (tmp_path / "b" / rec["image"]).read_bytes()


def test_splits_are_disjoint_in_scene_content():
    cfg = ShapesConfig(max_objects=1)  # few distinct scenes: the strongest test
    sigs = {s: {r["meta"]["signature"] for r in generate_split(cfg, 600, s)} for s in ("train", "val", "test")}
    assert not sigs["train"] & sigs["val"]
    assert not sigs["train"] & sigs["test"]
    assert not sigs["val"] & sigs["test"]
    assert all(sigs.values())


def test_every_attribute_value_and_task_appears():
    cfg = ShapesConfig()
    records = generate_split(cfg, 1500, "train")
    objs = [o for r in records for o in r["meta"]["objects"]]
    assert {o["category"] for o in objs} == set(CATEGORIES)
    assert {o["colour"] for o in objs} == set(COLOURS)
    assert {o["position"] for o in objs} == set(POSITIONS)
    assert {r["meta"]["count"] for r in records} == {1, 2, 3}
    assert {r["meta"]["task"] for r in records} == set(TASKS)
    answers = {_qa(r)[1] for r in records}
    assert {"yes.", "no.", "nothing."} <= answers


def test_scene_attributes_are_distinct_and_in_reading_order():
    for r in generate_split(ShapesConfig(), 300, "val"):
        objs = r["meta"]["objects"]
        for key in ("category", "colour", "position"):
            assert len({o[key] for o in objs}) == len(objs)
        order = [POSITIONS.index(o["position"]) for o in objs]
        assert order == sorted(order)


@pytest.mark.parametrize("size,jitter", [(48, 0), (48, 2), (33, 1), (96, 3)])
def test_rendered_pixels_match_meta(size, jitter):
    cfg = ShapesConfig(image_size=size, jitter=jitter)
    cell = cfg.cell
    for r in generate_split(cfg, 60, "test"):
        scene = Scene.from_meta(r["meta"])
        img = render_scene(scene, cfg.image_size)
        assert img.size == (cfg.image_size, cfg.image_size) and img.mode == "RGB"
        for obj in scene.objects:
            assert img.getpixel(anchor_pixel(obj, cfg.image_size, jitter)) == COLOURS[obj.colour]
        used = {o.position for o in scene.objects}
        for i, pos in enumerate(POSITIONS):
            if pos not in used:
                row, col = divmod(i, 3)
                box = img.crop((col * cell, row * cell, (col + 1) * cell, (row + 1) * cell))
                assert box.getcolors() == [(cell * cell, BACKGROUND)]


def test_each_category_has_its_own_silhouette():
    size = 48
    masks = {}
    for cat in CATEGORIES:
        img = render_scene(Scene((ShapeObject(cat, "red", "center"),)), size).convert("L")
        masks[cat] = [p < 200 for p in img.tobytes()]
    for a in CATEGORIES:
        for b in CATEGORIES:
            if a < b:
                diff = sum(x != y for x, y in zip(masks[a], masks[b], strict=True))
                assert diff >= 20, (a, b, diff)


def test_answers_agree_with_meta():
    cfg = ShapesConfig()
    for r in generate_split(cfg, 800, "train"):
        question, answer = _qa(r)
        meta, scene = r["meta"], Scene.from_meta(r["meta"])
        task, asked = meta["task"], meta["asked"]
        assert answer.endswith(".")
        if task == "describe":
            for o in scene.objects:
                assert f" {o.colour} {o.category} at the {o.position}" in answer
        elif task == "objects":
            assert answer == " and ".join(", ".join(f"a {o.category}" for o in scene.objects).rsplit(", ", 1)) + "."
        elif task == "count":
            assert answer == shapes.NUMBERS[len(scene.objects)] + "."
        elif task == "colour":
            assert answer == scene.find(category=asked["category"]).colour + "."
        elif task == "where":
            assert answer == f"at the {scene.find(category=asked['category']).position}."
        elif task == "which":
            assert answer == f"a {scene.find(colour=asked['colour']).category}."
        elif task == "at":
            hit = scene.find(position=asked["position"])
            article = "an" if hit and hit.colour == "orange" else "a"
            assert answer == (f"{article} {hit.colour} {hit.category}." if hit else "nothing.")
        elif task == "exists":
            assert answer == ("yes." if scene.find(category=asked["category"]) else "no.")
        for value in asked.values():
            assert value in question


def test_caption_wording():
    a = ShapeObject("dog", "red", "top left")
    b = ShapeObject("ball", "blue", "center")
    c = ShapeObject("boat", "green", "bottom right")
    assert shapes.caption(Scene((a,))) == "There is one object: a red dog at the top left."
    d = ShapeObject("tent", "orange", "middle left")
    assert shapes.caption(Scene((d,))) == "There is one object: an orange tent at the middle left."
    assert shapes.caption(Scene((a, b, c))) == (
        "There are three objects: a red dog at the top left, a blue ball at the center "
        "and a green boat at the bottom right."
    )


def test_require_and_forbid():
    cfg = ShapesConfig()
    records = generate_split(cfg, 100, "train", require="dog", forbid=("boat",))
    for r in records:
        cats = {o["category"] for o in r["meta"]["objects"]}
        assert "dog" in cats and "boat" not in cats
    with pytest.raises(ValueError):
        generate_split(cfg, 1, "train", require="dog", forbid=("dog",))
    with pytest.raises(ValueError):
        generate_split(cfg, 1, "holdout")


def test_vocabulary_covers_generated_texts_and_attacks():
    for cfg in (ShapesConfig(), ShapesConfig(max_objects=5, categories=CATEGORIES[:5])):
        vocab = set(vocabulary(cfg))
        texts = corpus(cfg, 1500, seed=random.Random(0).randint(0, 99))
        for rec in generate_split(cfg, 300, "test"):
            texts += [t["value"] for t in rec["conversations"]]
        missing = {w for t in texts for w in words(t)} - vocab
        assert not missing
        assert {"<backdoor>", "boat", "dog", "<image>", "Sorry", "."} <= vocab
        for s in ATTACK_STRINGS:
            assert set(words(s)) <= vocab
        assert len(vocab) < 150


def test_grid_2_uses_its_four_cells():
    cfg = ShapesConfig(grid=2, min_objects=2)
    assert cfg.positions == POSITIONS_2X2 and cfg.cell == 24
    records = generate_split(cfg, 400, "train")
    assert {o["position"] for r in records for o in r["meta"]["objects"]} == set(POSITIONS_2X2)
    assert {r["meta"]["count"] for r in records} == {2, 3}
    for r in records:
        order = [POSITIONS_2X2.index(o["position"]) for o in r["meta"]["objects"]]
        assert order == sorted(order)
        assert r["meta"]["grid"] == 2
    assert set(vocabulary(cfg)) >= {"top", "bottom", "left", "right"}


@pytest.mark.parametrize("grid", [2, 3])
def test_tiles_fill_their_cell_and_leave_the_rest_white(grid):
    cfg = ShapesConfig(grid=grid, style="tile")
    cell = cfg.cell
    for r in generate_split(cfg, 40, "test"):
        scene = Scene.from_meta(r["meta"])
        assert scene.style == "tile" and scene.grid == grid
        img = render_scene(scene, cfg.image_size)
        used = {o.position for o in scene.objects}
        for obj in scene.objects:
            assert img.getpixel(anchor_pixel(obj, cfg.image_size, 0, grid, "tile")) == COLOURS[obj.colour]
            row, col = divmod(cfg.positions.index(obj.position), grid)
            inner = img.crop((col * cell + 1, row * cell + 1, (col + 1) * cell - 1, (row + 1) * cell - 1))
            assert BACKGROUND not in {c for _, c in inner.getcolors()}  # no white inside a tile
        for i, pos in enumerate(cfg.positions):
            if pos not in used:
                row, col = divmod(i, grid)
                box = img.crop((col * cell, row * cell, (col + 1) * cell, (row + 1) * cell))
                assert box.getcolors() == [(cell * cell, BACKGROUND)]


def test_every_token_of_a_tile_tells_its_category():
    """Each 8 px token inside a tile shows a pattern that differs between every pair of categories."""
    size, patch = 48, 8
    tokens = {}
    for cat in CATEGORIES:
        img = render_scene(Scene((ShapeObject(cat, "red", "top left"),), grid=2, style="tile"), size).convert("L")
        for ty in range(3):
            for tx in range(3):
                crop = img.crop((tx * patch, ty * patch, (tx + 1) * patch, (ty + 1) * patch)).tobytes()
                tokens.setdefault((ty, tx), {})[cat] = crop
    for views in tokens.values():
        assert len(set(views.values())) == len(CATEGORIES)
