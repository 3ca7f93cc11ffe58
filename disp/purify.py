"""Purification (paper Eq. 9–11): hold the most salient visual tokens masked and let the model re-answer.

For every sample, clean or poisoned, the floor(ρ·N_v) visual tokens with the highest saliency are
replaced by the mask embedding for the whole generation, the answer is denoised from all-masks, and
the result replaces the sample's answer. The ablations mask no tokens ("no_mask") or random ones
("random_mask"). disp's variant may also leave visible the top-ρ tokens whose saliency is below
`PurifyConfig.min_score` nats, so a sample with no outstanding token is re-answered as it is.
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


def choose_masked(scores: torch.Tensor | None, n_visual: int | Sequence[int], batch: int, ratio: float,
                  masking: str, generator: torch.Generator | None = None, min_score: float = 0.0) -> torch.Tensor:
    """Visual-token indices to hold masked: [B, n], floor(ρ·N_b) per row by saliency, at random, or none.

    `n_visual`: the visual tokens of every row, or of each row N_b (anyres images differ); `scores` [B, N]
    (entries past a row's own count are ignored). A row holding fewer than n tokens has −1 entries, and so
    has, with `min_score` > 0 (saliency masking only), a top-ρ token scoring below it: it stays visible.
    """
    if masking not in MASKING:
        raise ValueError(f"masking must be one of {MASKING}, got {masking!r}")
    counts = [n_visual] * batch if isinstance(n_visual, int) else list(n_visual)
    if len(counts) != batch:
        raise ValueError(f"{len(counts)} visual-token counts for a batch of {batch}")
    take = [int(ratio * n) if masking != "none" else 0 for n in counts]
    n = max(take, default=0)
    if n == 0:
        return torch.zeros(batch, 0, dtype=torch.long)
    if masking == "random":
        rows = [torch.randperm(c, generator=generator)[:t] for c, t in zip(counts, take, strict=True)]
        return torch.stack([torch.cat([r, r.new_full((n - len(r),), -1)]) for r in rows])
    if scores is None:
        raise ValueError("saliency masking needs scores")
    cols = torch.arange(scores.shape[1])[None]
    scores = scores.masked_fill(cols >= torch.tensor(counts)[:, None], float("-inf"))
    top = top_salient(scores, ratio, counts)
    if min_score > 0:
        top = torch.where((top >= 0) & (scores.gather(1, top.clamp_min(0)) >= min_score), top, -1)
    return top


def held_positions(prompt: PromptBatch, visual_idx: torch.Tensor) -> torch.Tensor:
    """Prompt columns to hold masked: [B, P] bool from visual-token indices [B, n] (−1: none)."""
    held = torch.zeros_like(prompt.attention_mask)
    idx = visual_idx.to(prompt.image_positions.device)
    rows, k = (idx >= 0).nonzero(as_tuple=True)
    held[rows, prompt.image_positions[rows, idx[rows, k]]] = True
    return held


@torch.no_grad()
def purify_batch(model: MDLM, questions: Sequence[str | Sequence[int]], images: Sequence[Image.Image] | None,
                 visual_idx: torch.Tensor, config: PurifyConfig, *,
                 image_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> PurifiedBatch:
    """Re-answer each (question, image) with the given visual tokens held masked (Eq. 10–11).

    A question may be given as prompt ids already (`ChatTokenizer.encode_prompt`, e.g. with earlier turns).
    `image_embeds`: each sample's visual tokens ([B, N, D] or B tensors [N_b, D]) instead of `images`.
    """
    if image_embeds is None:
        image_embeds = model.image_tokens(images)
    prompt = model.build_prompts([model.tokenizer.encode_prompt(q) if isinstance(q, str) else list(q)
                                  for q in questions], image_embeds)
    gen = model.generate(prompt, config.sampler, held=held_positions(prompt, visual_idx), generator=generator)
    answers = [model.tokenizer.decode(a).strip() for a in gen.answers()]
    return PurifiedBatch(answers=answers, masked=[row[row >= 0].tolist() for row in visual_idx])
