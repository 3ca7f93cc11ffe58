"""Visual-token saliency by the Fisher–Jacobian quadratic form (paper §3.3, Eq. 3–8).

At the first denoising step (the whole answer masked) the model's logits z on the first block's
positions define, per position g, a categorical p_g = softmax(z_g) restricted to its top-k entries,
with Fisher information F_g = diag(p_g) − p_g p_gᵀ (Eq. 3). Replacing visual token i by the mask
embedding is the perturbation δ_i = e_mask − e_i; the KL divergence it causes is, to second order,

    s_i = c · Σ_g δ_iᵀ J_{g,i}ᵀ F_g J_{g,i} δ_i,      J_{g,i} = ∂z_g / ∂e_i      (Eq. 4–5, c = 1/2)

Hutchinson's estimator (Eq. 6–8) draws q_g ~ N(0, F_g), backpropagates the scalar Σ_g q_g·z_g to the
input embeddings, and averages (∇_{e_i} · δ_i)² over M probes: E[(qᵀ J δ)²] = δᵀ Jᵀ F J δ. One
forward serves every probe; the M backward passes run as batched vector-Jacobian products, as many
probes at a time as pay (`probe_chunk`). The probe noise is drawn from a generator seeded with
`SaliencyConfig.seed` for every batch, so a sample's scores do not depend on the batch or shard it is
scored in (the official code re-seeds with the same seed before every sample).
`exact_saliency` computes the quadratic form with one Jacobian-vector product per visual token, for
verification.

Every method scores all of a sample's visual tokens, however many its image gives (anyres crops and
`image_newline` positions included, as the official scoring takes the whole image span). In a batch of
samples with different counts the scores are [B, N] for the longest sample; the entries past a sample's own
count are −inf (`per_sample` cuts them off).

`occlusion_saliency` is not the paper's method but disp's variant of it: it computes the left side of Eq. 4,
the KL divergence of the first step's top-k distributions when visual token i alone is replaced by the mask
embedding, with one forward per token and no expansion. A strongly implanted backdoor makes the model
near-certain of its first answer tokens; there p(1 − p) ≈ 0, so the second-order term misses a change of
the logits that the exact divergence shows in full (docs/reproduction.md, "Why the Fisher score misses the
trigger"). Cost: N_v forward passes per sample, against one forward and M backward passes.

`isolation_saliency`, disp's second variant, scores a token by what it says on its own: the KL divergence
between the first step with visual token i alone visible (every other visual token held as the mask
embedding) and the first step with every visual token masked. A trigger drawn over several tokens, each of
which sets the backdoor off alone, survives the occlusion of any one of them, so neither the Fisher form
nor occlusion ranks all of them high; shown alone, each one does (docs/reproduction.md). Cost: N_v + 1
forward passes per sample. `disp.split_isolation` finds the same tokens by showing groups of them and
splitting only the groups that matter, at a fixed number of forwards (docs/saliency.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from disp.config import SaliencyConfig, SamplerConfig
from disp.models.base import MDLM, PromptBatch


def per_sample(scores: torch.Tensor, prompt: PromptBatch) -> list[torch.Tensor]:
    """Scores [B, N] → each sample's own [N_b] (the padding entries dropped)."""
    return [row[:n] for row, n in zip(scores, prompt.visual_counts(), strict=True)]


def padded_scores(scores: torch.Tensor, prompt: PromptBatch) -> torch.Tensor:
    """float32 scores with −inf on the entries that are not visual tokens."""
    return scores.float().masked_fill(~prompt.visual_mask(), float("-inf"))


def first_step_inputs(model: MDLM, prompt: PromptBatch, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompt | gen_length mask embeddings] → embeds [B, P+G, D], attention mask [B, P+G]."""
    B, P, D = prompt.embeds.shape
    masks = model.mask_embedding().to(prompt.embeds.dtype).expand(B, gen_length, D)
    ones = torch.ones(B, gen_length, dtype=torch.bool, device=prompt.embeds.device)
    return torch.cat([prompt.embeds, masks], 1), torch.cat([prompt.attention_mask, ones], 1)


# How many probes one backward takes. GPU: as many as keep the [m, B, L, V] logits cotangent within
# PROBE_GRAD_BYTES (LLaDA-V's 126k vocabulary: one at a time; a small vocabulary: all at once). CPU: the
# batched (vmap) backward only saves per-operator overhead, so probes are stacked only while a backward
# covers fewer than CPU_PROBE_ROWS token rows (B·L); above that one backward per probe measured 5-25%
# faster, below it (small models, many probes) stacking is up to 10x faster.
PROBE_GRAD_BYTES = 1 << 30
CPU_PROBE_ROWS = 2048


def probe_noise(n: int, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """n standard-normal draws of `shape`, one draw per probe, float64 on the generator's device: [n, *shape]."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.stack([torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
                        for _ in range(n)])


