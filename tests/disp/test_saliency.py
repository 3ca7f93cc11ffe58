"""Saliency (Eq. 3-8): probe covariance, exact form vs brute force and vs the KL, Hutchinson convergence."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from disp import models
from disp.config import SaliencyConfig, SamplerConfig
from disp.saliency import (
    exact_saliency,
    first_step_inputs,
    fisher_probes_from_noise,
    hutchinson_saliency,
    isolation_saliency,
    occlusion_saliency,
    top_salient,
    visual_saliency,
)

SAMPLER = SamplerConfig(16, 16, 16)


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    img = Image.new("RGB", (56, 56), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 13, 13], fill=(0, 0, 0))
    draw.ellipse([20, 20, 50, 50], fill=(200, 30, 30))
    return img


def test_probe_covariance_is_the_fisher():
    p = torch.softmax(torch.randn(3, 5), -1)
    y = torch.randn((200_000, *p.shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = fisher_probes_from_noise(p, y)  # (M, 3, 5): with u = √p, u ⊙ (y − (y·u) u) has covariance diag p − ppᵀ
    for row in range(3):
        cov = torch.einsum("mi,mj->ij", q[:, row], q[:, row]) / q.shape[0]
        fisher = torch.diag(p[row]).double() - torch.outer(p[row], p[row]).double()
        torch.testing.assert_close(cov, fisher, atol=3e-3, rtol=0)


def test_exact_matches_brute_force_jacobian(tiny_model, scene):
    pb = tiny_model.prompt_batch(["What is it?"], [scene])
    cfg = SaliencyConfig(topk=5)
    exact = exact_saliency(tiny_model, pb, cfg, SAMPLER)[0]
    embeds, mask = first_step_inputs(tiny_model, pb, SAMPLER.gen_length)
    P = pb.embeds.shape[1]
    with torch.no_grad():
        logits = tiny_model.forward_embeds(embeds, mask)[0, P : P + 16]
    idx = logits.topk(5, -1).indices
    p = torch.softmax(logits.gather(-1, idx).double(), -1)
    e_mask = tiny_model.mask_embedding().detach()
    for i in (0, 7, 15):
        col = int(pb.image_positions[0, i])

        def z_of_token(e, col=col):
            x = embeds.detach().clone()
            x[0, col] = e
            return tiny_model.forward_embeds(x, mask)[0, P : P + 16].gather(-1, idx)

        J = torch.autograd.functional.jacobian(z_of_token, embeds[0, col].detach())  # (G, k, D)
        delta = e_mask - embeds[0, col].detach()
        jd = (J @ delta).double()  # (G, k)
        fisher = torch.diag_embed(p) - p[..., None] * p[..., None, :]
        expect = 0.5 * torch.einsum("gi,gij,gj->", jd, fisher, jd)
        torch.testing.assert_close(exact[i].double(), expect, rtol=1e-3, atol=1e-9)


def _kl_after(model, pb, edit):
    """Top-5 KL of the first block's distributions after `edit(embeds)` changes the first-step input, float64."""
    embeds, mask = first_step_inputs(model, pb, SAMPLER.gen_length)
    P = pb.embeds.shape[1]
    with torch.no_grad():
        base = model.forward_embeds(embeds, mask)[0, P : P + 16]
        idx = base.topk(5, -1).indices
        logp = torch.log_softmax(base.gather(-1, idx), -1)
        x = embeds.clone()
        edit(x)
        logq = torch.log_softmax(model.forward_embeds(x, mask)[0, P : P + 16].gather(-1, idx), -1)
    return (logp.exp() * (logp - logq)).sum()


