"""Visual-token saliency by the Fisher–Jacobian quadratic form (paper §3.3, Eq. 3–8).

At the first denoising step (the whole answer masked) the model's logits z on the first block's
positions define, per position g, a categorical p_g = softmax(z_g) restricted to its top-k entries,
with Fisher information F_g = diag(p_g) − p_g p_gᵀ (Eq. 3). Replacing visual token i by the mask
embedding is the perturbation δ_i = e_mask − e_i; the KL divergence it causes is, to second order,

    s_i = c · Σ_g δ_iᵀ J_{g,i}ᵀ F_g J_{g,i} δ_i,      J_{g,i} = ∂z_g / ∂e_i      (Eq. 4–5, c = 1/2)

Hutchinson's estimator (Eq. 6–8) draws q_g ~ N(0, F_g), backpropagates the scalar Σ_g q_g·z_g to the
input embeddings, and averages (∇_{e_i} · δ_i)² over M probes: E[(qᵀ J δ)²] = δᵀ Jᵀ F J δ. The M
backward passes run as one batched vector-Jacobian product. `exact_saliency` computes the quadratic
form with one Jacobian-vector product per visual token, for verification.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from disp.config import SaliencyConfig, SamplerConfig
from disp.models.base import MDLM, PromptBatch


def first_step_inputs(model: MDLM, prompt: PromptBatch, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompt | gen_length mask embeddings] → embeds [B, P+G, D], attention mask [B, P+G]."""
    B, P, D = prompt.embeds.shape
    masks = model.mask_embedding().to(prompt.embeds.dtype).expand(B, gen_length, D)
    ones = torch.ones(B, gen_length, dtype=torch.bool, device=prompt.embeds.device)
    return torch.cat([prompt.embeds, masks], 1), torch.cat([prompt.attention_mask, ones], 1)


def fisher_probes(p: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n draws q ~ N(0, diag(p) − ppᵀ) per row of p [..., k] → [n, ..., k] (float64).

    With u = √p (a unit vector), q = u ⊙ (y − (y·u) u), y ~ N(0, I) has exactly that covariance,
    because I − uuᵀ is a projection.
    """
    u = p.double().sqrt()
    y = torch.randn((n, *p.shape), generator=generator, device=p.device, dtype=torch.float64)
    return u * (y - (y * u).sum(-1, keepdim=True) * u)


def _topk_logits(model: MDLM, embeds: torch.Tensor, mask: torch.Tensor, P: int, G: int, k: int):
    """Logits of the first G answer positions restricted to their top-k entries: z [B, G, k], idx."""
    logits = model.forward_embeds(embeds, mask)[:, P : P + G]  # (B, G, V)
    idx = logits.detach().topk(k, dim=-1).indices
    return logits.gather(-1, idx), idx


def _perturbations(model: MDLM, embeds: torch.Tensor, prompt: PromptBatch) -> torch.Tensor:
    """δ_i = e_mask − e_i for every visual token: [B, N_v, D]."""
    cols = prompt.image_positions[..., None].expand(-1, -1, embeds.shape[-1])
    e_vis = embeds.detach().gather(1, cols)
    return model.mask_embedding().detach().to(e_vis.dtype) - e_vis


def hutchinson_saliency(model: MDLM, prompt: PromptBatch, config: SaliencyConfig, sampler: SamplerConfig,
                        *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimated s_i (Eq. 8) for every visual token: prompt of B samples → scores [B, N_v] (float32)."""
    B, P, _ = prompt.embeds.shape
    G = min(sampler.block_length, sampler.gen_length)
    embeds, mask = first_step_inputs(model, prompt, sampler.gen_length)
    embeds = embeds.detach().requires_grad_(True)
    with torch.enable_grad():
        z, _ = _topk_logits(model, embeds, mask, P, G, config.topk)  # (B, G, k)
        p = torch.softmax(z.detach().double(), -1)
        q = fisher_probes(p, config.probes, generator).to(z.dtype)  # (M, B, G, k)
        try:
            (grads,) = torch.autograd.grad(z, embeds, grad_outputs=q, is_grads_batched=True)  # (M, B, L, D)
        except RuntimeError:  # an op without a batching rule: fall back to M backward passes
            grads = torch.stack([torch.autograd.grad(z, embeds, q[m], retain_graph=m < len(q) - 1)[0]
                                 for m in range(len(q))])
    cols = prompt.image_positions[None, ..., None].expand(grads.shape[0], -1, -1, grads.shape[-1])
    g_vis = grads.gather(2, cols)  # (M, B, N_v, D)
    delta = _perturbations(model, embeds, prompt)  # (B, N_v, D)
    proj = (g_vis.double() * delta.double()).sum(-1)  # (M, B, N_v): q^T J_i δ_i
    return (config.factor * proj.pow(2).mean(0)).float()


def exact_saliency(model: MDLM, prompt: PromptBatch, config: SaliencyConfig, sampler: SamplerConfig) -> torch.Tensor:
    """The quadratic form of Eq. 5 computed exactly, one Jacobian-vector product per visual token.

    Returns scores [B, N_v] (float32). Cost: N_v forward-mode passes per sample.
    """
    B, P, _ = prompt.embeds.shape
    G = min(sampler.block_length, sampler.gen_length)
    embeds, mask = first_step_inputs(model, prompt, sampler.gen_length)
    embeds = embeds.detach()
    with torch.no_grad():
        _, idx = _topk_logits(model, embeds, mask, P, G, config.topk)
    delta = _perturbations(model, embeds, prompt)  # (B, N_v, D)

    def z_of(x: torch.Tensor) -> torch.Tensor:
        return model.forward_embeds(x, mask)[:, P : P + G].gather(-1, idx)  # (B, G, k)

    scores = torch.zeros(prompt.image_positions.shape, dtype=torch.float64, device=embeds.device)
    # forward-mode AD needs SDPA's math kernel (the fused CPU/GPU kernels have no JVP)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        p = torch.softmax(z_of(embeds).double(), -1)  # (B, G, k)
        for i in range(prompt.image_positions.shape[1]):
            tangent = torch.zeros_like(embeds)
            rows = torch.arange(B, device=embeds.device)
            tangent[rows, prompt.image_positions[:, i]] = delta[:, i]
            _, jd = torch.func.jvp(z_of, (embeds,), (tangent,))  # (B, G, k): J_i δ_i
            jd = jd.double()
            quad = (p * jd.pow(2)).sum(-1) - (p * jd).sum(-1).pow(2)  # (Jδ)ᵀ(diag p − ppᵀ)(Jδ)
            scores[:, i] = config.factor * quad.sum(-1)
    return scores.float()


def visual_saliency(model: MDLM, prompt: PromptBatch, config: SaliencyConfig, sampler: SamplerConfig,
                    *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scores [B, N_v] by the configured method (Hutchinson by default, exact with config.exact)."""
    if config.exact:
        return exact_saliency(model, prompt, config, sampler)
    return hutchinson_saliency(model, prompt, config, sampler, generator=generator)


def top_salient(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the floor(ρ·N_v) highest-scoring visual tokens per row (Eq. 9): [B, n], n may be 0."""
    n = int(ratio * scores.shape[1])
    return scores.topk(n, dim=1).indices if n else scores.new_zeros(scores.shape[0], 0, dtype=torch.long)
