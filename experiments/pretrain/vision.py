"""Stage 0 of the shapes-base recipe: pretrain the vision tower to see what is in each visual token.

LLaDA-V starts from a pretrained SigLIP; the SHAPES base starts from nothing, and a tower trained only
through the language model learns colour long before category (measured in docs/reproduction.md). So
before the joint training the tower is trained alone, with linear heads on each output token that name
the category and colour of the object under the token's centre and the tag the token shows ("none" for
background), on the recipe's own samples (tags included, never a trigger). With
`vision_position_labels` one more head names the token's index in the grid, so position survives in the
features the projector sees. The heads are thrown away;
the tower keeps what it learned.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disp import scenes


def token_labels(scene: scenes.Scene, size: int, patch: int) -> tuple[list[int], list[int]]:
    """Per visual token (row-major): (category index + 1, colour index + 1) of the object whose box holds
    the token's centre, 0 for background."""
    grid = size // patch
    cats, cols = [0] * grid * grid, [0] * grid * grid
    for obj in scene.objects:
        x0, y0, side = scenes.object_box(obj, size, scene.jitter, scene.grid)
        for t in range(grid * grid):
            cx, cy = (t % grid) * patch + patch // 2, (t // grid) * patch + patch // 2
            if x0 <= cx < x0 + side and y0 <= cy < y0 + side:
                cats[t] = scenes.CATEGORIES.index(obj.category) + 1
                cols[t] = list(scenes.COLOURS).index(obj.colour) + 1
    return cats, cols


def pretrain_vision(model, config, *, on_progress: Callable[[dict[str, Any]], None] | None = None) -> float:
    """Train `model`'s vision tower in place for `config.vision_steps` (a `PretrainConfig`); returns the last
    step's token accuracy (category, colour, tag and, with position labels, the token's index all right)."""
    from experiments.pretrain.data import sample_example
    from experiments.pretrain.tags import tag_tokens

    size, patch, steps = config.image_size, config.patch_size, config.vision_steps
    n_cat, n_col, n_tag = len(scenes.CATEGORIES) + 1, len(scenes.COLOURS) + 1, len(config.tag_words) + 2
    n_tokens = (size // patch) ** 2
    n_pos = n_tokens if config.vision_position_labels else 0
    tower = model.model.vision_tower
    blank = model.preprocess([scenes.render_scene(scenes.Scene(()), size)]).to(model.device)
    head = nn.Linear(model.vision_features(blank).shape[-1], n_cat + n_col + n_tag + n_pos).to(model.device)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=config.vision_lr, weight_decay=0.0)
    rng = random.Random(f"vision/{config.seed}")
    acc = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = config.vision_lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = [sample_example(config, rng) for _ in range(config.batch_size)]
        labels = [token_labels(e.scene, size, patch) for e in batch]
        tags = torch.zeros(len(batch), n_tokens, dtype=torch.long)
        for b, e in enumerate(batch):
            if e.tag_box is not None:
                tags[b, tag_tokens(e.tag_box, size, patch)] = e.tag_index + 1
        cat = torch.tensor([c for c, _ in labels], device=model.device)  # (B, N_v)
        col = torch.tensor([c for _, c in labels], device=model.device)
        tags = tags.to(model.device)
        targets = [cat, col, tags]
        if n_pos:
            targets.append(torch.arange(n_tokens, device=model.device).expand(len(batch), -1))
        out = head(model.vision_features(model.preprocess([e.image for e in batch]).to(model.device)).float())
        parts = out.split([n_cat, n_col, n_tag, n_pos][:len(targets)], dim=-1)
        loss = sum(F.cross_entropy(z.flatten(0, 1), y.flatten()) for z, y in zip(parts, targets, strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits = torch.stack([z.argmax(-1) == y for z, y in zip(parts, targets, strict=True)])
        acc = hits.all(0).float().mean().item()
        if on_progress is not None and (step % 25 == 0 or step == steps - 1):
            on_progress({"stage": "vision", "step": step + 1, "steps": steps, "loss": loss.item(), "acc": acc})
    return acc
