"""LaViDa family: OLMo-named checkpoint I/O, 2x2 token pooling, prefix-DLM cache, sampler, complementary loss."""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from disp import models
from disp.config import LaViDaSampling, SamplerConfig
from disp.losses import training_batch
from disp.losses_lavida import complementary_loss, complementary_masks, mean_masked_cross_entropy
from disp.models.checkpoint import CheckpointError, read_state_dict, write_state_dict
from disp.models.lavida import LaViDa, olmo_lm_config, pool_visual_tokens
from disp.models.tiny import tiny_config, write_tiny_checkpoint
from disp.sampling_lavida import generate, schedule_counts, shift_schedule, transfer_schedule


def lav(gen: int, block: int, **options) -> SamplerConfig:
    """A sampler of `gen` tokens in blocks of `block` with LaViDa options (steps = gen: LaViDa ignores it)."""
    extra = {k: options.pop(k) for k in ("temperature", "remasking") if k in options}
    return SamplerConfig(gen, block, gen, **extra, lavida=LaViDaSampling(**options))


@pytest.fixture(scope="session")
def lavida_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "lavida", family="lavida", seed=1)


@pytest.fixture(scope="session")
def lavida(lavida_dir) -> LaViDa:
    return models.load(lavida_dir)


@pytest.fixture
def images() -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 90)]]


