"""Projector-only fine-tuning: trains the projector, leaves everything else bit-identical, resumes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from disp import models
from disp.config import FinetuneConfig
from disp.finetune import Cancelled, anchor_penalty, finetune_projector, lr_at, vision_features
from disp.losses import sft_loss, training_batch

QS = ["What is it?", "Describe it.", "Colour?", "Where?"]
ANS = ["A red box.", "A green ball at the center.", "blue.", "at the top left."]


def _run(tiny_dir, images, cfg, **kw):
    model = models.load(tiny_dir)
    feats = vision_features(model, images)
    res = finetune_projector(model, QS, ANS, feats, cfg, **kw)
    return model, res


def test_projector_changes_and_nothing_else(tiny_dir, solid_images):
    before = models.load(tiny_dir).state_dict()
    model, res = _run(tiny_dir, solid_images, FinetuneConfig(epochs=2, lr=1e-2, batch_size=2))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("model.mm_projector.") for k in changed)
    assert changed == {k for k in after if k.startswith("model.mm_projector.")}
    assert res.steps == 4 and len(res.epoch_losses) == 2


def test_fixed_noise_loss_falls(tiny_dir, solid_images):
    model = models.load(tiny_dir)
    feats = vision_features(model, solid_images)

    def loss_at_fixed_noise() -> float:
        with torch.no_grad():
            batch = training_batch(model, QS, ANS, image_embeds=model.visual_tokens(feats))
            return sum(sft_loss(model, batch, generator=torch.Generator().manual_seed(s), t=torch.full((4,), 0.5)).item()
                       for s in range(8)) / 8

    before = loss_at_fixed_noise()
    finetune_projector(model, QS, ANS, feats, FinetuneConfig(epochs=40, lr=1e-2, batch_size=4, warmup_ratio=0.0))
    assert loss_at_fixed_noise() < before - 0.05


def test_resume_matches_an_uninterrupted_run(tiny_dir, solid_images, tmp_path):
    cfg = FinetuneConfig(epochs=3, lr=1e-2, batch_size=2)
    full, _ = _run(tiny_dir, solid_images, cfg)
    calls = {"n": 0}

    def stop_in_epoch_three():
        calls["n"] += 1
        return calls["n"] > 4  # epochs 1 and 2 finish (2 batches each), epoch 3 is interrupted

    with pytest.raises(Cancelled):
        _run(tiny_dir, solid_images, cfg, state_dir=tmp_path, should_stop=stop_in_epoch_three)
    resumed, res = _run(tiny_dir, solid_images, cfg, state_dir=tmp_path)
    assert res.resumed_from_epoch == 2
    for k, v in full.projector.state_dict().items():
        torch.testing.assert_close(resumed.projector.state_dict()[k], v, rtol=0, atol=1e-6)


def _output_change(model, start, feats):
    with torch.no_grad():
        return [(a - b).pow(2).mean().item()
                for a, b in zip(model.visual_tokens(feats), model.visual_tokens(feats, projector=start), strict=True)]


def test_anchor_holds_the_anchored_samples_outputs(tiny_dir, solid_images):
    cfg = FinetuneConfig(epochs=8, lr=1e-2, batch_size=4, warmup_ratio=0.0)
    plain, _ = _run(tiny_dir, solid_images, cfg)
    start = models.load(tiny_dir)
    feats = vision_features(start, solid_images)
    keep = [True, True, False, False]
    anchored, _ = _run(tiny_dir, solid_images, replace(cfg, anchor_weight=100.0),
                       anchor=keep)
    free, held = _output_change(plain, start.projector, feats), _output_change(anchored, start.projector, feats)
    assert all(h < f / 10 for h, f, k in zip(held, free, keep, strict=True) if k)
    assert any(h > 0 for h, k in zip(held, keep, strict=True) if not k)
    pen = anchor_penalty(anchored.visual_tokens(feats), start.visual_tokens(feats), torch.tensor(keep))
    assert pen.item() > 0
    zero = anchor_penalty(start.visual_tokens(feats), start.visual_tokens(feats), torch.tensor(keep))
    assert zero.item() == 0.0


def test_anchor_weight_zero_is_the_plain_loss(tiny_dir, solid_images):
    cfg = FinetuneConfig(epochs=2, lr=1e-2, batch_size=2)
    plain, _ = _run(tiny_dir, solid_images, cfg)
    flagged, _ = _run(tiny_dir, solid_images, cfg, anchor=[True, False, True, False])
    for k, v in plain.projector.state_dict().items():
        assert torch.equal(flagged.projector.state_dict()[k], v)


def test_lr_schedule_warms_up_then_decays():
    cfg = FinetuneConfig(lr=1.0, warmup_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 0.01


def test_bad_inputs_are_named(tiny_dir, solid_images):
    model = models.load(tiny_dir)
    with pytest.raises(ValueError, match="equally many"):
        finetune_projector(model, QS, ANS[:2], vision_features(model, solid_images), FinetuneConfig())
    with pytest.raises(ValueError, match="lr must be positive, got -1"):
        FinetuneConfig(lr=-1)
    with pytest.raises(ValueError, match="anchor_weight must be >= 0, got -0.5"):
        FinetuneConfig(anchor_weight=-0.5)
    with pytest.raises(ValueError, match="anchor has 2 flags for 4 samples"):
        finetune_projector(model, QS, ANS, vision_features(model, solid_images), FinetuneConfig(), anchor=[True] * 2)


def test_bf16_on_a_cpu_is_opt_in_and_trains_only_the_projector(tiny_dir, solid_images):
    """bf16_cpu: the same run in bf16 autocast; the projector trains (float32 weights), nothing else moves, and
    the losses stay close to float32's while not being float32's."""
    before = models.load(tiny_dir).state_dict()
    cfg = FinetuneConfig(epochs=2, lr=1e-2, batch_size=2)
    _, exact = _run(tiny_dir, solid_images, cfg)
    model, mixed = _run(tiny_dir, solid_images, replace(cfg, bf16_cpu=True))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if k.startswith("model.mm_projector.")}
    assert all(after[k].dtype == before[k].dtype for k in changed)
    assert mixed.epoch_losses != exact.epoch_losses
    assert mixed.epoch_losses == pytest.approx(exact.epoch_losses, rel=5e-2)
    _, again = _run(tiny_dir, solid_images, cfg)
    assert again.epoch_losses == exact.epoch_losses  # off by default: float32, run to run identical
