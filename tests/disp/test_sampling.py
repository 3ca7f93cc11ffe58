"""Sampler invariants: schedule, prompt untouched, held positions, stop, batching, determinism."""

from __future__ import annotations

import pytest
import torch

from disp.config import SamplerConfig
from disp.sampling import generate, num_transfer_tokens, stop_lengths


def test_transfer_schedule_splits_evenly():
    assert num_transfer_tokens(10, 4) == [3, 3, 2, 2]
    assert sum(num_transfer_tokens(32, 32)) == 32
    assert num_transfer_tokens(8, 8) == [1] * 8


@pytest.mark.parametrize("cfg", [SamplerConfig(16, 16, 16), SamplerConfig(16, 8, 4), SamplerConfig(12, 4, 6),
                                 SamplerConfig(16, 8, 8, remasking="random", temperature=0.7)])
def test_commits_exactly_the_scheduled_tokens_per_step(tiny_model, solid_images, cfg):
    pb = tiny_model.prompt_batch(["What is it?"] * 2, solid_images[:2])
    snaps = []
    gen = generate(tiny_model, pb, cfg, generator=torch.Generator().manual_seed(0),
                   on_step=lambda ids, m: snaps.append(m.clone()))
    per_block = cfg.steps // (cfg.gen_length // cfg.block_length)
    schedule = num_transfer_tokens(cfg.block_length, per_block) * (cfg.gen_length // cfg.block_length)
    prev = torch.ones_like(snaps[0])
    for step, mask in enumerate(snaps):
        committed = (prev & ~mask).sum(1)
        assert committed.tolist() == [schedule[step]] * 2
        # committed tokens stay committed; blocks fill left to right
        assert not (mask & ~prev).any()
        block = step // per_block
        assert not mask[:, : block * cfg.block_length].any()
        prev = mask
    assert gen.steps_run == len(snaps)


def test_answer_never_holds_suppressed_tokens(tiny_model, solid_images):
    tok = tiny_model.tokenizer
    gen = generate(tiny_model, tiny_model.prompt_batch(["Describe."] * 4, solid_images), SamplerConfig(16, 16, 16))
    for bad in tok.suppressed_ids + (tok.mask_id,):
        assert not (gen.ids == bad).any()


def test_held_positions_change_the_answer_and_prompt_is_untouched(tiny_model, solid_images):
    pb = tiny_model.prompt_batch(["What is it?"], solid_images[:1])
    before = pb.embeds.clone()
    held = torch.zeros_like(pb.attention_mask)
    held[0, pb.image_positions[0]] = True
    seen = []
    orig = tiny_model.forward_embeds

    def spy(embeds, mask=None, **kw):
        seen.append(embeds[:, : pb.embeds.shape[1]].clone())
        return orig(embeds, mask, **kw)

    tiny_model.forward_embeds = spy
    try:
        generate(tiny_model, pb, SamplerConfig(8, 8, 8), held=held)
    finally:
        del tiny_model.forward_embeds
    e_mask = tiny_model.mask_embedding()
    for prompt in seen:  # every step saw the held visual tokens as the mask embedding
        assert torch.equal(prompt[0, held[0]], e_mask.expand(int(held.sum()), -1))
        assert torch.equal(prompt[0, ~held[0]], before[0, ~held[0]])
    assert torch.equal(pb.embeds, before)


def test_batched_equals_per_sample(tiny_model, solid_images):
    questions = ["What is it?", "Describe this image in detail.", "Colour?", "Where is the object in the image?"]
    cfg = SamplerConfig(16, 8, 16)
    batched = generate(tiny_model, tiny_model.prompt_batch(questions, solid_images), cfg).answers()
    for q, img, ans in zip(questions, solid_images, batched, strict=True):
        assert generate(tiny_model, tiny_model.prompt_batch([q], [img]), cfg).answers()[0] == ans


def test_deterministic_at_temperature_zero(tiny_model, solid_images):
    pb = tiny_model.prompt_batch(["What is it?"] * 4, solid_images)
    a = generate(tiny_model, pb, SamplerConfig(16, 16, 16), generator=torch.Generator().manual_seed(1))
    b = generate(tiny_model, pb, SamplerConfig(16, 16, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.ids, b.ids)


def test_stop_at_eot():
    eot, mask = 7, 99
    ids = torch.tensor([[1, 2, eot, mask], [1, mask, eot, 3], [1, 2, 3, 4]])
    is_mask = ids == mask
    first, finished = stop_lengths(ids, is_mask, eot)
    assert first.tolist() == [2, 2, 4]
    assert finished.tolist() == [True, False, True]


def test_generation_stops_early_once_eot_is_committed(tiny_model, solid_images):
    # bias the lm head towards <|eot_id|> so that the first committed token is the stop
    tok = tiny_model.tokenizer
    bias = torch.zeros(tiny_model.lm_config.vocab_size)
    bias[tok.eot_id] = 50.0
    head = tiny_model.lm_head
    orig = tiny_model.forward_embeds
    tiny_model.forward_embeds = lambda e, m=None, **kw: orig(e, m, **kw) + bias
    try:
        gen = generate(tiny_model, tiny_model.prompt_batch(["Hi"], solid_images[:1]), SamplerConfig(16, 16, 16))
    finally:
        del tiny_model.forward_embeds
    assert head is tiny_model.lm_head
    assert gen.lengths.tolist() == [0] and gen.steps_run == 1


def test_bad_sampler_settings_are_named():
    with pytest.raises(ValueError, match="block_length 5 must divide gen_length 16"):
        SamplerConfig(16, 5, 16)
    with pytest.raises(ValueError, match="steps 3 must be a positive multiple"):
        SamplerConfig(16, 8, 3)
    with pytest.raises(ValueError, match="remasking"):
        SamplerConfig(remasking="entropy")


def test_eos_allowed_ends_the_answer(tiny_model, solid_images):
    tok = tiny_model.tokenizer
    bias = torch.zeros(tiny_model.lm_config.vocab_size)
    bias[tok.eos_id] = 50.0
    orig = tiny_model.forward_embeds
    tiny_model.forward_embeds = lambda e, m=None, **kw: orig(e, m, **kw) + bias
    try:
        pb = tiny_model.prompt_batch(["Hi"], solid_images[:1])
        allowed = generate(tiny_model, pb, SamplerConfig(16, 16, 16, suppress_eos=False))
        suppressed = generate(tiny_model, pb, SamplerConfig(16, 16, 16))
    finally:
        del tiny_model.forward_embeds
    assert allowed.lengths.tolist() == [0] and allowed.steps_run == 1
    assert not (suppressed.ids == tok.eos_id).any()


def llada_generate(model, prompt, gen: int, block: int, steps: int) -> list[int]:
    """LLaDA's generate.py on one prompt (low_confidence, temperature 0, no CFG, no token suppressed, no early
    stop): per block steps / num_blocks steps, each committing the even share of the block's masked tokens with
    the highest softmax confidence. Returns the answer up to the first <|eot_id|> or EOS."""
    tok = model.tokenizer
    P = prompt.embeds.shape[1]
    x = torch.full((gen,), tok.mask_id)
    per_block = steps // (gen // block)
    for nb in range(gen // block):
        hi = (nb + 1) * block
        counts = num_transfer_tokens(block, per_block)
        for k in counts:
            masked = x == tok.mask_id
            with torch.no_grad():
                embeds = torch.cat([prompt.embeds[0], model.embed_tokens(x)])[None]
                logits = model.forward_embeds(embeds, None, logits_from=P)[0].double()
            x0 = logits.argmax(-1)
            conf = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
            conf[hi:] = float("-inf")
            conf = torch.where(masked, conf, float("-inf"))
            take = conf.topk(k).indices
            x[take] = x0[take]
    out = x.tolist()
    ends = [i for i, t in enumerate(out) if t in (tok.eot_id, tok.eos_id)]
    return out[: ends[0]] if ends else out


def test_suppress_eos_false_is_lladas_generate(tiny_model, solid_images):
    """With suppress_eos=False nothing is suppressed (BOS and the header tokens included): the answers are
    those of LLaDA's generate.py, early stop and batching included; and a model that proposes BOS or a header
    gets it, where LLaDA-V's rule (the default) never would."""
    questions = ["What is it?", "Describe this image in detail.", "Colour?", "Where is the object in the image?"]
    for gen, block, steps in [(16, 16, 16), (16, 8, 8), (12, 4, 6)]:
        cfg = SamplerConfig(gen, block, steps, suppress_eos=False)
        ours = generate(tiny_model, tiny_model.prompt_batch(questions, solid_images), cfg).answers()
        for q, img, answer in zip(questions, solid_images, ours, strict=True):
            assert answer == llada_generate(tiny_model, tiny_model.prompt_batch([q], [img]), gen, block, steps)
    tok = tiny_model.tokenizer
    pb = tiny_model.prompt_batch(["Hi"], solid_images[:1])
    for token in (tok.bos_id, tok.start_header_id, tok.end_header_id):
        bias = torch.zeros(tiny_model.lm_config.vocab_size)
        bias[token] = 50.0
        orig = tiny_model.forward_embeds
        tiny_model.forward_embeds = lambda e, m=None, _o=orig, _b=bias, **kw: _o(e, m, **kw) + _b
        try:
            plain = generate(tiny_model, pb, SamplerConfig(8, 8, 8, suppress_eos=False))
            llada_v = generate(tiny_model, pb, SamplerConfig(8, 8, 8))
            eos_only = generate(tiny_model, pb, SamplerConfig(8, 8, 8, suppress_eos=False, suppress_bos_headers=True))
        finally:
            del tiny_model.forward_embeds
        assert (plain.ids == token).all()
        assert not (llada_v.ids == token).any() and not (eos_only.ids == token).any()


# -- approximate sampling: confidence_threshold and prompt_cache_refresh ----------------------------------------
class Calls:
    """Records the model's full forwards (their logits) and its answer-only cached forwards (their input shapes)."""

    def __init__(self, model):
        self.model, self.full, self.cached, self.prompts = model, [], [], []

    def __enter__(self):
        full, cached = self.model.forward_embeds, self.model.forward_cached

        def forward_embeds(embeds, mask=None, **kw):
            self.prompts.append(embeds[:, : embeds.shape[1] - self.gen].clone())
            out = full(embeds, mask, **kw)
            self.full.append(out.clone())
            return out

        def forward_cached(embeds, cache):
            self.cached.append(tuple(embeds.shape))
            return cached(embeds, cache)

        self.model.forward_embeds, self.model.forward_cached = forward_embeds, forward_cached
        return self

    def __call__(self, pb, cfg, **kw):
        self.gen = cfg.gen_length
        with self:
            return generate(self.model, pb, cfg, **kw)

    def __exit__(self, *exc):
        del self.model.forward_embeds, self.model.forward_cached


QUESTIONS = ["What is it?", "Describe this image in detail.", "Colour?", "Where is the object in the image?"]


@pytest.mark.parametrize("shape", [(16, 16, 16), (16, 8, 8)])
def test_cache_refreshed_every_step_is_the_exact_sampler_bit_for_bit(tiny_model, solid_images, shape):
    pb = tiny_model.prompt_batch(QUESTIONS, solid_images)  # left-padded prompts of different lengths
    exact, every = Calls(tiny_model), Calls(tiny_model)
    a = exact(pb, SamplerConfig(*shape, temperature=0.5), generator=torch.Generator().manual_seed(3))
    b = every(pb, SamplerConfig(*shape, temperature=0.5, prompt_cache_refresh=1, confidence_threshold=1.0),
              generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.lengths, b.lengths) and a.steps_run == b.steps_run
    assert len(exact.full) == len(every.full) == a.steps_run and not every.cached
    assert all(torch.equal(x, y) for x, y in zip(exact.full, every.full, strict=True))


def test_cached_forward_matches_the_full_forward_on_the_same_answer(tiny_model, solid_images):
    """Right after a refresh (the answer unchanged) the answer-only forward sees exactly the full forward's keys and
    values: the same logits up to float rounding, left padding included."""
    pb = tiny_model.prompt_batch(QUESTIONS, solid_images)
    P = pb.embeds.shape[1]
    ids = torch.randint(0, 300, (4, 8), generator=torch.Generator().manual_seed(0))
    answer = tiny_model.embed_tokens(ids)
    attn = torch.cat([pb.attention_mask, torch.ones(4, 8, dtype=torch.bool)], 1)
    with torch.no_grad():
        full, cache = tiny_model.forward_and_cache(torch.cat([pb.embeds, answer], 1), attn, P)
        cached = tiny_model.forward_cached(answer, cache)
        rows = torch.tensor([1, 3])
        subset = tiny_model.forward_cached(answer[rows], cache.rows(rows))
    assert full.shape == cached.shape == (4, 8, tiny_model.lm_config.vocab_size)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subset, full[rows], rtol=1e-5, atol=1e-5)


def test_cache_runs_the_prompt_once_per_refresh(tiny_model, solid_images):
    pb = tiny_model.prompt_batch(QUESTIONS, solid_images)
    exact, cached = Calls(tiny_model), Calls(tiny_model)
    exact(pb, SamplerConfig(16, 8, 16))
    gen = cached(pb, SamplerConfig(16, 8, 16, prompt_cache_refresh=4))
    assert len(exact.full) == 16
    # each 8-step block: full forwards at steps 0 and 4, the answer's 16 positions alone at the other 6
    assert len(cached.full) == 4 and len(cached.cached) == 12 == gen.steps_run - 4
    assert all(shape[1:] == (16, tiny_model.lm_config.hidden_size) for shape in cached.cached)
    assert not (gen.ids == tiny_model.tokenizer.mask_id).any()


def test_cache_never_reads_held_visual_tokens(tiny_model, solid_images):
    pb = tiny_model.prompt_batch(QUESTIONS[:2], solid_images[:2])
    held = torch.zeros_like(pb.attention_mask)
    held[0, pb.image_positions[0, :5]] = True
    held[1, pb.image_positions[1, -3:]] = True
    calls = Calls(tiny_model)
    calls(pb, SamplerConfig(16, 16, 16, prompt_cache_refresh=8), held=held)
    expected = torch.where(held[..., None], tiny_model.mask_embedding(), pb.embeds)
    assert calls.prompts and calls.cached  # the prompt reaches the model only in the full forwards
    for prompt in calls.prompts:
        for row in prompt:
            assert any(torch.equal(row, e) for e in expected)


def test_threshold_commits_in_parallel_and_cuts_model_calls(tiny_model, solid_images):
    # make the first 8 of 16 answer positions confident (softmax ~0.98 on one ordinary token); the rest stay
    # near uniform (~1/V), so the threshold commits those 8 at once and the others one per step
    bias = torch.zeros(16, tiny_model.lm_config.vocab_size)
    bias[:8, 100] = 12.0
    orig, calls = tiny_model.forward_embeds, []
    tiny_model.forward_embeds = lambda e, m=None, **kw: calls.append(1) or orig(e, m, **kw) + bias
    pb = tiny_model.prompt_batch(QUESTIONS, solid_images)
    snaps = []
    try:
        exact = generate(tiny_model, pb, SamplerConfig(16, 16, 16))
        n_exact = len(calls)
        fast = generate(tiny_model, pb, SamplerConfig(16, 16, 16, confidence_threshold=0.9),
                        on_step=lambda ids, m: snaps.append(m.clone()))
    finally:
        del tiny_model.forward_embeds
    assert n_exact == exact.steps_run == 16 and len(calls) - n_exact == fast.steps_run <= 9
    assert ((~snaps[0]).sum(1) == 8).all() and (fast.ids[:, :8] == 100).all()
    prev = snaps[0]
    for mask in snaps[1:]:  # afterwards the scheduled token per running row
        assert ((prev & ~mask).sum(1) == prev.any(1).long()).all()
        prev = mask


def test_bad_approximation_settings_are_named():
    with pytest.raises(ValueError, match=r"confidence_threshold must be in \(0, 1\] \(1 = off\), got 1.5"):
        SamplerConfig(confidence_threshold=1.5)
    with pytest.raises(ValueError, match="confidence_threshold 0.9 needs remasking 'low_confidence'"):
        SamplerConfig(confidence_threshold=0.9, remasking="random")
    with pytest.raises(ValueError, match="prompt_cache_refresh must be >= 0 .*got -1"):
        SamplerConfig(prompt_cache_refresh=-1)
