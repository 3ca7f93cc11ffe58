"""Masked-diffusion sampling with LLaDA-V's semantics, batched, in embedding space.

The answer starts as `gen_length` mask tokens after the prompt. It is decoded block by block
(semi-autoregressive); within a block each of `steps / num_blocks` steps commits a scheduled number of
masked positions, chosen by confidence ("low_confidence") or at random ("random"). Committed tokens are
never remasked. At masked positions EOS, BOS and the header tokens are never proposed
(`SamplerConfig.suppress_eos`, `suppress_bos_headers`; with both off nothing is suppressed, as in LLaDA's
`generate.py`); a row stops once `<|eot_id|>` (or, with EOS allowed, EOS) is committed and every position
before it is filled, which leaves its answer as running every step would.

Prompt positions listed in `held` stay the mask embedding for the whole generation; this is how DiSP's
purification (paper Eq. 10–11) feeds masked visual tokens to the model.

Two approximations, off by default, trade exactness for fewer FLOPs (`SamplerConfig`):
- `confidence_threshold` (Fast-dLLM's parallel decoding): a step commits, beyond its scheduled count, every
  open position whose confidence exceeds the threshold, so a block may finish in fewer steps.
- `prompt_cache_refresh` N (dLLM-Cache / Fast-dLLM's prefix cache): step i of a block runs the full
  [prompt | answer] forward only when i % N == 0 and keeps the prompt's keys/values; the other steps run
  the answer's G positions alone against them. The held positions are part of the cached prompt, so they
  stay masked. Under bidirectional attention the reused keys/values are stale by the tokens committed since.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from disp.config import SamplerConfig
from disp.models.base import MDLM, PromptBatch


def num_transfer_tokens(n_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: an even split, the remainder on the first steps."""
    base, extra = divmod(n_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax of logits perturbed by Gumbel noise of scale `temperature` (plain argmax at 0).

    Same argmax as LLaDA's `exp(logits) / (-log U)^T` in float64, computed in log space so large
    logits cannot overflow. logits [..., V] → ids [...].
    """
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() + temperature * gumbel).argmax(-1)


def commit_step(logits: torch.Tensor, ids: torch.Tensor, is_mask: torch.Tensor, open_: torch.Tensor, k: int,
                config: SamplerConfig, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit up to k of the `open_` positions per row, most confident first.

    logits [B, G, V] float64; ids, is_mask, open_ [B, G] → new (ids, is_mask).
    """
    B, G = ids.shape
    x0 = gumbel_argmax(logits, config.temperature, generator)  # (B, G)
    if config.remasking == "low_confidence":
        conf = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    else:
        conf = torch.rand((B, G), generator=generator, device=ids.device, dtype=torch.float64)
    conf = torch.where(open_, conf, float("-inf"))
    take = torch.clamp(open_.sum(1), max=k)  # (B,)
    if config.confidence_threshold < 1:  # parallel decoding: also everything confident enough
        take = torch.maximum(take, (conf > config.confidence_threshold).sum(1))
    order = conf.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(G, device=ids.device).expand(B, G))
    commit = rank < take[:, None]
    return torch.where(commit, x0, ids), is_mask & ~commit


@dataclass
class Generation:
    """ids: [B, G] committed answer ids (mask id where never committed); lengths: [B] tokens before the stop."""

    ids: torch.Tensor
    lengths: torch.Tensor
    steps_run: int

    def answers(self) -> list[list[int]]:
        return [row[: int(n)].tolist() for row, n in zip(self.ids, self.lengths, strict=True)]


