"""LaViDa's masked-diffusion training loss: complementary masking, plain mean cross-entropy.

LaViDa (`llava_llada.py::forward_process` and `LlavaLladaForMaskedDiffusion.forward`): per row one
t ~ U(0, 1) and p_mask = (1 − ε)·t + ε; each candidate (answer) position is masked when its uniform draw
u ≤ max(p_mask, min u), so at least one position is masked. The batch is then doubled: the first copy
masks M, the second masks the complement (candidates \\ M), so every answer token is a target exactly
once. The loss is the mean cross-entropy over all masked targets of both copies, with no 1/t weighting
and no per-row length normalisation:

    L = Σ_{copies, b, i ∈ masked} CE_bi / #masked

Upstream takes the minimum over the whole row (prompt included), so a row can end up with no masked
answer token; here the minimum is over the candidates, which guarantees one. LaViDa's FIM token is not
excluded (LLaDA-V-style data has none). Training batches come from `disp.losses.training_batch`, whose
EOS padding after the answer is attended and learned, as in LaViDa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disp.losses import EPS, TrainBatch
from disp.models.base import MDLM


def complementary_masks(candidates: torch.Tensor, *, t: torch.Tensor | None = None, eps: float = EPS,
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask M and its complement over the candidates.

    candidates [B, L] bool → masked [B, L], complement [B, L] (disjoint, union = candidates), p_mask [B].
    Every row with a candidate has at least one masked position.
    """
    B = candidates.shape[0]
    dev = candidates.device
    if t is None:
        t = torch.rand(B, generator=generator, device=dev)
    p_mask = (1 - eps) * t + eps
    u = torch.rand(candidates.shape, generator=generator, device=dev)
    u = torch.where(candidates, u, torch.full_like(u, float("inf")))
    cutoff = torch.maximum(p_mask, u.min(1).values)  # (B,)
    masked = (u <= cutoff[:, None]) & candidates
    return masked, candidates & ~masked, p_mask


def mean_masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean CE over masked positions of the whole batch: logits [B, L, V], targets [B, L], masked [B, L] → scalar."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # (B, L)
    ce = torch.where(masked, ce, torch.zeros_like(ce))
    return ce.sum() / masked.sum().clamp_min(1)


def complementary_loss(model: MDLM, batch: TrainBatch, *, generator: torch.Generator | None = None,
                       t: torch.Tensor | None = None, prefix_lm: bool = False) -> torch.Tensor:
    """Noise `batch` with M and its complement, run both copies [2B, L], return the mean masked CE.

    prefix_lm: prefix-DLM attention during training (LaViDa's `prefix_lm` flag, off by default); the
    prefix is the prompt, columns before the first answer column.
    """
    masked, complement, _ = complementary_masks(batch.answer_mask, t=t, generator=generator)
    noise = model.mask_embedding().to(batch.embeds.dtype)
    embeds = torch.cat([torch.where(m[..., None], noise, batch.embeds) for m in (masked, complement)])
    attention_mask = batch.attention_mask.repeat(2, 1)
    kwargs = {}
    if prefix_lm:
        kwargs["prefix_length"] = int(batch.answer_mask.any(0).nonzero()[0])
    logits = model.forward_embeds(embeds, attention_mask, **kwargs)  # (2B, L, V)
    return mean_masked_cross_entropy(logits, batch.targets.repeat(2, 1), torch.cat([masked, complement]))
