"""Purification (paper Eq. 9–11): hold the most salient visual tokens masked and let the model re-answer.

For every sample, clean or poisoned, the floor(ρ·N_v) visual tokens with the highest saliency are
replaced by the mask embedding for the whole generation, the answer is denoised from all-masks, and
the result replaces the sample's answer. The ablations mask no tokens ("no_mask") or random ones
("random_mask").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from disp.config import PurifyConfig
from disp.models.base import MDLM, PromptBatch
from disp.saliency import top_salient

MASKING = ("saliency", "none", "random")


@dataclass
class PurifiedBatch:
    """answers: decoded purified answers; masked: per sample the visual-token indices held masked."""

    answers: list[str]
    masked: list[list[int]]


def choose_masked(scores: torch.Tensor | None, n_visual: int, batch: int, ratio: float, masking: str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Visual-token indices to hold masked: [B, floor(ρ·N_v)] by saliency, at random, or none."""
    if masking not in MASKING:
        raise ValueError(f"masking must be one of {MASKING}, got {masking!r}")
    n = int(ratio * n_visual) if masking != "none" else 0
    if n == 0:
        return torch.zeros(batch, 0, dtype=torch.long)
    if masking == "random":
        return torch.stack([torch.randperm(n_visual, generator=generator)[:n] for _ in range(batch)])
    if scores is None:
        raise ValueError("saliency masking needs scores")
    return top_salient(scores, ratio)


def held_positions(prompt: PromptBatch, visual_idx: torch.Tensor) -> torch.Tensor:
    """Prompt columns to hold masked: [B, P] bool from visual-token indices [B, n]."""
    held = torch.zeros_like(prompt.attention_mask)
    if visual_idx.numel():
        cols = prompt.image_positions.gather(1, visual_idx.to(prompt.image_positions.device))
        held.scatter_(1, cols, True)
    return held


@torch.no_grad()
def purify_batch(model: MDLM, questions: Sequence[str], images: Sequence[Image.Image] | None,
                 visual_idx: torch.Tensor, config: PurifyConfig, *, image_embeds: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> PurifiedBatch:
    """Re-answer each (question, image) with the given visual tokens held masked (Eq. 10–11)."""
    if image_embeds is None:
        image_embeds = model.encode_images(model.preprocess(images))
    prompt = model.build_prompts([model.tokenizer.encode_prompt(q) for q in questions], image_embeds)
    gen = model.generate(prompt, config.sampler, held=held_positions(prompt, visual_idx), generator=generator)
    answers = [model.tokenizer.decode(a).strip() for a in gen.answers()]
    return PurifiedBatch(answers=answers, masked=[row.tolist() for row in visual_idx])
