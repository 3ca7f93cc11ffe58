"""Masked-diffusion sampling with LaViDa's semantics (`llada/generate.py`), batched, in embedding space.

Same skeleton as `disp.sampling` (blocks decoded left to right, committed tokens never remasked,
`held` prompt positions kept as the mask embedding, a row stops once `<|eot_id|>` is committed with
nothing masked before it, which leaves its answer as running every step would), with LaViDa's differences,
set by `SamplerConfig.lavida` (`disp.config.LaViDaSampling`):

- step count: LaViDa's `generate` sets `steps = max_new_tokens`, whatever steps it is passed; each block
  then runs gen_length / num_blocks steps (or `step_per_block`, capped at block_length), times
  `step_ratio` (truncated). `SamplerConfig.steps` is therefore not used.
- per-step token counts: even split ("uniform"), or the increments of ⌊σ(t)·n⌋ on t = 0, 1/S, …, 1 for
  the "shift" schedule σ(t) = s·t / (1 + (s − 1)·t) or "logit_normal" σ(t) = Φ(logit t), each at least 1.
- no token is suppressed at masked positions (LLaDA-V forbids EOS/BOS/headers; LaViDa does not).
- prefix-DLM attention (`prefix_lm`), under which the prompt's keys/values are computed once and reused
  (`kv_cache`), as LaViDa's `generate(prefix_lm=True)` does. With full bidirectional attention the prompt
  attends to the answer, so no cache is exact; the DiSP paper ran LaViDa that way (App. B.1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from disp.config import LaViDaSampling, SamplerConfig
from disp.models.base import MDLM, PromptBatch
from disp.sampling import Generation, commit_step, initial_state, num_transfer_tokens, stop_lengths


def _sigma(t: torch.Tensor, schedule: str, shift: float) -> torch.Tensor:
    if schedule == "shift":
        return shift * t / (1 + (shift - 1) * t)
    # logit_normal: Φ(logit t); t = 0 and 1 map to 0 and 1 through ±inf
    return 0.5 * (1 + torch.erf(torch.log(t / (1 - t)) / math.sqrt(2.0)))


def schedule_counts(n_masked: int, steps: int, schedule: str = "shift", shift: float = 3.0) -> list[int]:
    """Tokens committed per step under LaViDa's `shift` or `logit_normal` schedule; sums to n_masked, each ≥ 1.

    Counts are the increments of floor(σ(t)·n) on t = 0, 1/S, …, 1 (S = min(steps, n), float32), raised to
    at least 1, the excess taken back one token at a time from the earliest counts above 1, then reversed
    (the sampler walks t from 1 to 0). E.g. n=8, S=4, shift s=3: σ·8 = 0, 4, 6, 7.2, 8 → [1, 1, 2, 4].
    """
    S = min(steps, n_masked)
    if S <= 0:
        return []
    t = torch.linspace(0, 1, S + 1, dtype=torch.float32)
    marks = (_sigma(t, schedule, shift) * n_masked).to(torch.int64)
    counts = [max(1, int(c)) for c in (marks[1:] - marks[:-1])]
    excess, j = sum(counts) - n_masked, 0
    while excess > 0:  # never below 1: S ≤ n leaves enough counts above 1
        if counts[j % S] > 1:
            counts[j % S] -= 1
            excess -= 1
        j += 1
    return counts[::-1]


def shift_schedule(n_masked: int, steps: int, shift: float = 3.0) -> list[int]:
    """`schedule_counts` of the shift schedule."""
    return schedule_counts(n_masked, steps, "shift", shift)


def transfer_schedule(n_masked: int, steps: int, options: LaViDaSampling) -> list[int]:
    """Tokens committed at each of a block's steps."""
    if options.schedule == "uniform":
        return num_transfer_tokens(n_masked, steps)
    return schedule_counts(n_masked, steps, options.schedule, options.shift)


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
    """Denoise an answer for each prompt, LaViDa style; same contract as `disp.sampling.generate`.

    Args:
        prompt: left-padded prompt embeddings [B, P, D] with attention mask [B, P].
        config: gen_length, block_length, temperature, remasking, and LaViDa's options in `config.lavida`.
        held: [B, P] bool, prompt positions replaced by the mask embedding throughout.
        generator: source of Gumbel noise and random remasking.
        on_step: called after each step with (ids [B, G], is_mask [B, G]).
    Returns:
        Generation with ids [B, G] and per-row answer lengths (tokens before <|eot_id|>).
    """
    opts = config.lavida
    if config.prompt_cache_refresh:
        raise ValueError(f"prompt_cache_refresh {config.prompt_cache_refresh}: LaViDa reuses the prompt's keys/values "
                         "with lavida.kv_cache (exact under lavida.prefix_lm); set prompt_cache_refresh 0")
    per_block = opts.steps_per_block(config.gen_length, config.block_length)
    if per_block < 1:
        raise ValueError(f"LaViDa's step_ratio {opts.step_ratio} leaves no step in a block of {config.block_length}")
    if config.steps != config.gen_length:
        warnings.warn(f"LaViDa ignores steps={config.steps}, as its generate does: each block runs "
                      f"{per_block} steps (set step_ratio or step_per_block)", stacklevel=2)
    tok = model.tokenizer
    P = prompt.embeds.shape[1]
    G, dev = config.gen_length, prompt.embeds.device
    prompt_embeds, attn, ids, is_mask = initial_state(model, prompt, held, G)
    cache = model.prefill(PromptBatch(prompt_embeds, prompt.attention_mask, prompt.image_positions)) \
        if opts.kv_cache else None
    prefix = {"prefix_length": P} if opts.prefix_lm else {}

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        answer = model.embed_tokens(ids).to(prompt_embeds.dtype)
        if cache is not None:
            return model.forward_cached(answer, cache).double()
        return model.forward_embeds(torch.cat([prompt_embeds, answer], 1), attn, logits_from=P, **prefix).double()

    cols = torch.arange(G, device=dev)
    steps_run = 0
    schedule = transfer_schedule(config.block_length, per_block, opts)
    for b in range(G // config.block_length):
        in_block = (cols >= b * config.block_length) & (cols < (b + 1) * config.block_length)
        for k in schedule:
            if stop_lengths(ids, is_mask, tok.eot_id)[1].all() or not (is_mask & in_block).any():
                break
            ids, is_mask = commit_step(logits_of(ids), ids, is_mask, is_mask & in_block, k, config, generator)
            steps_run += 1
            if on_step is not None:
                on_step(ids, is_mask)
    first, _ = stop_lengths(ids, is_mask, tok.eot_id)
    return Generation(ids=ids, lengths=first, steps_run=steps_run)
