"""The masked-diffusion SFT loss (Eq. 2)."""

from __future__ import annotations

import torch

from disp.losses import EPS, mask_answers, masked_diffusion_loss, sft_loss, training_batch


def test_batch_layout(tiny_model, solid_images):
    tok = tiny_model.tokenizer
    b = training_batch(tiny_model, ["What?", "Describe it in detail."], ["A red ball.", "Green."], solid_images[:2])
    assert b.embeds.shape[:2] == b.targets.shape == b.answer_mask.shape == b.attention_mask.shape
    row = b.targets[1][b.answer_mask[1]].tolist()
    assert row[: row.index(tok.eot_id)] == tok.encode_text("Green.")
    assert set(row[row.index(tok.eot_id) + 1 :]) <= {tok.eos_id}  # EOS padding is answer, as in LLaDA-V
    assert not b.answer_mask[:, : b.answer_mask.shape[1] - b.answer_mask.sum(1).max()].any()


def test_only_answers_are_masked_at_the_scheduled_rate():
    answer = torch.zeros(2000, 50, dtype=torch.bool)
    answer[:, 20:] = True
    t = torch.linspace(0, 1, 2000)
    masked, p = mask_answers(answer, t=t, generator=torch.Generator().manual_seed(0))
    assert not masked[:, :20].any()
    torch.testing.assert_close(p, (1 - EPS) * t + EPS)
    rate = masked[:, 20:].float().mean(1)
    assert abs((rate - p).mean()) < 0.01


def test_loss_formula_by_hand():
    logits = torch.randn(2, 4, 6)
    targets = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 5]])
    answer = targets != -100
    masked = torch.tensor([[False, True, False, True], [False, False, True, True]])
    p = torch.tensor([0.5, 0.25])
    ce = torch.nn.functional.cross_entropy
    expect = ((ce(logits[0, 1], targets[0, 1]) + ce(logits[0, 3], targets[0, 3])) / 0.5 / 3
              + (ce(logits[1, 2], targets[1, 2]) + ce(logits[1, 3], targets[1, 3])) / 0.25 / 2) / 2
    torch.testing.assert_close(masked_diffusion_loss(logits, targets, masked, p, answer), expect)


def test_zero_gradient_through_non_answer_positions(tiny_model, solid_images):
    b = training_batch(tiny_model, ["What?", "Where?"], ["A red ball.", "Top left."], solid_images[:2])
    masked, p = mask_answers(b.answer_mask, t=torch.tensor([0.9, 0.9]), generator=torch.Generator().manual_seed(0))
    noisy = torch.where(masked[..., None], tiny_model.mask_embedding(), b.embeds).detach()
    logits = tiny_model.forward_embeds(noisy, b.attention_mask).detach().requires_grad_(True)
    masked_diffusion_loss(logits, b.targets, masked, p, b.answer_mask).backward()
    assert masked.any()
    assert torch.all(logits.grad[~masked] == 0)
    assert torch.all(logits.grad[~b.answer_mask] == 0)
    assert logits.grad[masked].abs().sum() > 0


def test_sft_loss_trains_the_projector(tiny_model, solid_images):
    b = training_batch(tiny_model, ["What?"], ["A red ball."], solid_images[:1])
    loss = sft_loss(tiny_model, b, generator=torch.Generator().manual_seed(0), t=torch.tensor([0.7]))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.projector.parameters())
    tiny_model.zero_grad(set_to_none=True)


def test_multi_turn_rows_train_every_answer_and_not_the_user_turns(tiny_model, solid_images):
    tok = tiny_model.tokenizer
    b = training_batch(tiny_model, [("What?", "And the colour?"), "Where?"], [("A ball.", "Red."), "Top left."],
                       solid_images[:2], systems=["Be brief.", None])
    targets = b.targets[0][b.answer_mask[0]].tolist()
    first = tok.encode_text("A ball.") + [tok.eot_id]
    second = tok.encode_text("Red.") + [tok.eot_id]
    assert targets[: len(first) + len(second)] == first + second  # both answers are targets
    assert set(targets[len(first) + len(second):]) <= {tok.eos_id}
    row = b.targets[0].tolist()
    gap = row[row.index(tok.eot_id) + 1: row.index(second[0], row.index(tok.eot_id))]
    assert gap and set(gap) == {-100}  # the second user turn between them is context
    single = training_batch(tiny_model, ["Where?"], ["Top left."], solid_images[1:2])
    assert b.targets[1][b.answer_mask[1]].tolist()[:4] == single.targets[0][single.answer_mask[0]].tolist()[:4]
    loss = sft_loss(tiny_model, b, generator=torch.Generator().manual_seed(0), t=torch.tensor([0.7, 0.7]))
    assert torch.isfinite(loss)
