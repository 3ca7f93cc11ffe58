"""SHAPES pretraining samples (`experiments.pretrain.recipe`): a scene, a task's question and answer, maybe a tag; the
tokenizer's corpus; the endless stream of rendered batches."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image

from disp import shapes
from experiments.pretrain.tags import content_tokens, draw_tag

if TYPE_CHECKING:
    from experiments.pretrain.recipe import PretrainConfig


@dataclass
class Example:
    """`answer` is what the image asks for; `plain` the answer if the tag were not there."""

    image: Image.Image | None
    question: str
    answer: str
    task: str
    tag_box: tuple[int, int, int] | None = None  # (x, y, side) in pixels
    plain: str = ""
    content: tuple[int, ...] = ()  # visual tokens (row-major) showing anything but background
    scene: shapes.Scene | None = None
    tag_index: int | None = None  # the word said; len(tag_words) for the refusal tag
    tag_blend: tuple[int, int, float] | None = None  # (first, second, alpha) of a blended tag


def sample_example(config: PretrainConfig, rng: random.Random, split: str = "train", *,
                   no_tags: bool = False) -> Example:
    """One training sample: a scene of `split`, a task's question and answer, maybe a tag.

    The refusal tag (tag index len(tag_words)) turns the answer into the refusal sentence; any other tag
    prefixes its word. `no_tags` draws no tag at all (the curriculum's first stage).
    """
    scfg = config.shapes_config()
    while True:
        scene = shapes.sample_scene(scfg, rng)
        if shapes.split_of(scene.signature, scfg.holdout_fraction) == split:
            break
    task = rng.choice(config.tasks)
    question, untagged, _ = shapes.ask(scene, task, scfg, rng)
    image = shapes.render_scene(scene, config.image_size)
    answer, box, index, blend = untagged, None, None, None
    u = rng.random()
    if not no_tags and u < config.tag_prob + config.refusal_tag_prob:
        refusal = u >= config.tag_prob
        index = len(config.tag_words) if refusal else rng.randrange(len(config.tag_words))
        s = config.tag_size
        if config.tag_align:
            cells = (config.image_size - s) // config.patch_size + 1
            x, y = (config.patch_size * rng.randrange(cells) for _ in range(2))
        else:
            x, y = rng.randint(0, config.image_size - s), rng.randint(0, config.image_size - s)
        if not refusal and config.tag_blend_prob and rng.random() < config.tag_blend_prob:
            blend = (index, rng.choice([j for j in range(len(config.tag_words)) if j != index]), rng.random())
        other, alpha = blend[1:] if blend else (None, 0.0)
        image, box = draw_tag(image, index, x, y, s, other=other, alpha=alpha), (x, y, s)
        if blend and rng.random() < alpha:
            index = other  # the word said: the second code's with probability alpha
        answer = shapes.REFUSAL_TEXT if refusal else f"{config.tag_words[index]} {untagged}"
    return Example(image, question, answer, task, box, untagged, content_tokens(image, config.patch_size), scene, index,
                   blend)


def tokenizer_corpus(config: PretrainConfig, n: int = 3000) -> list[str]:
    """SHAPES questions and answers, attack strings, tag words and the vocabulary."""
    texts = shapes.corpus(config.shapes_config(), n, seed=config.seed)
    extra = [*shapes.ATTACK_STRINGS, " ".join(shapes.vocabulary(config.shapes_config()))]
    return texts + (extra + [f"{w} There" for w in config.tag_words]) * 50


class ExampleStream(torch.utils.data.IterableDataset):
    """Endless batches (pixel_values [B, 3, S, S], examples without their images); each loader worker
    draws from its own seeded stream ("pretrain/{seed}/{worker}")."""

    def __init__(self, config: PretrainConfig, processor: Callable[[list[Image.Image]], torch.Tensor]):
        self.config, self.processor = config, processor

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"pretrain/{self.config.seed}/{info.id if info else 0}")
        workers = info.num_workers if info else 1
        plain_batches = self.config.plain_fraction * self.config.steps / workers  # loader workers take turns
        made = 0
        while True:
            no_tags = made < plain_batches
            examples = [sample_example(self.config, rng, no_tags=no_tags) for _ in range(self.config.batch_size)]
            made += 1
            pixels = self.processor([e.image for e in examples])
            yield pixels, [replace(e, image=None) for e in examples]