def test_exact_is_the_second_order_kl(tiny_dir, scene):
    model = models.load(tiny_dir, dtype=torch.float64)
    pb = model.prompt_batch(["What is it?"], [scene])
    exact = exact_saliency(model, pb, SaliencyConfig(), SAMPLER)[0].double()
    eps = 1e-3
    for i in (2, 9):
        col = int(pb.image_positions[0, i])

        def nudge(x, col=col):
            x[0, col] += eps * (model.mask_embedding() - x[0, col])

        torch.testing.assert_close(_kl_after(model, pb, nudge) / eps**2, exact[i], rtol=2e-2, atol=0)


def test_hutchinson_converges_like_one_over_sqrt_m(tiny_model, scene):
    pb = tiny_model.prompt_batch(["What is it?"], [scene])
    exact = exact_saliency(tiny_model, pb, SaliencyConfig(), SAMPLER)
    errors = {}
    for m in (8, 64, 512):
        runs = [hutchinson_saliency(tiny_model, pb, SaliencyConfig(probes=m), SAMPLER,
                                    generator=torch.Generator().manual_seed(s)) for s in range(4)]
        errors[m] = sum(float((h - exact).norm() / exact.norm()) for h in runs) / len(runs)
        if m == 64:
            agree = [len(set(top_salient(h, 0.3)[0].tolist()) & set(top_salient(exact, 0.3)[0].tolist())) for h in runs]
    # each 8x more probes should cut the error by about sqrt(8) = 2.8
    assert 1.8 < errors[8] / errors[64] < 4.5, errors
    assert 1.8 < errors[64] / errors[512] < 4.5, errors
    assert errors[512] < 0.08, errors
    n_top = int(0.3 * tiny_model.num_image_tokens)
    assert sum(agree) / (len(agree) * n_top) >= 0.9


def test_batched_scores_equal_per_sample(tiny_model, scene, solid_images):
    images = [scene, solid_images[0], solid_images[2]]
    questions = ["What is it?", "Describe this image in detail.", "Colour?"]
    cfg = SaliencyConfig(exact=True)
    batched = visual_saliency(tiny_model, tiny_model.prompt_batch(questions, images), cfg, SAMPLER)
    for b, (q, img) in enumerate(zip(questions, images, strict=True)):
        single = visual_saliency(tiny_model, tiny_model.prompt_batch([q], [img]), cfg, SAMPLER)[0]
        torch.testing.assert_close(batched[b], single, rtol=1e-3, atol=1e-9)


def test_occlusion_is_the_kl_of_masking_one_token(tiny_dir, scene):
    model = models.load(tiny_dir, dtype=torch.float64)
    pb = model.prompt_batch(["What is it?"], [scene])
    occ = occlusion_saliency(model, pb, SaliencyConfig(), SAMPLER)[0].double()
    for i in (0, 5, 15):
        col = int(pb.image_positions[0, i])

        def occlude(x, col=col):
            x[0, col] = model.mask_embedding()

        torch.testing.assert_close(occ[i], _kl_after(model, pb, occlude), rtol=1e-6, atol=1e-12)
    assert (occ >= 0).all() and occ.max() > 0


def test_occlusion_is_near_the_fisher_form_for_a_near_mask_token(tiny_dir, scene):
    """With visual token i moved to within 1e-3 of the mask embedding, the exact KL and the quadratic form
    (which is its second-order term) agree."""
    model = models.load(tiny_dir, dtype=torch.float64)
    pb = model.prompt_batch(["What is it?"], [scene])
    i = 3
    col = int(pb.image_positions[0, i])
    pb.embeds[0, col] = model.mask_embedding().detach() - 1e-3 * (model.mask_embedding().detach() - pb.embeds[0, col])
    occ = occlusion_saliency(model, pb, SaliencyConfig(), SAMPLER)[0, i].double()
    quad = exact_saliency(model, pb, SaliencyConfig(), SAMPLER)[0, i].double()
    torch.testing.assert_close(occ, quad, rtol=2e-2, atol=0)


