"""Purification: which tokens are held, that they stay masked, and that only answers change."""

from __future__ import annotations

import pytest
import torch

from disp.config import PurifyConfig, SamplerConfig
from disp.purify import choose_masked, held_positions, purify_batch

CFG = PurifyConfig(sampler=SamplerConfig(8, 8, 8))


def test_choose_masked_counts_and_modes():
    scores = torch.rand(3, 16)
    top = choose_masked(scores, 16, 3, 0.3, "saliency")
    assert top.shape == (3, 4)  # floor(0.3 * 16)
    assert torch.equal(top.sort(1).values, scores.topk(4, 1).indices.sort(1).values)
    rand = choose_masked(None, 16, 3, 0.3, "random", torch.Generator().manual_seed(0))
    assert rand.shape == (3, 4) and all(len(set(r.tolist())) == 4 for r in rand)
    assert choose_masked(None, 16, 3, 0.3, "none").shape == (3, 0)
    with pytest.raises(ValueError, match="masking must be one of"):
        choose_masked(scores, 16, 3, 0.3, "entropy")


def test_min_score_leaves_low_scoring_top_tokens_visible(tiny_model, solid_images):
    scores = torch.zeros(3, 16)
    scores[0, 7] = 40.0  # one outstanding token
    scores[1, :] = 0.01  # nothing outstanding
    scores[2, [1, 2, 3, 4, 5]] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])  # more than floor(ρ·N_v) = 4
    idx = choose_masked(scores, 16, 3, 0.3, "saliency", min_score=1.0)
    assert idx.shape == (3, 4)
    assert sorted(idx[0].tolist()) == [-1, -1, -1, 7] and idx[1].tolist() == [-1] * 4
    assert sorted(idx[2].tolist()) == [1, 2, 3, 4]  # still capped at the top ρ
    prompt = tiny_model.prompt_batch(["What is it?"] * 3, solid_images[:3])
    held = held_positions(prompt, idx)
    assert held[0].nonzero().flatten().tolist() == [int(prompt.image_positions[0, 7])]
    assert not held[1].any() and held[2].sum() == 4
    out = purify_batch(tiny_model, ["What is it?"] * 3, solid_images[:3], idx, CFG)
    assert out.masked[0] == [7] and out.masked[1] == [] and sorted(out.masked[2]) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="min_score must be >= 0, got -1"):
        PurifyConfig(min_score=-1)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\), got 1.0"):
        PurifyConfig(mask_ratio=1.0)


def test_held_positions_point_at_the_chosen_visual_tokens(tiny_model, solid_images):
    prompt = tiny_model.prompt_batch(["What is it?", "Describe this image in detail."], solid_images[:2])
    idx = torch.tensor([[0, 5], [3, 15]])
    held = held_positions(prompt, idx)
    assert held.sum().item() == 4
    for b in range(2):
        cols = held[b].nonzero().flatten().tolist()
        assert cols == sorted(prompt.image_positions[b, idx[b]].tolist())


def test_held_tokens_stay_masked_for_the_whole_generation(tiny_model, solid_images):
    seen = []
    orig = tiny_model.forward_embeds
    tiny_model.forward_embeds = lambda e, m=None, **kw: (seen.append(e.detach().clone()), orig(e, m, **kw))[1]
    try:
        idx = torch.tensor([[1, 2, 3, 4]])
        out = purify_batch(tiny_model, ["What is it?"], solid_images[:1], idx, CFG)
    finally:
        del tiny_model.forward_embeds
    prompt = tiny_model.prompt_batch(["What is it?"], solid_images[:1])
    cols = prompt.image_positions[0, idx[0]]
    e_mask = tiny_model.mask_embedding()
    assert seen and all(torch.equal(e[0, cols], e_mask.expand(4, -1)) for e in seen)
    others = prompt.image_positions[0, 5:]
    assert all(torch.equal(e[0, others], prompt.embeds[0, others]) for e in seen)
    assert out.masked == [[1, 2, 3, 4]] and isinstance(out.answers[0], str)


def test_masking_changes_what_the_model_sees(tiny_model, solid_images):
    none = purify_batch(tiny_model, ["What is it?"] * 4, solid_images, torch.zeros(4, 0, dtype=torch.long), CFG)
    most = purify_batch(tiny_model, ["What is it?"] * 4, solid_images,
                        torch.arange(15).expand(4, 15), CFG)
    # with 15 of 16 visual tokens masked the four images become nearly indistinguishable
    assert len(set(most.answers)) <= len(set(none.answers))
