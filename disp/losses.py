"""LLaDA-V's masked-diffusion SFT loss (paper Eq. 2) and the training batch it runs on.

For each row one t ~ U(0, 1); each answer token is masked with probability p_mask = (1 − ε)·t + ε;
prompt tokens are never masked. The loss is the cross-entropy at masked answer positions, weighted
by 1 / p_mask and normalised by the row's answer length, averaged over rows (a multi-turn row's answer
tokens are those of all its answers, as in LLaDA-V's multi-turn training):

    L = 1/B · Σ_b Σ_{i masked} CE_bi / (p_mask_b · |answer_b|)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from disp.models.base import MDLM

EPS = 1e-3  # LLaDA's ε: the smallest masking probability


@dataclass
class TrainBatch:
    """[pad | prompt with image | answer + <|eot_id|> (+ later user turn, answer, ...) + EOS padding] per row.

    embeds: [B, L, D] clean embeddings; attention_mask: [B, L] bool; targets: [B, L] ids (−100 outside
    answers); answer_mask: [B, L] bool. EOS padding after the last answer counts as answer, as in LLaDA-V;
    the user turns between answers do not.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    answer_mask: torch.Tensor


def training_batch(model: MDLM, questions: Sequence[str | Sequence[str]], answers: Sequence[str | Sequence[str]],
                   images: Sequence[Image.Image] | None = None, *,
                   image_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
                   systems: Sequence[str | None] | None = None) -> TrainBatch:
    """Tokenise, splice images and pad a batch of (question, answer) pairs or whole conversations.

    A row's question and answer may be tuples of every user and assistant turn: the row is then the whole
    conversation and every answer is a target (LLaDA-V's multi-turn SFT); the user turns after the first
    stay unmasked context. `systems` gives rows their own system prompt (None: the template's).
    Visual embeddings come from `images` through the tower and projector (with grad, so the projector
    trains) unless `image_embeds` ([B, N_v, D], or B tensors [N_b, D]) are given.
    """
    tok = model.tokenizer
    if image_embeds is None:
        if images is None:
            raise ValueError("training_batch needs images or image_embeds")
        image_embeds = model.image_tokens(images)
    rows = [tok.encode_dialogue((q,) if isinstance(q, str) else tuple(q), (a,) if isinstance(a, str) else tuple(a),
                                system=None if systems is None else systems[b])
            for b, (q, a) in enumerate(zip(questions, answers, strict=True))]
    prompt = model.build_prompts([r[0] for r in rows], image_embeds)
    A = max(len(r[1]) for r in rows)
    dev = prompt.embeds.device
    ans = torch.full((len(rows), A), tok.eos_id, dtype=torch.long)
    target = torch.ones(len(rows), A, dtype=torch.bool)  # EOS padding after the last answer is learned
    for b, (_, rest, is_target) in enumerate(rows):
        ans[b, : len(rest)] = torch.tensor(rest, dtype=torch.long)
        target[b, : len(rest)] = torch.tensor(is_target, dtype=torch.bool)
    ans, target = ans.to(dev), target.to(dev)
    B, P = prompt.attention_mask.shape
    embeds = torch.cat([prompt.embeds, model.embed_tokens(ans).to(prompt.embeds.dtype)], dim=1)
    attention_mask = torch.cat([prompt.attention_mask, torch.ones(B, A, dtype=torch.bool, device=dev)], dim=1)
    targets = torch.cat([torch.full((B, P), -100, dtype=torch.long, device=dev),
                         torch.where(target, ans, torch.full_like(ans, -100))], dim=1)
    answer_mask = targets != -100
    return TrainBatch(embeds, attention_mask, targets, answer_mask)


def mask_answers(answer_mask: torch.Tensor, *, t: torch.Tensor | None = None, eps: float = EPS,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process on answers only: returns masked [B, L] bool and p_mask [B]."""
    B = answer_mask.shape[0]
    dev = answer_mask.device
    if t is None:
        t = torch.rand(B, generator=generator, device=dev)
    p_mask = (1 - eps) * t + eps
    u = torch.rand(answer_mask.shape, generator=generator, device=dev)
    return (u < p_mask[:, None]) & answer_mask, p_mask


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                          p_mask: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: Σ CE/p_mask over masked answer tokens, / answer length per row, mean over rows.

    logits [B, L, V], targets [B, L], masked [B, L] bool, p_mask [B], answer_mask [B, L] bool → scalar.
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # (B, L)
    ce = torch.where(masked, ce, torch.zeros_like(ce))
    lengths = answer_mask.sum(1).clamp_min(1)
    return (ce.sum(1) / p_mask / lengths).mean()


def sft_loss(model: MDLM, batch: TrainBatch, *, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None) -> torch.Tensor:
    """Noise the answers of `batch`, run the model, return the Eq. 2 loss."""
    masked, p_mask = mask_answers(batch.answer_mask, t=t, generator=generator)
    noisy = torch.where(masked[..., None], model.mask_embedding().to(batch.embeds.dtype), batch.embeds)
    start = int(batch.answer_mask.float().argmax(1).min())  # answers (and the turns between them) follow the prompt
    logits = model.forward_embeds(noisy, batch.attention_mask, logits_from=start)
    return masked_diffusion_loss(logits, batch.targets[:, start:], masked[:, start:], p_mask,
                                 batch.answer_mask[:, start:])