@pytest.mark.parametrize("method", ["occlusion", "isolation"])
def test_per_token_kl_scores_do_not_depend_on_batch_or_chunk(tiny_model, scene, solid_images, method):
    images = [scene, solid_images[0], solid_images[2]]
    questions = ["What is it?", "Describe this image in detail.", "Colour?"]
    batched = visual_saliency(tiny_model, tiny_model.prompt_batch(questions, images),
                              SaliencyConfig(method=method, occlusion_rows=7), SAMPLER)
    for b, (q, img) in enumerate(zip(questions, images, strict=True)):
        single = visual_saliency(tiny_model, tiny_model.prompt_batch([q], [img]),
                                 SaliencyConfig(method=method), SAMPLER)[0]
        torch.testing.assert_close(batched[b], single, rtol=1e-4, atol=1e-9)


def test_isolation_is_the_kl_of_showing_one_token_alone(tiny_dir, scene):
    model = models.load(tiny_dir, dtype=torch.float64)
    pb = model.prompt_batch(["What is it?"], [scene])
    iso = isolation_saliency(model, pb, SaliencyConfig(), SAMPLER)[0].double()
    embeds, mask = first_step_inputs(model, pb, SAMPLER.gen_length)
    P, cols = pb.embeds.shape[1], pb.image_positions[0]
    blank = embeds.clone()
    blank[0, cols] = model.mask_embedding()
    with torch.no_grad():
        log_none = torch.log_softmax(model.forward_embeds(blank, mask)[0, P : P + 16], -1)
        for i in (0, 5, 15):
            x = blank.clone()
            x[0, cols[i]] = embeds[0, cols[i]]
            alone = model.forward_embeds(x, mask)[0, P : P + 16]
            idx = alone.topk(5, -1).indices
            logp = torch.log_softmax(alone.gather(-1, idx), -1)
            logq = torch.log_softmax(log_none.gather(-1, idx), -1)
            torch.testing.assert_close(iso[i], (logp.exp() * (logp - logq)).sum(), rtol=1e-6, atol=1e-12)
    assert (iso >= 0).all() and iso.max() > 0


def test_top_salient_takes_floor_of_ratio():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.0]])
    assert sorted(top_salient(scores, 0.3)[0].tolist()) == [1, 3]  # floor(0.3 * 7) = 2
    assert top_salient(scores, 0.1).shape == (1, 0)


def test_bad_saliency_settings_are_named():
    with pytest.raises(ValueError, match="probes must be >= 1, got 0"):
        SaliencyConfig(probes=0)
    with pytest.raises(ValueError, match="topk must be >= 1, got -2"):
        SaliencyConfig(topk=-2)
    with pytest.raises(ValueError, match="method must be one of .*got 'kl'"):
        SaliencyConfig(method="kl")
    with pytest.raises(ValueError, match="occlusion_rows must be >= 1, got 0"):
        SaliencyConfig(occlusion_rows=0)


