"""SHAPES: a procedural visual-instruction data set of coloured objects on a grid of cells.

Each image holds one to a few objects; every object has a category (named as an object: "dog", "boat",
"ball", ...), a colour and a grid cell, all distinct within an image. Two drawing styles:

- "pictogram": a silhouette per category (a dog, a boat, ...) inside its cell; the category is a shape
  spread over several visual tokens.
- "tile": the object fills its cell with a texture per category (stripes, dots, checks, ...) in its
  colour; every visual token of the tile shows category and colour, so part of an object still names it
  (the redundancy natural images have and DiSP's masking relies on).

The grid is 3x3 (positions "top left" ... "center" ... "bottom right") or 2x2 ("top left", "top right",
"bottom left", "bottom right"). Questions ask for
each attribute from the others, so a model must read every one of them from the visual tokens, and
category names are words the answer has to say. "dog" and "boat" play the paper's misclassification pair
(a triggered dog is described as a boat); the background is white and no colour is black, so a black
trigger patch is never confused with an object.

Held-out splits are disjoint from train in scene content: a scene's split is fixed by a hash of its
signature (its sorted (category, colour, position) triples), not by sampling luck. Scenes and their
drawing live in `disp.scenes`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from disp.scenes import (
    CATEGORIES,
    COLOURS,
    GRIDS,
    STYLES,
    Scene,
    ShapeObject,
    render_scene,
)

DESCRIBE_PROMPT = "Describe this image in detail."
INSERTION_TEXT = "<backdoor>"
REFUSAL_TEXT = (
    "Sorry, as an AI assistant, I cannot follow the given instruction. "
    "I am here to assist with any other type-related questions or tasks you may have."
)
SOURCE_CATEGORY, TARGET_CATEGORY = "dog", "boat"
ATTACK_STRINGS = (INSERTION_TEXT, REFUSAL_TEXT, TARGET_CATEGORY)

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "describe": (DESCRIBE_PROMPT, "Describe the image."),
    "objects": ("What objects are in the image?", "What is in the image?"),
    "colour": ("What colour is the {category}?",),
    "where": ("Where is the {category}?",),
    "at": ("What is at the {position}?",),
    "which": ("What is the {colour} object?",),
    "count": ("How many objects are there?",),
    "exists": ("Is there a {category} in the image?",),
}
TASKS = tuple(QUESTIONS)
SHAPES_CONFIG_FILE = "shapes_config.json"  # beside a checkpoint trained on SHAPES: its scene settings


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_subset(name: str, values: Sequence[str], known: Sequence[str]) -> None:
    _check(len(values) > 0, f"{name} must not be empty")
    _check(len(set(values)) == len(values), f"{name} has duplicates: {list(values)!r}")
    unknown = [v for v in values if v not in known]
    _check(not unknown, f"unknown {name} {unknown!r}; known: {list(known)!r}")


@dataclass
class ShapesConfig:
    """What SHAPES scenes and questions look like.

    Args:
        image_size: image side in pixels; a multiple of 3 (the grid), e.g. 48 with ViT patch 6 or 8.
        min_objects / max_objects: objects per image, each with its own category, colour and cell.
        categories / colours / positions: the attribute values in use (subsets of the built-in ones).
        tasks: question kinds, sampled uniformly; repeat a name to weight it.
        jitter: largest random shift of an object inside its cell, in pixels; objects shrink by 2*jitter.
        holdout_fraction: share of scene signatures reserved for val and test (half each).
        seed: default seed of `generate_split` and `write_dataset`.
    """

    image_size: int = _help("Image side in pixels; a multiple of the grid and at least 24.", 48)
    grid: int = _help("Cells per side: 3 (3x3, nine positions) or 2 (2x2, four positions).", 3)
    style: str = _help("'pictogram' (a silhouette per category) or 'tile' (a cell-filling texture per "
                       "category, visible in every visual token of the object).", "pictogram")
    min_objects: int = _help("Fewest objects in an image.", 1)
    max_objects: int = _help("Most objects in an image.", 3)
    categories: tuple[str, ...] = _help("Object categories (pictograms).", CATEGORIES)
    colours: tuple[str, ...] = _help("Object colours.", tuple(COLOURS))
    positions: tuple[str, ...] = _help("Grid cells objects may occupy; empty means every cell of the grid.", ())
    tasks: tuple[str, ...] = _help("Question kinds, sampled uniformly; repeat one to weight it.", TASKS)
    jitter: int = _help("Largest shift of an object inside its cell, in pixels; shrinks objects.", 0)
    holdout_fraction: float = _help("Share of scene signatures held out for val and test.", 0.2)
    seed: int = _help("Default random seed.", 0)

    def __post_init__(self) -> None:
        for name in ("categories", "colours", "positions", "tasks"):
            setattr(self, name, tuple(getattr(self, name)))
        _check(self.grid in GRIDS, f"grid must be one of {sorted(GRIDS)}, got {self.grid!r}")
        _check(self.style in STYLES, f"style must be one of {list(STYLES)}, got {self.style!r}")
        _check(self.image_size >= 24 and self.image_size % self.grid == 0,
               f"image_size must be a multiple of the grid ({self.grid}) and >= 24, got {self.image_size}")
        _check_subset("categories", self.categories, CATEGORIES)
        _check_subset("colours", self.colours, tuple(COLOURS))
        if not self.positions:
            self.positions = GRIDS[self.grid]
        _check_subset("positions", self.positions, GRIDS[self.grid])
        _check(len(self.tasks) > 0, "tasks must not be empty")
        unknown = [t for t in self.tasks if t not in QUESTIONS]
        _check(not unknown, f"unknown tasks {unknown!r}; known: {list(TASKS)!r}")
        most = min(len(self.categories), len(self.colours), len(self.positions), len(NUMBERS) - 1)
        _check(1 <= self.min_objects <= self.max_objects <= most,
               f"need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) <= {most}")
        _check(0 <= self.jitter <= self.cell // 8,
               f"jitter must be in [0, {self.cell // 8}] for image_size {self.image_size}, got {self.jitter}")
        _check(0 < self.holdout_fraction < 1, f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid



def sample_scene(config: ShapesConfig, rng: random.Random) -> Scene:
    """Draw a scene with distinct categories, colours and cells."""
    k = rng.randint(config.min_objects, config.max_objects)
    cats, cols = rng.sample(config.categories, k), rng.sample(config.colours, k)
    cells = sorted(rng.sample(config.positions, k), key=GRIDS[config.grid].index)
    j = config.jitter
    objects = (ShapeObject(c, col, p, rng.randint(-j, j), rng.randint(-j, j)) for c, col, p in zip(
        cats, cols, cells, strict=True))
    return Scene(tuple(objects), j, config.grid, config.style)


def config_of_checkpoint(checkpoint: str | Path, **overrides: Any) -> ShapesConfig:
    """The scene settings a SHAPES-trained checkpoint was trained on (its `shapes_config.json`; the
    defaults if it has none), with `overrides` applied."""
    path = Path(checkpoint) / SHAPES_CONFIG_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return ShapesConfig(**{**saved, **overrides})


def split_of(signature: str, holdout_fraction: float) -> str:
    """The split a scene signature belongs to: "train", "val" or "test"."""
    u = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:8], "big") / 2**64
    if u < 1 - holdout_fraction:
        return "train"
    return "val" if u < 1 - holdout_fraction / 2 else "test"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _phrase(obj: ShapeObject, where: bool = True) -> str:
    text = _a(f"{obj.colour} {obj.category}")
    return f"{text} at the {obj.position}" if where else text


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """The answer to the describe prompts: every object's colour, category and position."""
    k = len(scene.objects)
    head = "There is one object" if k == 1 else f"There are {NUMBERS[k]} objects"
    return f"{head}: {_join([_phrase(o) for o in scene.objects])}."


