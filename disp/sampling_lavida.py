"""Masked-diffusion sampling with LaViDa's semantics (`llada/generate.py`), batched, in embedding space.

Same skeleton as `disp.sampling` (blocks decoded left to right, committed tokens never remasked,
`held` prompt positions kept as the mask embedding, a row stops once `<|eot_id|>` is committed with
nothing masked before it), with LaViDa's differences:

- step count: `steps = min(steps, gen_length) / num_blocks` per block, times `step_ratio` (truncated);
- per-step token counts: even split, or the `shift` schedule σ(t) = s·t / (1 + (s − 1)·t) (≥ 1 token a step);
- no token is suppressed at masked positions (LLaDA-V forbids EOS/BOS/headers; LaViDa does not);
- optional prefix-DLM attention (`prefix_lm`), under which the prompt's keys/values can be computed once
  and reused (`kv_cache`). With LaViDa's default full bidirectional attention the prompt attends to the
  answer, so no cache is exact; DiSP runs LaViDa with the cache disabled (paper App. B.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from disp.config import SamplerConfig, _help
from disp.models.base import MDLM, PromptBatch
from disp.sampling import Generation, commit_step, initial_state, num_transfer_tokens, stop_lengths

SCHEDULES = ("uniform", "shift")


@dataclass
class LaViDaSamplerConfig(SamplerConfig):
    """LaViDa's sampler options on top of `SamplerConfig` (whose defaults are the paper's 32/32/32).

    Args:
        step_ratio: fraction of `steps` actually run (LaViDa's `step_ratio`; paper: 0.5 → 16 steps).
        schedule: tokens committed per step: "uniform" (even split) or "shift".
        shift: s of the shift schedule; s > 1 commits few tokens early and many late.
        prefix_lm: prefix-DLM attention (the prompt does not attend to the answer).
        kv_cache: compute the prompt's keys/values once; exact only with prefix_lm.
    """

    step_ratio: float = _help("Fraction of the denoising steps run (LaViDa step_ratio).", 0.5)
    schedule: str = _help("Per-step token counts: 'uniform' or 'shift'.", "shift")
    shift: float = _help("s of the shift schedule s*t/(1+(s-1)*t).", 3.0)
    prefix_lm: bool = _help("Prefix-DLM attention: the prompt does not attend to the answer.", False)
    kv_cache: bool = _help("Reuse the prompt's keys/values across steps (needs prefix_lm).", False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.step_ratio <= 1:
            raise ValueError(f"step_ratio must be in (0, 1], got {self.step_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.kv_cache and not self.prefix_lm:
            raise ValueError("kv_cache is exact only under the prefix-DLM mask: set prefix_lm too")
        if self.steps_per_block < 1:
            raise ValueError(f"steps {self.steps} x step_ratio {self.step_ratio} leaves no step per block")

    @property
    def steps_per_block(self) -> int:
        blocks = self.gen_length // self.block_length
        return int(min(self.steps, self.gen_length) // blocks * self.step_ratio)

    @classmethod
    def from_base(cls, config: SamplerConfig, **overrides) -> LaViDaSamplerConfig:
        """A generic SamplerConfig (e.g. `PurifyConfig.sampler`) with LaViDa's defaults for the rest."""
        return cls(**{**{f.name: getattr(config, f.name) for f in fields(config)}, **overrides})


def shift_schedule(n_masked: int, steps: int, shift: float = 3.0) -> list[int]:
    """Tokens committed per step under LaViDa's `shift` schedule; sums to n_masked, each ≥ 1.

    Counts are the increments of floor(σ(t)·n) on t = 0, 1/S, …, 1 (S = min(steps, n)), raised to at
    least 1, the excess taken back one token at a time from the earliest counts above 1, then reversed
    (the sampler walks t from 1 to 0). E.g. n=8, S=4, s=3: σ·8 = 0, 4, 6, 7.2, 8 → [1, 1, 2, 4].
    """
    S = min(steps, n_masked)
    if S <= 0:
        return []
    t = torch.linspace(0, 1, S + 1, dtype=torch.float32)
    sigma = shift * t / (1 + (shift - 1) * t)
    marks = (sigma * n_masked).to(torch.int64)
    counts = [max(1, int(c)) for c in (marks[1:] - marks[:-1])]
    excess, j = sum(counts) - n_masked, 0
    while excess > 0:  # never below 1: S ≤ n leaves enough counts above 1
        if counts[j % S] > 1:
            counts[j % S] -= 1
            excess -= 1
        j += 1
    return counts[::-1]


def transfer_schedule(n_masked: int, steps: int, config: LaViDaSamplerConfig) -> list[int]:
    if config.schedule == "shift":
        return shift_schedule(n_masked, steps, config.shift)
    return num_transfer_tokens(n_masked, steps)


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
        config: a LaViDaSamplerConfig; a plain SamplerConfig gets LaViDa's defaults for the rest.
        held: [B, P] bool, prompt positions replaced by the mask embedding throughout.
        generator: source of Gumbel noise and random remasking.
        on_step: called after each step with (ids [B, G], is_mask [B, G]).
    Returns:
        Generation with ids [B, G] and per-row answer lengths (tokens before <|eot_id|>).
    """
    if not isinstance(config, LaViDaSamplerConfig):
        config = LaViDaSamplerConfig.from_base(config)
    tok = model.tokenizer
    P = prompt.embeds.shape[1]
    G, dev = config.gen_length, prompt.embeds.device
    prompt_embeds, attn, ids, is_mask = initial_state(model, prompt, held, G)
    cache = model.prefill(PromptBatch(prompt_embeds, prompt.attention_mask, prompt.image_positions)) \
        if config.kv_cache else None
    prefix = {"prefix_length": P} if config.prefix_lm else {}

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        answer = model.embed_tokens(ids).to(prompt_embeds.dtype)
        if cache is not None:
            return model.forward_cached(answer, cache).double()
        return model.forward_embeds(torch.cat([prompt_embeds, answer], 1), attn, logits_from=P, **prefix).double()

    cols = torch.arange(G, device=dev)
    steps_run = 0
    for b in range(G // config.block_length):
        in_block = (cols >= b * config.block_length) & (cols < (b + 1) * config.block_length)
        for k in transfer_schedule(config.block_length, config.steps_per_block, config):
            if stop_lengths(ids, is_mask, tok.eot_id)[1].all() or not (is_mask & in_block).any():
                break
            ids, is_mask = commit_step(logits_of(ids), ids, is_mask, is_mask & in_block, k, config, generator)
            steps_run += 1
            if on_step is not None:
                on_step(ids, is_mask)
    first, _ = stop_lengths(ids, is_mask, tok.eot_id)
    return Generation(ids=ids, lengths=first, steps_run=steps_run)