def test_probe_chunk_counts_the_rows_of_the_sequence_on_a_cpu():
    from disp.saliency import CPU_PROBE_ROWS, probe_chunk

    logits = torch.Size([8, 32, 640])  # the answer rows only (logits_from)
    cpu = torch.device("cpu")
    assert probe_chunk(6, logits, 4, cpu, rows=8 * 140) == max(1, CPU_PROBE_ROWS // (8 * 140))
    assert probe_chunk(6, logits, 4, cpu, rows=2 * 100) == 6
    assert probe_chunk(6, logits, 4, cpu, rows=10_000) == 1
    assert probe_chunk(6, logits, 4, torch.device("cuda"), rows=10_000) == 6  # GPU: the logit cotangent's bytes


def _counting_forwards(model):
    """Wrap model.forward_embeds to count the sequence copies it runs: returns the one-element count list."""
    seen = [0]
    inner = model.forward_embeds

    def forward_embeds(embeds, *args, **kw):
        seen[0] += embeds.shape[0]
        return inner(embeds, *args, **kw)

    model.forward_embeds = forward_embeds
    return seen


def _planted(model, pb, token: int, steps: int = 200):
    """pb (one row) with visual token `token` replaced by an embedding trained to move the first step when it is
    shown alone (a planted trigger): a few Adam steps on Σ_g KL(softmax z_alone ‖ softmax z_none)."""
    P, col = pb.embeds.shape[1], int(pb.image_positions[0, token])
    embeds, mask = first_step_inputs(model, pb, SAMPLER.gen_length)
    blank = embeds.detach().clone()
    blank[0, pb.image_positions[0]] = model.mask_embedding().detach()
    with torch.no_grad():
        log_none = torch.log_softmax(model.forward_embeds(blank, mask, logits_from=P)[:, :16], -1)
    v = embeds[0, col].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.2)
    for _ in range(steps):
        x = blank.clone()
        x[0, col] = v
        log_alone = torch.log_softmax(model.forward_embeds(x, mask, logits_from=P)[:, :16], -1)
        loss = -(log_alone.exp() * (log_alone - log_none)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pb.embeds[0, col] = v.detach()
    return pb


@pytest.mark.parametrize("token", [6])
def test_split_isolation_ranks_a_planted_token_first_within_its_budget(tiny_dir, scene, token):
    model = models.load(tiny_dir)
    # trained until it moves the first step more than a range of 8 clean tokens does (random weights: ~600 steps)
    pb = _planted(model, model.prompt_batch(["What is it?"], [scene]), token, steps=600)
    cfg = SaliencyConfig(method="split_isolation", split_groups=2, split_beam=1, split_budget=8)
    seen, forwards = _counting_forwards(model), []
    from disp.split_isolation import split_isolation_saliency

    scores = split_isolation_saliency(model, pb, cfg, SAMPLER, forwards=forwards)[0]
    assert int(scores.argmax()) == token
    # 16 tokens: 2 ranges of 8, then the range credited most halved per round (8 -> 4 -> 2 -> 1): 2 + 3 * 2 = 8
    # ranges, + the reference
    assert seen[0] == forwards[0] == 1 + 8
    iso = isolation_saliency(model, pb, SaliencyConfig(), SAMPLER)[0]
    torch.testing.assert_close(scores[token], iso[token], rtol=1e-4, atol=0)  # its own range is the token alone


def test_split_isolation_never_passes_its_budget(tiny_dir, scene, solid_images):
    model = models.load(tiny_dir)
    pb = model.prompt_batch(["What is it?", "Colour?", "Describe this image in detail."],
                            [scene, solid_images[0], solid_images[1]])
    # 16 tokens. (4, 2, 9): 4 ranges of 4, two halved (8), one forward left; (3, 3, 5): 3 ranges, one halved;
    # (1, 4, 20): 16 -> 2 x 8 -> 4 x 4 -> 8 x 2 (15 so far), then 5 left pay for 2 halvings (19)
    for (groups, beam, budget), spent in (((4, 2, 9), 8), ((3, 3, 5), 5), ((1, 4, 20), 19)):
        seen, forwards = _counting_forwards(model), []
        from disp.split_isolation import split_isolation_saliency

        split_isolation_saliency(model, pb, SaliencyConfig(method="split_isolation", split_groups=groups,
                                                           split_beam=beam, split_budget=budget),
                                 SAMPLER, forwards=forwards)
        assert seen[0] == forwards[0] == 3 * (1 + spent), (groups, beam, budget)
        del model.forward_embeds


def test_split_isolation_with_one_token_ranges_is_isolation(tiny_model, scene):
    pb = tiny_model.prompt_batch(["What is it?"], [scene])
    n = tiny_model.num_image_tokens
    split = visual_saliency(tiny_model, pb, SaliencyConfig(method="split_isolation", split_groups=n, split_budget=n),
                            SAMPLER)
    torch.testing.assert_close(split, isolation_saliency(tiny_model, pb, SaliencyConfig(), SAMPLER),
                               rtol=1e-5, atol=1e-9)


def test_split_isolation_batched_equals_one_by_one(tiny_model, scene, solid_images):
    images = [scene, solid_images[0], solid_images[2]]
    questions = ["What is it?", "Describe this image in detail.", "Colour?"]
    cfg = SaliencyConfig(method="split_isolation", split_groups=3, split_beam=2, split_budget=11, occlusion_rows=5)
    batched = visual_saliency(tiny_model, tiny_model.prompt_batch(questions, images), cfg, SAMPLER)
    for b, (q, img) in enumerate(zip(questions, images, strict=True)):
        single = visual_saliency(tiny_model, tiny_model.prompt_batch([q], [img]),
                                 SaliencyConfig(method="split_isolation", split_groups=3, split_beam=2,
                                                split_budget=11), SAMPLER)[0]
        torch.testing.assert_close(batched[b], single, rtol=1e-4, atol=1e-9)


def test_split_ranges_and_rounds():
    from disp.split_isolation import halves, initial_ranges, plan_round

    assert initial_ranges(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert initial_ranges(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert halves(4, 9) == [(4, 7), (7, 9)]
    open_ = {(0, 4): 5.0, (4, 5): 99.0, (5, 8): 6.0, (8, 12): 8.0, (12, 14): 4.0}
    # by score per token (1.25, -, 2, 2, 2): one-token ranges are never split; ties go to the earlier range
    assert plan_round(open_, 2, 10) == [(5, 8), (8, 12)]
    assert plan_round(open_, 3, 10) == [(5, 8), (8, 12), (12, 14)]  # (8, 12) scores most, (12, 14) credits as much
    assert plan_round(open_, 2, 3) == [(5, 8)]  # 3 forwards left pay for one pair of halves
    assert plan_round(open_, 2, 1) == []


@pytest.mark.parametrize("n, smallest", [(36, 1), (729, 1), (3699, 7)])
def test_descent_goes_deep_on_a_lone_trigger_at_llada_v_sizes(n, smallest):
    """A trigger that moves the first step by 120 nats in any range holding it, among clean tokens worth 0.5 nats
    each: within the default 20 forwards the descent takes it down to a range of `smallest` tokens, so at 36
    and 729 tokens its credit clears the 20-nat floor. At 3,699 (anyres) 20 forwards end at 7 tokens, under it."""
    from disp.config import ISOLATION_MIN_SCORE
    from disp.split_isolation import descend

    t = n * 2 // 3 + 1
    scored = descend([n], SaliencyConfig(), lambda jobs: [120.0 * (lo <= t < hi) + 0.5 * (hi - lo) for _, lo, hi in jobs])[0]
    assert len(scored) <= SaliencyConfig().split_budget
    lo, hi = min((r for r in scored if r[0] <= t < r[1]), key=lambda r: r[1] - r[0])
    assert hi - lo == smallest
    assert (scored[lo, hi] / (hi - lo) >= ISOLATION_MIN_SCORE) == (n < 3699)


def test_descent_follows_several_triggers():
    """Four separate trigger tokens in 36 (the four-patch trigger): best-first reaches each of them alone."""
    from disp.split_isolation import descend

    triggers = {3, 14, 22, 33}
    scored = descend([36], SaliencyConfig(split_budget=40),
                     lambda jobs: [120.0 * any(lo <= t < hi for t in triggers) + 0.5 * (hi - lo) for _, lo, hi in jobs])[0]
    assert {lo for lo, hi in scored if hi - lo == 1 and scored[lo, hi] > 100} == triggers


def test_bad_split_settings_are_named():
    with pytest.raises(ValueError, match="split_groups must be >= 1, got 0"):
        SaliencyConfig(split_groups=0)
    with pytest.raises(ValueError, match="split_beam must be >= 1, got -1"):
        SaliencyConfig(split_beam=-1)
    with pytest.raises(ValueError, match=r"split_budget must be >= split_groups \(4\).*got 3"):
        SaliencyConfig(split_groups=4, split_budget=3)