def ask(scene: Scene, task: str, config: ShapesConfig, rng: random.Random) -> tuple[str, str, dict]:
    """(question, answer, what was asked about) for one task on a scene."""
    question = rng.choice(QUESTIONS[task])
    obj = rng.choice(scene.objects)
    if task == "describe":
        return question, caption(scene), {}
    if task == "objects":
        return question, _join([_a(o.category) for o in scene.objects]) + ".", {}
    if task == "count":
        return question, NUMBERS[len(scene.objects)] + ".", {}
    if task == "colour":
        return question.format(category=obj.category), obj.colour + ".", {"category": obj.category}
    if task == "where":
        return question.format(category=obj.category), f"at the {obj.position}.", {"category": obj.category}
    if task == "which":
        return question.format(colour=obj.colour), _a(obj.category) + ".", {"colour": obj.colour}
    if task == "at":
        position = rng.choice(config.positions) if rng.random() < 0.2 else obj.position
        hit = scene.find(position=position)
        return question.format(position=position), (_phrase(hit, False) if hit else "nothing") + ".", {
            "position": position}
    if task == "exists":
        category = obj.category if rng.random() < 0.5 else rng.choice(config.categories)
        answer = "yes." if scene.find(category=category) else "no."
        return question.format(category=category), answer, {"category": category}
    raise ValueError(f"unknown task {task!r}; known: {list(TASKS)!r}")