def fisher_probes_from_noise(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """q = u ⊙ (y − (y·u) u) with u = √p: q ~ N(0, diag(p) − ppᵀ) when y ~ N(0, I). Broadcasts; float64."""
    u = p.double().clamp_min(1e-40).sqrt()
    y = y.to(device=u.device, dtype=torch.float64)
    return u * (y - (y * u).sum(-1, keepdim=True) * u)


@contextmanager
def input_grads_only(model: MDLM) -> Iterator[None]:
    """Parameters stop requiring grad for the duration, so the forward keeps only what input gradients need."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def probe_chunk(probes: int, logits_shape: torch.Size, element_size: int, device: torch.device,
                rows: int) -> int:
    """Probes per backward for logits of `logits_shape` [B, G, V] read from a sequence of `rows` = B·L token
    rows (see `PROBE_GRAD_BYTES` and `CPU_PROBE_ROWS`)."""
    if device.type == "cpu":
        return max(1, min(probes, CPU_PROBE_ROWS // max(1, rows)))
    return max(1, min(probes, PROBE_GRAD_BYTES // max(1, logits_shape.numel() * element_size)))


def _topk_logits(model: MDLM, embeds: torch.Tensor, mask: torch.Tensor, P: int, G: int, k: int):
    """Logits of the first G answer positions restricted to their top-k entries: z [B, G, k], idx, and the
    shape of the full logits [B, L, V]."""
    full = model.forward_embeds(embeds, mask, logits_from=P)  # (B, L − P, V)
    logits = full[:, :G]  # (B, G, V)
    idx = logits.detach().topk(k, dim=-1).indices
    return logits.gather(-1, idx), idx, full.shape


def _perturbations(model: MDLM, embeds: torch.Tensor, prompt: PromptBatch) -> torch.Tensor:
    """δ_i = e_mask − e_i for every visual token: [B, N_v, D]."""
    cols = prompt.image_positions[..., None].expand(-1, -1, embeds.shape[-1])
    e_vis = embeds.detach().gather(1, cols)
    return model.mask_embedding().detach().to(e_vis.dtype) - e_vis


def _probe_grads(z: torch.Tensor, embeds: torch.Tensor, q: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """∂(q_m · z)/∂embeds for the probes q [M, B, G, k], `chunk` probes per backward: yields [m, B, L, D]."""
    M = len(q)
    for lo in range(0, M, chunk):
        qc, last = q[lo : lo + chunk], lo + chunk >= M
        if chunk > 1:
            try:  # the graph is kept: a failure part-way must leave it whole for the per-probe fallback
                g = torch.autograd.grad(z, embeds, grad_outputs=qc, retain_graph=True, is_grads_batched=True)[0]
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # an op without a batching rule: one backward per probe from here on
                chunk = 1
            else:
                yield g
                continue
        for j in range(len(qc)):
            yield torch.autograd.grad(z, embeds, qc[j], retain_graph=not (last and j == len(qc) - 1))[0][None]


def hutchinson_saliency(model: MDLM, prompt: PromptBatch, config: SaliencyConfig, sampler: SamplerConfig,
                        *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Estimated s_i (Eq. 8) for every visual token: prompt of B samples → scores [B, N] (float32).

    The probe noise y [M, G, k] is drawn from `generator` (default: a CPU generator seeded with
    `config.seed`) and shared by the rows, so each row's scores are those it gets when scored alone.
    `temperature` T ≠ 1 scores the distributions softmax(z/T) instead (a diagnostic, not the paper's).
    """
    B, P, _ = prompt.embeds.shape
    G = min(sampler.block_length, sampler.gen_length)
    embeds, mask = first_step_inputs(model, prompt, sampler.gen_length)
    embeds = embeds.detach().requires_grad_(True)
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    delta = _perturbations(model, embeds, prompt).double()  # (B, N_v, D)
    cols = prompt.image_positions[None, ..., None].expand(-1, -1, -1, embeds.shape[-1])  # (1, B, N_v, D)
    energy = torch.zeros(prompt.image_positions.shape, dtype=torch.float64, device=embeds.device)
    with torch.enable_grad(), input_grads_only(model):
        z, _, logits_shape = _topk_logits(model, embeds, mask, P, G, config.topk)  # (B, G, k)
        p = torch.softmax(z.detach().double() / temperature, -1)
        y = probe_noise(config.probes, tuple(z.shape[1:]), generator)  # (M, G, k), the same for every row
        q = fisher_probes_from_noise(p, y[:, None]).to(z.dtype)  # (M, B, G, k)
        chunk = probe_chunk(config.probes, logits_shape, z.element_size(), z.device, embeds.shape[0] * embeds.shape[1])
        for g in _probe_grads(z, embeds, q, chunk):
            g_vis = g.gather(2, cols.expand(len(g), -1, -1, -1))  # (m, B, N_v, D)
            energy += ((g_vis.double() * delta).sum(-1) ** 2).sum(0)  # Σ_m (q_mᵀ J_i δ_i)²
    return padded_scores(config.factor * energy / (config.probes * temperature**2), prompt)


def exact_saliency(model: MDLM, prompt: PromptBatch, config: SaliencyConfig, sampler: SamplerConfig) -> torch.Tensor:
    """The quadratic form of Eq. 5 computed exactly, one Jacobian-vector product per visual token.

    Returns scores [B, N] (float32). Cost: N forward-mode passes per batch.
    """
    B, P, _ = prompt.embeds.shape
    G = min(sampler.block_length, sampler.gen_length)
    embeds, mask = first_step_inputs(model, prompt, sampler.gen_length)
    embeds = embeds.detach()
    with torch.no_grad():
        _, idx, _ = _topk_logits(model, embeds, mask, P, G, config.topk)
    delta = _perturbations(model, embeds, prompt)  # (B, N_v, D)

    def z_of(x: torch.Tensor) -> torch.Tensor:
        return model.forward_embeds(x, mask, logits_from=P)[:, :G].gather(-1, idx)  # (B, G, k)

    scores = torch.zeros(prompt.image_positions.shape, dtype=torch.float64, device=embeds.device)
    visual = prompt.visual_mask()
    # forward-mode AD needs SDPA's math kernel (the fused CPU/GPU kernels have no JVP)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        p = torch.softmax(z_of(embeds).double(), -1)  # (B, G, k)
        for i in range(prompt.image_positions.shape[1]):
            tangent = torch.zeros_like(embeds)
            rows = visual[:, i].nonzero().flatten()  # samples that have an i-th visual token
            tangent[rows, prompt.image_positions[rows, i]] = delta[rows, i]
            _, jd = torch.func.jvp(z_of, (embeds,), (tangent,))  # (B, G, k): J_i δ_i
            jd = jd.double()
            quad = (p * jd.pow(2)).sum(-1) - (p * jd).sum(-1).pow(2)  # (Jδ)ᵀ(diag p − ppᵀ)(Jδ)
            scores[:, i] = config.factor * quad.sum(-1)
    return padded_scores(scores, prompt)


def top_k_kl(ref: torch.Tensor, idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ p') summed over positions, p and p' the softmax of `ref` [B, G, k] and of `logits` [B, G, V]
    restricted to the entries idx [B, G, k]: [B] float64."""
    log_p = torch.log_softmax(ref.double(), -1)
    log_q = torch.log_softmax(logits.gather(-1, idx).double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum((-1, -2))


def _one_token_edits(model: MDLM, prompt: PromptBatch, base: torch.Tensor, mask: torch.Tensor,
                     values: torch.Tensor, rows_per_pass: int, G: int, score) -> torch.Tensor:
    """For every (sample b, visual token i): base[b] [L, D] with token i's column set to values[b, i] [D], run
    to the first block's logits [n, G, V] and scored by score(b, logits) → [n]: scores [B, N] (float32).
    The Σ_b N_b edited copies run rows_per_pass at a time."""
    P = prompt.embeds.shape[1]
    pairs = prompt.visual_mask().nonzero()  # (Σ N_b, 2): sample, token
    scores = torch.zeros(prompt.image_positions.shape, dtype=torch.float64, device=base.device)
    for lo in range(0, len(pairs), rows_per_pass):
        b, i = pairs[lo : lo + rows_per_pass].unbind(1)
        x = base[b].clone()
        x[torch.arange(len(b), device=x.device), prompt.image_positions[b, i]] = values[b, i]
        logits = model.forward_embeds(x, mask[b], logits_from=P)[:, :G]
        scores[b, i] = score(b, logits)
    return padded_scores(scores, prompt)


@torch.no_grad()
def occlusion_saliency(model: MDLM, prompt: PromptBatch, config: SaliencyConfig,
                       sampler: SamplerConfig) -> torch.Tensor:
    """s_i = KL(p ‖ p_{−i}) over the first block's top-k entries, p_{−i} with visual token i alone held as the
    mask embedding (the exact divergence Eq. 4 expands): prompt of B samples → scores [B, N] (float32).

    The Σ_b N_b occluded copies run `config.occlusion_rows` at a time.
    """
    B, P, _ = prompt.embeds.shape
    G = min(sampler.block_length, sampler.gen_length)
    embeds, mask = first_step_inputs(model, prompt, sampler.gen_length)
    ref, idx, _ = _topk_logits(model, embeds, mask, P, G, config.topk)  # (B, G, k)
    e_mask = model.mask_embedding().to(embeds.dtype).expand(*prompt.image_positions.shape, -1)  # (B, N, D)
    return _one_token_edits(model, prompt, embeds, mask, e_mask, config.occlusion_rows, G,
                            lambda b, logits: top_k_kl(ref[b], idx[b], logits))


@torch.no_grad()
def isolation_reference(model: MDLM, prompt: PromptBatch, config: SaliencyConfig, sampler: SamplerConfig):
    """What every isolated copy is built from and scored against: (blank [B, L, D], the first-step input with
    every visual token held as the mask embedding; its attention mask [B, L]; shown [B, N, D], each visual
    token's own embedding; kl(b [n], logits [n, G, V]) → [n], the top-k KL of a copy of sample b against the
    all-masked first step; P; G). Runs the all-masked forward (one copy per sample)."""
    B, P, D = prompt.embeds.shape
    G = min(sampler.block_length, sampler.gen_length)
    embeds, mask = first_step_inputs(model, prompt, sampler.gen_length)
    pos = prompt.image_positions  # (B, N)
    shown = embeds.gather(1, pos[..., None].expand(-1, -1, D))  # (B, N, D): each visual token's own embedding
    blank = embeds.clone()
    rows, cols = prompt.visual_mask().nonzero().unbind(1)
    blank[rows, pos[rows, cols]] = model.mask_embedding().to(embeds.dtype)
    none_shown = model.forward_embeds(blank, mask, logits_from=P)[:, :G]  # (B, G, V)

    def kl_to_none_shown(b: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        top = logits.topk(config.topk, dim=-1).indices
        return top_k_kl(logits.gather(-1, top), top, none_shown[b])

    return blank, mask, shown, kl_to_none_shown, P, G


@torch.no_grad()
def isolation_saliency(model: MDLM, prompt: PromptBatch, config: SaliencyConfig,
                       sampler: SamplerConfig) -> torch.Tensor:
    """s_i = KL(p_{i} ‖ p_∅) over p_{i}'s top-k entries of the first block: p_{i} with visual token i the only
    one visible, p_∅ with every visual token held as the mask embedding: prompt of B samples → scores [B, N]
    (float32). The Σ_b N_b isolated copies run `config.occlusion_rows` at a time.
    """
    blank, mask, shown, kl, _, G = isolation_reference(model, prompt, config, sampler)
    return _one_token_edits(model, prompt, blank, mask, shown, config.occlusion_rows, G, kl)


def visual_saliency(model: MDLM, prompt: PromptBatch, config: SaliencyConfig, sampler: SamplerConfig,
                    *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scores [B, N] by the configured method: the paper's Fisher form (Hutchinson by default, exact with
    config.exact) or disp's occlusion, isolation or split-isolation variant; −inf past a sample's own visual
    tokens."""
    if config.method == "occlusion":
        return occlusion_saliency(model, prompt, config, sampler)
    if config.method == "isolation":
        return isolation_saliency(model, prompt, config, sampler)
    if config.method == "split_isolation":
        from disp.split_isolation import split_isolation_saliency  # it builds on this module's isolation

        return split_isolation_saliency(model, prompt, config, sampler)
    if config.exact:
        return exact_saliency(model, prompt, config, sampler)
    return hutchinson_saliency(model, prompt, config, sampler, generator=generator)


def top_salient(scores: torch.Tensor, ratio: float, counts: Sequence[int] | None = None) -> torch.Tensor:
    """Indices of the floor(ρ·N_b) highest-scoring visual tokens of each row (Eq. 9): [B, n], n the most of
    any row (may be 0), −1 after a row's own. `counts`: each row's visual tokens N_b (default: all N)."""
    B, N = scores.shape
    counts = [N] * B if counts is None else list(counts)
    take = [int(ratio * n) for n in counts]
    n = max(take, default=0)
    if n == 0:
        return scores.new_zeros(B, 0, dtype=torch.long)
    top = scores.topk(n, dim=1).indices
    keep = torch.arange(n, device=top.device)[None] < torch.tensor(take, device=top.device)[:, None]
    return torch.where(keep, top, -1)
