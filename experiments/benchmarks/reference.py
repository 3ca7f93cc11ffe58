"""The published DiSP procedure, one sample at a time: the baseline `experiments/benchmarks/perf.py` measures against.

Not product code. It re-implements what the official code does per training sample
(`bigglesworthnotacat/Diffusion_Self_Purification@3c47732`):

- `self_purify/self_purification.py` loops over the samples; for each it opens the image, runs the vision
  tower and projector (`prepare_inputs_labels_for_multimodal`) and calls `generate_prompt_mask_kl_approx`
  (`LLaDA-V/train/llava/model/language_model/modeling_llada.py`), which scores and then generates:
- scoring: one forward with grad on the input embeddings over [prompt | gen_length masks], top-k (5)
  logits of the first block, p = softmax in float64, then M = 6 *sequential* backward passes
  (`retain_graph`), each with a probe y ~ N(0, I), u = √max(p, 1e-40), q = u ⊙ (y − (y·u)u) cast to the
  logits' dtype and scattered into the full vocabulary, s = Σ q·z, g = ∂s/∂embeds; the image rows of g
  (float64) are dotted with δ = e_mask − e_i and squared into a float64 accumulator; score = ½ · mean.
- purification: the top floor(ρ·N_v) image tokens are replaced by the mask embedding, and the answer is
  generated at batch 1 with LLaDA-V's sampler: every step a forward over the whole sequence without an
  attention mask, logits in float32, EOS/BOS/header logits −inf at masked positions, argmax (or Gumbel
  noise in float64), confidence = float64 softmax over the *whole* sequence gathered at x0 and cast to
  float32, −inf outside the current block and on the prompt, `topk` commits the scheduled count, then a
  Python scan of the generated ids for the stop sequence `<|eot_id|>`; the loop ends once the stop is
  found and every position before it is filled.
- fine-tuning (the LLaVA trainer, projector only): every step runs the image preprocessing, the tower and
  the projector for each sample of the micro-batch; the loss, optimiser, schedule, data order and noise
  are those of `disp.finetune.finetune_projector` so that both runs can be compared step for step.

Deliberate differences, none of which changes the cost of a step: the model goes through `disp`'s `MDLM`
interface at its own dtype (the official code runs CUDA fp16 autocast); the mask state is a boolean
tensor (the official code compares embeddings to the mask embedding, which would re-open a position where
the mask token itself was committed); the probe noise comes from a generator seeded with the configured
seed for every sample, one (G, k) draw per probe (the official code re-seeds the global RNG per sample);
nothing is written to disk (the official script rewrites its JSON after every sample by default).

Two details of the official code change the numbers, not the cost, and are off by default so that the
reference computes what the paper specifies and the product implements (`official_quirks=True` turns both
on; `experiments/benchmarks/perf.py --official-quirks` reports their effect):

- p, and so each probe q, is computed from the logits without detaching them, so every backward also
  differentiates the probe: the gradient is Jᵀ(q + (∂q/∂z)ᵀ z) instead of Eq. 8's Jᵀq;
- the confidences are cast from float64 to float32 before `topk`, so positions whose confidences agree
  to float32 resolution tie and are taken in an implementation-defined order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from disp.config import FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.constants import EOT_TOKEN
from disp.finetune import autocast as finetune_autocast
from disp.finetune import lr_at
from disp.losses import training_batch
from disp.models.base import MDLM, PromptBatch


@dataclass
class ReferenceResult:
    """Per-sample outputs of the reference, in input order, and the seconds spent in each stage."""

    scores: list[torch.Tensor] = field(default_factory=list)  # [N_v] float64 each
    masked: list[list[int]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    saliency_s: float = 0.0
    purification_s: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_one(model: MDLM, question: str, image: Image.Image) -> PromptBatch:
    """One sample's prompt: its image through preprocessing (its views, anyres crops included), tower and
    projector, spliced in (batch 1)."""
    with torch.no_grad():
        embeds = model.image_tokens([image])
    return model.build_prompts([model.tokenizer.encode_prompt(question)], embeds)


def reference_saliency(
    model: MDLM,
    prompt: PromptBatch,
    config: SaliencyConfig,
    sampler: SamplerConfig,
    *,
    official_undetached_probes: bool = False,
) -> torch.Tensor:
    """Fisher–Jacobian scores of one sample's visual tokens, as the official code computes them: [N_v] float64.

    The official code builds p (and so the probes q) from the logits *with* grad, so its backward of
    s = Σ q·z also differentiates q: it returns Jᵀ(q + (∂q/∂z)ᵀ z) instead of Eq. 8's Jᵀq. By default
    p is detached here, as in the paper and the product; `official_undetached_probes=True` reproduces
    the official gradient (same cost).
    """
    _, L_prompt, D = prompt.embeds.shape
    G = min(sampler.block_length, sampler.gen_length)
    mask_embed = model.mask_embedding().detach()
    inputs = prompt.embeds.detach()
    base = torch.cat([inputs, mask_embed.to(inputs.dtype).expand(1, sampler.gen_length, D)], 1)
    span = prompt.image_positions[0]
    img_start, img_end = int(span[0]), int(span[-1]) + 1
    generator = torch.Generator().manual_seed(config.seed)
    with torch.enable_grad():
        base = base.detach().clone().requires_grad_(True)
        logits = model.forward_embeds(base)  # (1, T, V)
        logits_slice = logits[:, L_prompt : L_prompt + G]  # (1, G, V)
        V = logits_slice.shape[-1]
        topk_idx = torch.topk(logits_slice, k=config.topk, dim=-1).indices  # (1, G, K)
        base_sel = torch.gather(logits_slice, -1, topk_idx)
        if not official_undetached_probes:
            base_sel = base_sel.detach()
        p_sub = F.softmax(base_sel.to(torch.float64), dim=-1)
        delta = (mask_embed.expand(1, L_prompt, D) - inputs).to(torch.float64)
        energy = torch.zeros(img_end - img_start, dtype=torch.float64, device=base.device)
        for j in range(config.probes):
            y = torch.randn(p_sub.shape, generator=generator, dtype=torch.float64).to(p_sub.device)
            u = torch.sqrt(torch.clamp(p_sub, min=1e-40))
            q = (u * (y - (y * u).sum(-1, keepdim=True) * u)).to(logits_slice.dtype)
            v_full = torch.zeros((1, G, V), device=base.device, dtype=q.dtype).scatter(-1, topk_idx, q)
            s_j = (v_full * logits_slice.float()).sum()
            (grad,) = torch.autograd.grad(s_j, base, retain_graph=j < config.probes - 1)
            g_img = grad[:, :L_prompt].to(torch.float64)[:, img_start:img_end]
            dot = (g_img * delta[:, img_start:img_end]).sum(-1).squeeze(0)
            energy += dot**2
    return config.factor * energy / config.probes


@torch.no_grad()
def reference_generate(
    model: MDLM,
    prompt_embeds: torch.Tensor,
    held: torch.Tensor,
    sampler: SamplerConfig,
    generator: torch.Generator | None = None,
    *,
    official_float32_confidence: bool = False,
) -> list[int]:
    """LLaDA-V's `generate_with_embeds` loop at batch 1 as in the official code; held [P] bool prompt
    positions stay the mask embedding. Returns the answer ids before the stop sequence.

    The official code casts the float64 confidences to float32 before `topk`, so confidences closer than
    float32 resolution tie and `topk` picks among them in an implementation-defined order. By default
    they stay float64 here, as in the product (whose stable sort takes the lower position on an exact
    tie); `official_float32_confidence=True` reproduces the cast (same cost).
    """
    tok = model.tokenizer
    _, L_prompt, D = prompt_embeds.shape
    gen_length, block_length = sampler.gen_length, sampler.block_length
    dev = prompt_embeds.device
    mask_embed = model.mask_embedding().to(prompt_embeds.dtype)
    T = L_prompt + gen_length
    x_embeds = torch.cat(
        [torch.where(held[None, :, None], mask_embed, prompt_embeds), mask_embed.expand(1, gen_length, D)], 1
    )
    x_tokens = torch.full((1, T), tok.mask_id, dtype=torch.long, device=dev)
    mask_index_full = torch.cat([held, torch.ones(gen_length, dtype=torch.bool, device=dev)])[None]
    stop_tokens = [tok.encode_text(EOT_TOKEN)]
    num_blocks = gen_length // block_length
    steps_per_block = sampler.steps // num_blocks
    stop_position, found_stop_seq = T, False
    for num_block in range(num_blocks):
        block_start, block_end = (
            L_prompt + num_block * block_length,
            L_prompt + (num_block + 1) * block_length,
        )
        if found_stop_seq and stop_position <= block_start:
            break
        n_block = int(mask_index_full[0, block_start:block_end].sum())
        base, rem = divmod(n_block, steps_per_block)
        num_transfer_tokens = [base + (1 if i < rem else 0) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            if found_stop_seq and not mask_index_full[0, L_prompt:stop_position].any():
                break
            if not mask_index_full[0, block_start:block_end].any():
                break
            logits = model.forward_embeds(x_embeds).float()  # (1, T, V)
            for token_id in tok.suppressed_ids:
                logits[:, :, token_id] = torch.where(mask_index_full, float("-inf"), logits[:, :, token_id])
            if sampler.temperature == 0:
                logits_noisy = logits
            else:
                logits64 = logits.to(torch.float64)
                noise = torch.rand(logits64.shape, generator=generator, dtype=torch.float64).to(dev)
                logits_noisy = logits64.exp() / (-torch.log(noise)) ** sampler.temperature
            x0 = torch.argmax(logits_noisy, dim=-1)
            x0_embeds = model.embed_tokens(x0).to(x_embeds.dtype)
            x0_embeds = torch.where(mask_index_full[..., None], x0_embeds, x_embeds)
            x0 = torch.where(mask_index_full, x0, x_tokens)
            if sampler.remasking == "low_confidence":
                p64 = F.softmax(logits.to(torch.float64), dim=-1)
                select = torch.gather(p64, -1, x0[..., None]).squeeze(-1)
            else:
                select = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(dev)
            select[:, block_end:] = float("-inf")
            select[:, :L_prompt] = float("-inf")
            conf_dtype = torch.float32 if official_float32_confidence else torch.float64
            confidence = torch.where(mask_index_full, select.to(conf_dtype), float("-inf"))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if num_transfer_tokens[i] > 0:
                _, select_index = torch.topk(confidence[0], k=num_transfer_tokens[i])
                transfer[0, select_index] = True
            x_embeds[transfer] = x0_embeds[transfer]
            x_tokens[transfer] = x0[transfer]
            mask_index_full &= ~transfer
            generated = x_tokens[0, L_prompt:T]
            for stop_seq in stop_tokens:
                for start in range(generated.size(0) - len(stop_seq) + 1):
                    if torch.all(
                        generated[start : start + len(stop_seq)] == torch.tensor(stop_seq, device=dev)
                    ):
                        if not found_stop_seq or L_prompt + start < stop_position:
                            stop_position, found_stop_seq = L_prompt + start, True
                        break
                if found_stop_seq:
                    break
    end = stop_position if found_stop_seq else T
    return x_tokens[0, L_prompt:end].tolist()


def reference_score_and_purify(
    model: MDLM,
    questions: Sequence[str],
    images: Sequence[Callable[[], Image.Image]],
    saliency: SaliencyConfig,
    purify: PurifyConfig,
    on_stage: Callable[[str | None], None] | None = None,
    official_quirks: bool = False,
) -> ReferenceResult:
    """For each sample in turn: open the image, tower + projector, score, mask the top ρ, generate.

    `images[i]()` opens sample i's image. The time to open, encode and score goes to `saliency_s`,
    masking, generation and decoding to `purification_s`. `on_stage(name)` is called untimed as each
    part begins ("saliency", "purification") and with None at the end, for per-stage accounting.
    `official_quirks` turns on both numerical quirks of the official code (see the module docstring).
    """
    out = ReferenceResult()
    dev = model.device
    on_stage = on_stage or (lambda stage: None)
    for question, open_image in zip(questions, images, strict=True):
        on_stage("saliency")
        _sync(dev)
        t0 = time.perf_counter()
        prompt = encode_one(model, question, open_image())
        scores = reference_saliency(
            model, prompt, saliency, purify.sampler, official_undetached_probes=official_quirks
        )
        _sync(dev)
        out.saliency_s += time.perf_counter() - t0
        on_stage("purification")
        t1 = time.perf_counter()
        n = int(math.floor(scores.shape[0] * purify.rho))
        order = torch.argsort(scores, descending=True)
        held = torch.zeros(prompt.embeds.shape[1], dtype=torch.bool, device=dev)
        held[prompt.image_positions[0, order[:n]]] = True
        generator = torch.Generator().manual_seed(purify.seed)
        ids = reference_generate(
            model, prompt.embeds, held, purify.sampler, generator, official_float32_confidence=official_quirks
        )
        answer = model.tokenizer.decode(ids).replace(EOT_TOKEN, "").strip()
        _sync(dev)
        t2 = time.perf_counter()
        out.scores.append(scores.cpu())
        out.masked.append(order[:n].tolist())
        out.answers.append(answer)
        out.purification_s += t2 - t1
    on_stage(None)
    return out


def reference_finetune(
    model: MDLM,
    questions: Sequence[str],
    answers: Sequence[str],
    images: Sequence[Image.Image],
    config: FinetuneConfig,
) -> list[float]:
    """Projector-only fine-tuning as the LLaVA trainer runs it: preprocessing, tower and projector for every
    sample of every micro-batch. Same order, noise, loss and schedule as `disp.finetune.finetune_projector`;
    returns the mean loss of each epoch."""
    n = len(questions)
    device = model.device
    params = model.freeze_all_but_projector()
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(n / config.batch_size)
    total_steps = math.ceil(per_epoch / config.grad_accum) * config.epochs
    mixed = finetune_autocast(config, device)  # the product's rule, so both sides train alike
    steps, losses = 0, []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)
        ).tolist()
        running, seen = 0.0, 0
        for mb in range(per_epoch):
            idx = order[mb * config.batch_size : (mb + 1) * config.batch_size]
            noise = torch.Generator(device=device).manual_seed(
                config.seed * 1_000_003 + epoch * per_epoch + mb
            )
            with mixed:
                rows = []
                for i in idx:  # the dataset item: preprocess; the model: tower (frozen) then projector
                    views = model.image_views([images[i]])
                    with torch.no_grad():
                        feats = model.tower(views)
                    rows += model.visual_tokens(feats)
                batch = training_batch(
                    model,
                    [questions[i] for i in idx],
                    [answers[i] for i in idx],
                    image_embeds=rows,
                )
                loss = model.training_loss(batch, generator=noise)
            (loss * len(idx) / (config.batch_size * config.grad_accum)).backward()
            running += loss.item() * len(idx)
            seen += len(idx)
            if (mb + 1) % config.grad_accum == 0 or mb == per_epoch - 1:
                for group in opt.param_groups:
                    group["lr"] = lr_at(steps, total_steps, config)
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
        losses.append(running / seen)
    model.eval()
    return losses