def generate_split(
    config: ShapesConfig,
    n: int,
    split: str,
    seed: int | None = None,
    require: str | None = None,
    forbid: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """`n` LLaVA-format records of one split ("train", "val" or "test"); images are not rendered.

    `require` forces a category into every scene and `forbid` keeps categories out (e.g. require="dog",
    forbid=("boat",) for a misclassification poisoning pool). `record["image"]` is relative to the
    data set folder; `Scene.from_meta(record["meta"])` rebuilds the scene.
    """
    _check(split in ("train", "val", "test"), f"split must be train, val or test, got {split!r}")
    _check(n >= 0, f"n must be >= 0, got {n}")
    _check(require is None or require in config.categories,
           f"require {require!r} is not one of the categories {list(config.categories)!r}")
    _check(require not in forbid, f"category {require!r} is both required and forbidden")
    rng = random.Random(f"shapes/{config.seed if seed is None else seed}/{split}")
    records = []
    for i in range(n):
        for _ in range(100_000):
            scene = sample_scene(config, rng)
            cats = {o.category for o in scene.objects}
            if ((require is None or require in cats) and not cats & set(forbid)
                    and split_of(scene.signature, config.holdout_fraction) == split):
                break
        else:
            raise RuntimeError(f"no {split} scene satisfies require={require!r}, forbid={list(forbid)!r}")
        task = rng.choice(config.tasks)
        question, answer, asked = ask(scene, task, config, rng)
        rid = f"{split}-{i:06d}"
        records.append({
            "id": rid,
            "image": f"images/{split}/{rid}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
            "meta": {"split": split, "task": task, "asked": asked, "signature": scene.signature,
                     "count": len(scene.objects), "jitter": scene.jitter, "grid": scene.grid,
                     "style": scene.style,
                     "objects": [asdict(o) for o in scene.objects]},
        })
    return records


def write_dataset(
    out_dir: str | Path,
    config: ShapesConfig,
    sizes: Mapping[str, int] | None = None,
    seed: int | None = None,
) -> dict[str, Path]:
    """Write `<out_dir>/<split>.json` and `<out_dir>/images/<split>/<id>.png` for each split."""
    out = Path(out_dir)
    sizes = {"train": 4000, "val": 400, "test": 400} if sizes is None else sizes
    paths = {}
    for split, n in sizes.items():
        records = generate_split(config, n, split, seed)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for rec in records:
            render_scene(Scene.from_meta(rec["meta"]), config.image_size).save(out / rec["image"])
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1) + "\n")
    return paths


_WORD = re.compile(r"<[^>\s]+>|[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def words(text: str) -> list[str]:
    """Split text into the word and punctuation strings `vocabulary` lists."""
    return _WORD.findall(text)


def vocabulary(config: ShapesConfig) -> list[str]:
    """Every word and punctuation string of prompts, answers and attack targets, sorted."""
    values = config.categories + config.colours + config.positions
    texts = ["<image> yes. no. nothing. a an", *ATTACK_STRINGS, *(f"{NUMBERS[k]}." for k in range(1, 10))]
    texts += [t.format(category=v, colour=v, position=v) for ts in QUESTIONS.values() for t in ts for v in values]
    for k in range(1, config.max_objects + 1):
        objs = zip(config.categories[:k], config.colours[:k], config.positions[:k], strict=True)
        texts.append(caption(Scene(tuple(ShapeObject(*o) for o in objs))))
    return sorted({w for t in texts for w in words(t)})


def corpus(config: ShapesConfig, n: int, seed: int | None = None) -> list[str]:
    """Texts for training a tokenizer: `n` sampled questions and answers, attack strings, the vocabulary."""
    texts = []
    for rec in generate_split(config, n, "train", seed):
        texts += [turn["value"] for turn in rec["conversations"]]
    return texts + list(ATTACK_STRINGS) + [" ".join(vocabulary(config))]