# -- checkpoint ------------------------------------------------------------------------------------
def test_tiny_checkpoint_has_published_olmo_layout(lavida_dir, lavida):
    index = json.loads((lavida_dir / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1, "tiny checkpoint should be sharded"
    block = "model.transformer.blocks.1."
    expected = ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
                "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"]
    expected += [f"{block}{m}.weight" for m in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm",
                                                 "ff_proj", "up_proj", "ff_out")]
    assert set(expected) <= keys
    assert not any(k.startswith(("lm_head", "model.layers", "model.embed_tokens")) for k in keys)
    cfg = json.loads((lavida_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLladaForMaskedDiffusion"] and cfg["model_type"] == "llava_llada"
    assert models.detect_family(cfg) == "lavida" and isinstance(lavida, LaViDa)
    # no weight tying: the head is its own tensor
    assert lavida.model.transformer.ff_out.weight.data_ptr() != lavida.model.transformer.wte.weight.data_ptr()


def test_round_trip_reproduces_weights_and_logits(lavida_dir, lavida, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(lavida_dir, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    write_state_dict(lavida.state_dict(), out)
    again = models.load(out)
    a, b = lavida.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 7, lavida.lm_config.hidden_size)
    assert torch.equal(lavida.forward_embeds(x), again.forward_embeds(x))


def test_mismatch_names_olmo_keys(lavida_dir, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(lavida_dir, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = read_state_dict(lavida_dir)
    del state["model.transformer.blocks.1.attn_out.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2)
    write_state_dict(state, out)
    with pytest.raises(CheckpointError) as err:
        models.load(out)
    assert "missing keys (1): model.transformer.blocks.1.attn_out.weight" in str(err.value)
    assert "unexpected keys (1): model.layers.0.self_attn.q_proj.weight" in str(err.value)


class _Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickles_are_refused_unopened(lavida_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "mm_projector.bin"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="pickle"):
        models.load(lavida_dir, projector=evil)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(lavida_dir / name, ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="pickle"):
        models.load(ckpt)
    assert not (tmp_path / "PWNED").exists()


def test_olmo_config_fields_and_refusals():
    cfg = tiny_config("lavida", 512, lm={"n_kv_heads": 2, "layer_norm_eps": 1e-6})
    del cfg["rms_norm_eps"]
    cfg["embedding_size"] = 576  # padded rows of wte / ff_out win over vocab_size
    lm = olmo_lm_config(cfg)
    assert (lm.vocab_size, lm.hidden_size, lm.num_key_value_heads, lm.rms_norm_eps) == (576, 64, 2, 1e-6)
    with pytest.raises(CheckpointError, match="weight_tying=True"):
        olmo_lm_config({**cfg, "weight_tying": True})
    with pytest.raises(CheckpointError, match="d_model"):
        olmo_lm_config({"n_heads": 4, "n_layers": 2, "vocab_size": 8})


# -- visual tokens ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("image_size", "side"), [(56, 4), (70, 5)])
def test_pooling_keeps_ceil_half_side_squared_tokens(tmp_path, image_size, side):
    m = models.load(write_tiny_checkpoint(tmp_path / "m", family="lavida", vision={"image_size": image_size}))
    pooled = math.ceil(side / 2) ** 2
    assert m.num_image_tokens == pooled
    noise = np.random.default_rng(0).integers(0, 256, size=(3, 40, 30, 3), dtype=np.uint8)
    pix = m.preprocess([Image.fromarray(a) for a in noise])
    feats = m.vision_features(pix)
    assert feats.shape[:2] == (3, side * side)
    emb = m.encode_images(pix)
    assert emb.shape == (3, pooled, m.lm_config.hidden_size)
    # pooled after the projector, as LaViDa's get_2dPool (the order matters: GELU sits in between)
    torch.testing.assert_close(emb, pool_visual_tokens(m.projector(feats), 2, "bilinear"))
    assert not torch.allclose(emb, m.projector(pool_visual_tokens(feats, 2, "bilinear")), atol=1e-4)


def test_bilinear_pool_is_2x2_average_on_even_grids():
    x = torch.randn(2, 36, 5)
    grid = x.transpose(1, 2).reshape(2, 5, 6, 6)
    expect = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_visual_tokens(x, 2, "bilinear"), expect)
    assert pool_visual_tokens(torch.randn(1, 729, 3)).shape == (1, 196, 3)  # LaViDa's 27x27 → 14x14
    assert pool_visual_tokens(torch.randn(1, 729, 3), 2, "average").shape == (1, 169, 3)


# -- forward ---------------------------------------------------------------------------------------
def test_padding_does_not_change_a_samples_logits(lavida, images):
    pb = lavida.prompt_batch(["What is it?", "Describe this image in detail, please, carefully."], images[:2])
    assert not pb.attention_mask[0].all()
    alone = lavida.prompt_batch(["What is it?"], images[:1])
    n = alone.embeds.shape[1]
    with torch.no_grad():
        batched = lavida.forward_embeds(pb.embeds, pb.attention_mask)[0, -n:]
        single = lavida.forward_embeds(alone.embeds, alone.attention_mask)[0]
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_prefix_cache_equals_prefix_masked_forward(lavida, images):
    pb = lavida.prompt_batch(["What is it?", "Describe this image in detail."], images[:2])
    B, P, D = pb.embeds.shape
    answer = torch.randn(B, 6, D) * 0.02
    full = torch.cat([pb.embeds, answer], 1)
    mask = torch.cat([pb.attention_mask, torch.ones(B, 6, dtype=torch.bool)], 1)
    with torch.no_grad():
        prefixed = lavida.forward_embeds(full, mask, prefix_length=P)
        cached = lavida.forward_cached(answer, lavida.prefill(pb))
        bidirectional = lavida.forward_embeds(full, mask)
        other = lavida.forward_embeds(torch.cat([pb.embeds, -answer], 1), mask, prefix_length=P)
    torch.testing.assert_close(cached, prefixed[:, P:], atol=1e-5, rtol=1e-5)
    # under the prefix mask the prompt ignores the answer; with full attention it does not
    torch.testing.assert_close(other[:, :P], prefixed[:, :P])
    assert not torch.allclose(bidirectional[:, P:], prefixed[:, P:], atol=1e-4)


# -- sampler ---------------------------------------------------------------------------------------
def test_shift_schedule_by_hand():
    assert shift_schedule(8, 4, 3.0) == [1, 1, 2, 4]  # floor(8σ) = 0, 4, 6, 7, 8 → 4, 2, 1, 1 reversed
    assert shift_schedule(4, 4, 3.0) == [1, 1, 1, 1]  # 2, 1, 0, 1 → ≥1 → 2, 1, 1, 1 → excess from the front
    assert shift_schedule(3, 8, 3.0) == [1, 1, 1]  # never more steps than tokens
    for n, s in [(32, 16), (32, 32), (17, 5), (64, 7)]:
        counts = shift_schedule(n, s, 3.0)
        assert sum(counts) == n and min(counts) >= 1 and len(counts) == min(n, s)
    assert shift_schedule(12, 4, 1.0) == [3, 3, 3, 3]  # s = 1 is the linear schedule


def test_step_count_is_lavidas():
    """LaViDa's generate: steps = gen_length (the steps argument is ignored), per block gen_length / blocks or
    step_per_block capped at block_length, times step_ratio, truncated."""
    assert LaViDaSampling().steps_per_block(32, 32) == 16  # paper: 32 tokens, one block, step_ratio 0.5
    assert LaViDaSampling(step_ratio=1.0).steps_per_block(64, 32) == 32
    assert LaViDaSampling(step_ratio=0.5).steps_per_block(16, 16) == 8
    assert LaViDaSampling(step_ratio=0.3).steps_per_block(24, 8) == 2  # int(8 * 0.3)
    assert LaViDaSampling(step_ratio=1.0, step_per_block=6).steps_per_block(24, 8) == 6
    assert LaViDaSampling(step_ratio=1.0, step_per_block=64).steps_per_block(24, 8) == 8
    with pytest.raises(ValueError, match="prefix_lm"):
        LaViDaSampling(prefix_lm=False)  # the cache is on by default
    with pytest.raises(ValueError, match="schedule"):
        LaViDaSampling(schedule="cosine")
    with pytest.raises(ValueError, match="step_per_block 4 and step_ratio 0.5"):
        LaViDaSampling(step_per_block=4)


def test_a_step_ratio_that_leaves_no_step_is_named(lavida, images):
    cfg = SamplerConfig(8, 2, 8, lavida=LaViDaSampling(step_ratio=0.4))  # int(2 * 0.4) = 0; fine for LLaDA-V
    with pytest.raises(ValueError, match="step_ratio 0.4 leaves no step in a block of 2"):
        generate(lavida, lavida.prompt_batch(["Hi"], images[:1]), cfg)


def test_lavida_defaults_are_its_captioning_eval():
    """eval/run_coco.sh: prefix_lm=True, step_ratio=0.5, schedule=shift, schedule__shift=0.33."""
    d = LaViDaSampling()
    assert (d.prefix_lm, d.kv_cache, d.step_ratio, d.schedule, d.shift, d.step_per_block) == \
        (True, True, 0.5, "shift", 0.33, 0)


def test_logit_normal_schedule_by_hand():
    # Φ(logit t) on t = 0, 1/4, 1/2, 3/4, 1 is 0, 0.136, 0.5, 0.864, 1; times 8, floored: 0, 1, 4, 6, 8;
    # increments 1, 3, 2, 2, reversed
    assert schedule_counts(8, 4, "logit_normal") == [2, 2, 3, 1]
    for n, s in [(32, 16), (17, 5)]:
        counts = schedule_counts(n, s, "logit_normal")
        assert sum(counts) == n and min(counts) >= 1


def lavida_generate(model, prompt, gen: int, block: int, *, steps: int, step_ratio=None, step_per_block=None,
                    schedule=None, shift=3.0, prefix_lm=False) -> list[int]:
    """LaViDa's llada/generate.py on one prompt, as its code behaves: `steps` is overwritten by max_new_tokens,
    divided by the number of blocks, replaced by min(step_per_block, block) if given, times step_ratio
    (int); every step runs the whole sequence (no early stop) and commits the top-k confidences of the
    current block. Returns the answer up to the first <|eot_id|>."""
    tok = model.tokenizer
    steps = gen  # generate() ignores its steps argument
    blocks = gen // block
    steps //= blocks
    if step_per_block:
        steps = min(step_per_block, block)
    if step_ratio:
        steps = int(steps * step_ratio)
    P = prompt.embeds.shape[1]
    x = torch.full((gen,), tok.mask_id)
    for nb in range(blocks):
        lo, hi = nb * block, (nb + 1) * block
        if schedule is None:
            counts = [block // steps + (1 if i < block % steps else 0) for i in range(steps)]
        else:
            counts = shift_schedule(block, steps, shift)
        for i in range(steps):
            masked = x == tok.mask_id
            if not masked[lo:hi].any():
                continue
            embeds = torch.cat([prompt.embeds[0], lavida_embed(model, x)])[None]
            kw = {"prefix_length": P} if prefix_lm else {}
            logits = model.forward_embeds(embeds, None, logits_from=P, **kw)[0].double()
            x0 = logits.argmax(-1)
            conf = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
            conf[hi:] = float("-inf")
            conf = torch.where(masked, conf, float("-inf"))
            x[conf.topk(counts[i]).indices] = x0[conf.topk(counts[i]).indices]
    out = x.tolist()
    return out[: out.index(tok.eot_id)] if tok.eot_id in out else out


def lavida_embed(model, ids):
    with torch.no_grad():
        return model.embed_tokens(ids)


@pytest.mark.parametrize(("gen", "block", "steps", "options"), [
    (16, 16, 4, {"step_ratio": 0.5, "schedule": "shift", "shift": 3.0}),  # steps < gen_length: ignored
    (16, 8, 2, {"step_ratio": 1.0, "schedule": "uniform"}),
    (24, 8, 24, {"step_ratio": 1.0, "step_per_block": 5, "schedule": "uniform"}),
    (16, 16, 8, {"step_ratio": 0.5, "schedule": "shift", "shift": 0.33, "prefix_lm": True}),
])
def test_steps_mean_what_lavidas_generate_means(lavida, images, gen, block, steps, options):
    questions = ["What is it?", "Describe this image in detail."]
    opts = {"prefix_lm": False, **options}
    cfg = SamplerConfig(gen, block, steps, lavida=LaViDaSampling(**opts, kv_cache=opts["prefix_lm"]))
    ref_kw = {"step_ratio": opts["step_ratio"], "step_per_block": opts.get("step_per_block"),
              "schedule": None if opts["schedule"] == "uniform" else "shift", "shift": opts.get("shift", 3.0),
              "prefix_lm": opts["prefix_lm"]}
    with pytest.warns(UserWarning, match="ignores steps") if steps != gen else contextlib.nullcontext():
        ours = generate(lavida, lavida.prompt_batch(questions * 2, images), cfg).answers()
    for q, img, answer in zip(questions * 2, images, ours, strict=True):
        with torch.no_grad():
            ref = lavida_generate(lavida, lavida.prompt_batch([q], [img]), gen, block, steps=steps, **ref_kw)
        assert answer == ref


@pytest.mark.parametrize("cfg", [
    lav(16, 16),
    lav(16, 8, step_ratio=1.0, schedule="uniform", prefix_lm=False, kv_cache=False),
    lav(24, 8, step_ratio=0.5, shift=2.0, remasking="random", temperature=0.7),
    lav(16, 16, step_ratio=1.0, schedule="logit_normal"),
])
def test_commits_exactly_the_scheduled_tokens_per_step(lavida, images, cfg):
    pb = lavida.prompt_batch(["What is it?"] * 2, images[:2])
    snaps = []
    gen = generate(lavida, pb, cfg, generator=torch.Generator().manual_seed(0),
                   on_step=lambda ids, m: snaps.append(m.clone()))
    per_block = transfer_schedule(cfg.block_length, cfg.lavida.steps_per_block(cfg.gen_length, cfg.block_length),
                                  cfg.lavida)
    schedule = per_block * (cfg.gen_length // cfg.block_length)
    assert len(snaps) == gen.steps_run <= len(schedule)
    prev = torch.ones_like(snaps[0])
    for step, mask in enumerate(snaps):
        assert (prev & ~mask).sum(1).tolist() == [schedule[step]] * 2
        assert not (mask & ~prev).any()  # committed tokens stay committed
        assert not mask[:, : (step // len(per_block)) * cfg.block_length].any()  # blocks fill left to right
        prev = mask


def test_held_positions_stay_masked_and_prompt_is_untouched(lavida, images):
    pb = lavida.prompt_batch(["What is it?"], images[:1])
    before = pb.embeds.clone()
    held = torch.zeros_like(pb.attention_mask)
    held[0, pb.image_positions[0]] = True
    seen = []
    orig = lavida.forward_embeds

    def spy(embeds, mask=None, **kw):
        seen.append(embeds[:, : pb.embeds.shape[1]].clone())
        return orig(embeds, mask, **kw)

    lavida.forward_embeds = spy
    try:
        generate(lavida, pb, lav(8, 8, prefix_lm=False, kv_cache=False), held=held)
    finally:
        del lavida.forward_embeds
    e_mask = lavida.mask_embedding()
    assert seen
    for prompt in seen:
        assert torch.equal(prompt[0, held[0]], e_mask.expand(int(held.sum()), -1))
        assert torch.equal(prompt[0, ~held[0]], before[0, ~held[0]])
    assert torch.equal(pb.embeds, before)


def _biased(model, token_id: int, bias: float = 50.0):
    """forward_embeds with one token's logit raised; returns the original to restore."""
    orig = model.forward_embeds
    boost = torch.zeros(model.lm_config.vocab_size)
    boost[token_id] = bias
    model.forward_embeds = lambda e, m=None, **kw: orig(e, m, **kw) + boost
    return orig


def test_stop_at_eot_and_no_eos_suppression(lavida, images):
    tok = lavida.tokenizer
    pb = lavida.prompt_batch(["Hi"], images[:1])
    _biased(lavida, tok.eot_id)
    try:
        gen = generate(lavida, pb, lav(16, 16, step_ratio=1.0, schedule="uniform", prefix_lm=False, kv_cache=False))
    finally:
        del lavida.forward_embeds
    assert gen.lengths.tolist() == [0] and gen.steps_run == 1
    _biased(lavida, tok.eos_id)  # LLaDA-V would forbid EOS at masked positions; LaViDa does not
    try:
        gen = generate(lavida, pb, lav(8, 8, step_ratio=1.0, prefix_lm=False, kv_cache=False))
    finally:
        del lavida.forward_embeds
    assert (gen.ids == tok.eos_id).all()


def test_batched_equals_per_sample(lavida, images):
    questions = ["What is it?", "Describe this image in detail.", "Colour?", "Where is the object in the image?"]
    cfg = lav(16, 8)
    batched = generate(lavida, lavida.prompt_batch(questions, images), cfg).answers()
    for q, img, ans in zip(questions, images, batched, strict=True):
        assert generate(lavida, lavida.prompt_batch([q], [img]), cfg).answers()[0] == ans


def test_cached_generation_equals_uncached_under_prefix_mask(lavida, images):
    pb = lavida.prompt_batch(["What is it?", "Describe this image in detail."], images[:2])
    held = torch.zeros_like(pb.attention_mask).scatter_(1, pb.image_positions[:, :2], True)
    calls = []
    orig = lavida.forward_cached
    lavida.forward_cached = lambda e, c: calls.append(e.shape) or orig(e, c)
    try:
        cached = generate(lavida, pb, lav(16, 8, prefix_lm=True, kv_cache=True), held=held)
    finally:
        del lavida.forward_cached
    plain = generate(lavida, pb, lav(16, 8, prefix_lm=True, kv_cache=False), held=held)
    assert calls and all(s[1] == 16 for s in calls)  # only the answer runs through the model
    assert torch.equal(cached.ids, plain.ids) and torch.equal(cached.lengths, plain.lengths)


def test_model_hooks(lavida, images):
    assert lavida.default_sampler() == SamplerConfig()
    pb = lavida.prompt_batch(["What is it?"], images[:1])
    assert torch.equal(lavida.generate(pb).ids, generate(lavida, pb, lavida.default_sampler()).ids)


# -- loss ------------------------------------------------------------------------------------------
def test_complementary_masks_partition_the_candidates():
    cand = torch.zeros(500, 40, dtype=torch.bool)
    cand[:, 10:] = True
    cand[::2, 35:] = False
    for t in (torch.zeros(500), torch.linspace(0, 1, 500), torch.ones(500)):
        m, c, p = complementary_masks(cand, t=t, generator=torch.Generator().manual_seed(0))
        assert not (m & c).any() and torch.equal(m | c, cand)
        assert m.sum(1).min() >= 1  # at least one masked, even at t = 0
    m, _, p = complementary_masks(cand, t=torch.linspace(0, 1, 500), generator=torch.Generator().manual_seed(1))
    rate = m.sum(1) / cand.sum(1)
    assert abs((rate - p).mean()) < 0.02


def test_mean_cross_entropy_by_hand():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[-100, 1, 2], [-100, 4, 5]])
    masked = torch.tensor([[False, True, False], [False, True, True]])
    ce = F.cross_entropy
    expect = (ce(logits[0, 1], targets[0, 1]) + ce(logits[1, 1], targets[1, 1]) + ce(logits[1, 2], targets[1, 2])) / 3
    torch.testing.assert_close(mean_masked_cross_entropy(logits, targets, masked), expect)


def test_loss_doubles_the_batch_and_has_zero_gradient_off_the_targets(lavida, images):
    b = training_batch(lavida, ["What?", "Where?"], ["A red ball.", "Top left."], images[:2])
    seen = {}
    orig = lavida.forward_embeds

    def spy(embeds, mask=None, **kw):
        seen["embeds"], seen["logits"] = embeds, orig(embeds, mask, **kw)
        seen["logits"].retain_grad()
        return seen["logits"]

    lavida.forward_embeds = spy
    try:
        loss = complementary_loss(lavida, b, generator=torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        del lavida.forward_embeds
    # the same draws, replayed: copy 1 masks M, copy 2 masks the complement
    masked, comp, _ = complementary_masks(b.answer_mask, generator=torch.Generator().manual_seed(0))
    sel = torch.cat([masked, comp])
    noised = (seen["embeds"] == lavida.mask_embedding()).all(-1)
    assert seen["embeds"].shape[0] == 4 and torch.equal(noised, sel)
    grad = seen["logits"].grad
    assert torch.all(grad[~sel] == 0) and torch.all(grad[~b.answer_mask.repeat(2, 1)] == 0)
    assert grad[sel].abs().sum() > 0 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lavida.projector.parameters())
    lavida.zero_grad(set_to_none=True)


def test_prefix_lm_training_uses_the_prompt_as_prefix(lavida, images):
    b = training_batch(lavida, ["What?"], ["A red ball."], images[:1])
    seen = {}
    orig = lavida.forward_embeds

    def spy(embeds, mask=None, **kw):
        seen.update(kw)
        return orig(embeds, mask, **kw)

    lavida.forward_embeds = spy
    try:
        with torch.no_grad():
            complementary_loss(lavida, b, generator=torch.Generator().manual_seed(0), prefix_lm=True)
    finally:
        del lavida.forward_embeds
    assert seen["prefix_length"] == int((~b.answer_mask[0]).sum())