def stop_lengths(ids: torch.Tensor, is_mask: torch.Tensor, eot_id: int,
                 also: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: index of the first committed <|eot_id|> (or `also`; G if none) and whether the row is finished."""
    G = ids.shape[1]
    eot = ((ids == eot_id) | (ids == also if also is not None else False)) & ~is_mask
    first = torch.where(eot.any(1), eot.float().argmax(1), torch.full_like(eot[:, 0], G, dtype=torch.long))
    cols = torch.arange(G, device=ids.device)[None]
    pending = (is_mask & (cols < first[:, None])).any(1)
    finished = eot.any(1) & ~pending
    return first, finished | ~is_mask.any(1)


def suppressed_ids(tok, config: SamplerConfig) -> list[int]:
    """Token ids never proposed at a masked position under `config` (LLaDA-V: EOS, BOS and the headers)."""
    return [t for t in tok.suppressed_ids
            if (config.suppress_eos if t == tok.eos_id else config.suppresses_bos_headers)]


def initial_state(model: MDLM, prompt: PromptBatch, held: torch.Tensor | None, gen_length: int):
    """Start of a generation: prompt embeddings with `held` positions set to the mask embedding [B, P, D],
    the attention mask of prompt + answer [B, P+G], answer ids all `<|mdm_mask|>` [B, G], is_mask [B, G]."""
    B, dev = prompt.embeds.shape[0], prompt.embeds.device
    embeds = prompt.embeds
    if held is not None:
        embeds = torch.where(held[..., None], model.mask_embedding().to(embeds.dtype), embeds)
    attn = torch.cat([prompt.attention_mask, torch.ones(B, gen_length, dtype=torch.bool, device=dev)], dim=1)
    ids = torch.full((B, gen_length), model.tokenizer.mask_id, dtype=torch.long, device=dev)
    return embeds, attn, ids, torch.ones(B, gen_length, dtype=torch.bool, device=dev)


@torch.no_grad()
def generate(
    model: MDLM,
    prompt: PromptBatch,
    config: SamplerConfig,
    *,
    held: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Generation:
    """Denoise an answer for each prompt.

    Args:
        prompt: left-padded prompt embeddings [B, P, D] with attention mask [B, P].
        config: gen_length, block_length, steps, temperature, remasking; the approximations
            confidence_threshold and prompt_cache_refresh (module docstring).
        held: [B, P] bool, prompt positions replaced by the mask embedding throughout.
        generator: source of Gumbel noise and random remasking.
        on_step: called after each step with (ids [B, G], is_mask [B, G]); for tests and tracing.
    Returns:
        Generation with ids [B, G] and per-row answer lengths (tokens before <|eot_id|>). A row that
        has stopped is left out of later forward passes; its answer can no longer change.
    """
    tok = model.tokenizer
    P = prompt.embeds.shape[1]
    G, dev = config.gen_length, prompt.embeds.device
    prompt_embeds, attn, ids, is_mask = initial_state(model, prompt, held, G)
    suppressed = torch.tensor(suppressed_ids(tok, config), dtype=torch.long, device=dev)
    stop_also = None if config.suppress_eos else tok.eos_id
    n_blocks = G // config.block_length
    steps_per_block = config.steps // n_blocks
    refresh = config.prompt_cache_refresh
    cache, cache_rows = None, None
    steps_run = 0
    for b in range(n_blocks):
        lo, hi = b * config.block_length, (b + 1) * config.block_length
        in_block = torch.zeros(G, dtype=torch.bool, device=dev)
        in_block[lo:hi] = True
        schedule = num_transfer_tokens(config.block_length, steps_per_block)
        for i, k in enumerate(schedule):
            # rows that stopped (or have nothing left in this block) drop out of the forward pass
            running = ~stop_lengths(ids, is_mask, tok.eot_id, stop_also)[1] & (is_mask & in_block).any(1)
            rows = running.nonzero().flatten()
            if rows.numel() == 0:
                break
            r_ids, r_mask = ids[rows], is_mask[rows]
            answer = model.embed_tokens(r_ids).to(prompt_embeds.dtype)
            if refresh and i % refresh:  # answer only, against the prompt keys/values of the last refresh
                logits = model.forward_cached(answer, cache.rows(torch.searchsorted(cache_rows, rows))).double()
            elif refresh:
                embeds = torch.cat([prompt_embeds[rows], answer], dim=1)
                logits, cache = model.forward_and_cache(embeds, attn[rows], P)
                logits, cache_rows = logits.double(), rows
            else:
                embeds = torch.cat([prompt_embeds[rows], answer], dim=1)
                logits = model.forward_embeds(embeds, attn[rows], logits_from=P).double()  # (B', G, V)
            logits[..., suppressed] = torch.where(r_mask[..., None], float("-inf"), logits[..., suppressed])
            r_ids, r_mask = commit_step(logits, r_ids, r_mask, r_mask & in_block, k, config, generator)
            ids, is_mask = ids.index_copy(0, rows, r_ids), is_mask.index_copy(0, rows, r_mask)
            steps_run += 1
            if on_step is not None:
                on_step(ids, is_mask)
    first, _ = stop_lengths(ids, is_mask, tok.eot_id, stop_also)
    return Generation(ids=ids, lengths=first, steps_run=steps_run)

