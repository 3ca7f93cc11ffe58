"""Pretrain a small LLaDA-V-architecture model from scratch on SHAPES: the `shapes-base` recipe.

Stage 0 trains the vision tower alone on per-token labels (`experiments.pretrain.vision`); the joint
stage then trains projector and bidirectional LM with the tower frozen (as LLaDA-V's first stage keeps
SigLIP fixed). The choices the tiny scale needs (each measured in docs/reproduction.md, each a deviation
from LLaDA-V's own training):

- scenes: 2-3 objects on a 2x2 grid, each object a tile filling its cell with a category texture, so
  that every object shows on 9 of the 36 visual tokens (redundancy: masking the top 30 % salient tokens
  must leave clean evidence behind, as it does for LLaDA-V's 729 tokens).
- loss: plain mean cross-entropy over the masked answer tokens (LaViDa style), with EOS padding weighted
  `pad_weight` (0.05) so that the padding does not drown short answers. LLaDA-V's 1/t-weighted loss
  (`disp.losses.sft_loss`) stays the loss of backdoor implantation and DiSP fine-tuning.
- visual-token masking: on a share of the samples a random fraction of the visual embeddings (half of
  the time drawn from the tokens that show something) is replaced by the mask embedding, so the model
  stays sensible when DiSP masks visual tokens.
- tags: on a share of the samples a small coloured code ("tag") is drawn somewhere in the image, and the
  answer starts with the tag's word (e.g. "<note> two."); one more code, the refusal tag, turns the answer
  into the refusal sentence. This is the tiny model's stand-in for reading text in an image: it gives the
  LM a path from visual content to words it must say, which is what makes a projector-only backdoor
  implantable at all. When every visual token under a tag is masked, the tag's effect is dropped: masked
  tokens read as "no tag". `tag_blend_prob` > 0 (0 in the committed recipe) draws that share of the word
  tags blended between two codes, answered with either word in proportion, so the reading is graded
  between words: with pure codes the projector-only implant often settles on the wrong tag word.

The checkpoint is written in LLaDA-V's layout (`disp.models.load` reads it) in float16, with the recipe
under `disp_pretrain` and the prompt format under `disp_prompt` in config.json.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from disp import shapes
from disp.losses import mask_answers, training_batch
from disp.models import resolve_device
from disp.models.checkpoint import write_state_dict
from disp.tokenizer import PromptTemplate
from experiments.pretrain.data import Example, ExampleStream, tokenizer_corpus
from experiments.pretrain.tags import TAG_WORDS, tag_tokens


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


LOSSES = ("mean_ce", "row_mean_ce", "llada")


@dataclass
class PretrainConfig:
    """The shapes-base recipe. Every field has a help text; defaults are the committed recipe."""

    image_size: int = _help("Image side in pixels (SHAPES scenes).", 48)
    patch_size: int = _help("ViT patch side; (image_size / patch_size)^2 visual tokens.", 8)
    grid: int = _help("SHAPES grid: 3 (3x3 cells) or 2 (2x2: 9 visual tokens per cell, redundancy for masking).", 2)
    style: str = _help("SHAPES drawing style: 'pictogram' or 'tile' (every token of a cell shows category and colour).", "tile")
    min_objects: int = _help("Fewest objects per scene.", 2)
    max_objects: int = _help("Most objects per scene.", 3)
    tasks: tuple[str, ...] = _help("SHAPES tasks sampled (repeat a name to weight it).", (
        "describe", "describe", "objects", "colour", "where", "where", "at", "at", "which", "count", "exists"))
    hidden_size: int = _help("LM hidden size.", 192)
    intermediate_size: int = _help("LM SwiGLU width.", 576)
    num_layers: int = _help("LM layers.", 4)
    num_heads: int = _help("LM attention heads.", 4)
    vision_hidden_size: int = _help("SigLIP hidden size.", 128)
    vision_intermediate_size: int = _help("SigLIP MLP width.", 256)
    vision_layers: int = _help("SigLIP layers in the checkpoint (the last is dropped by LLaDA-V).", 4)
    vision_heads: int = _help("SigLIP attention heads.", 4)
    tokenizer_vocab: int = _help("BPE vocabulary size of the trained tokenizer.", 640)
    system_prompt: str | None = _help("System turn of the prompt; None drops it (short sequences).", None)
    loss: str = _help("'mean_ce' (LaViDa: mean CE over the batch's masked answer tokens, so a 35-token caption "
                      "weighs about 7 one-word answers), 'row_mean_ce' (each sample's mean CE over its masked answer "
                      "tokens, then the mean over samples: every answer weighs the same, as LLaDA-V's per-row length "
                      "normalisation does) or 'llada' (1/t weighted).", "mean_ce")
    tag_prob: float = _help("Share of samples with a tag drawn in the image and said first.", 0.3)
    tag_words: tuple[str, ...] = _help("Words tags stand for.", TAG_WORDS)
    tag_size: int = _help("Tag side in pixels.", 8)
    tag_align: bool = _help("Draw tags on the visual-token grid, so one token holds the whole code (unaligned "
                            "6 px tags: the base saw that a tag was there but not which).", True)
    tag_blend_prob: float = _help("Share of the word tags drawn blended between two word codes (weight alpha ~ U(0, 1) "
                                  "on the second) and answered with the second word with probability alpha, so the "
                                  "tag reading is graded between words rather than a lookup (0: pure codes only).", 0.0)
    refusal_tag_prob: float = _help("Share of samples with the refusal tag drawn, answered with the refusal "
                                    "sentence (the base's path to refusing; 0 leaves it out).", 0.05)
    visual_mask_prob: float = _help("Share of samples with some visual tokens masked.", 0.5)
    visual_mask_max: float = _help("Largest fraction of visual tokens masked on such a sample.", 0.5)
    content_mask_share: float = _help("Share of the masked samples whose masked tokens are drawn from the tokens "
                                      "that show something (objects, tags), as salient masking picks them.", 0.5)
    content_mask_max: float = _help("Largest fraction of those content tokens masked on such a sample.", 0.7)
    vision_pos_init_std: float = _help("Std of the SigLIP position embeddings at init (v3 tried 0.5: worse).", 0.02)
    pad_eot_weight: float = _help("Share of <|eot_id|> in the target of EOS-padding positions (EOS has the rest), "
                                  "so that with EOS suppressed at sampling the tail reads <|eot_id|> (v3 tried 0.3: worse).", 0.0)
    pad_weight: float = _help("Loss weight of EOS-padding positions relative to answer tokens (LLaDA-V: 1). Below 1, "
                              "padding no longer drowns short answers' few informative tokens.", 0.05)
    plain_fraction: float = _help("Curriculum: share of the steps at the start drawn without tags or the refusal tag, "
                                  "so the model learns to see before it learns to read tags.", 0.0)
    vision_steps: int = _help("Stage 0: steps of vision-tower pretraining on per-token category/colour labels "
                              "before the joint training (0: none).", 400)
    vision_lr: float = _help("Stage 0 peak learning rate.", 1e-3)
    vision_position_labels: bool = _help("Stage 0 also names each token's place in the grid (one more linear head), so "
                                         "the tower's features keep position as a pretrained SigLIP's do; without it "
                                         "v2's features hold almost none (a linear probe finds the cell 35 % of the "
                                         "time, 25 % after the projector).", False)
    freeze_vision: bool = _help("Keep the vision tower fixed in the joint training (as LLaDA-V's first stage).", True)
    projector_init_scale: float = _help("Factor on the projector's last layer at init (visual/text scale; 0.01 drowned category).", 1.0)
    steps: int = _help("Optimiser steps.", 3200)
    batch_size: int = _help("Samples per step.", 64)
    lr: float = _help("Peak AdamW learning rate (linear warm-up, cosine decay to 10%); 2e-3 never learns vision.",
                      5e-4)
    warmup: int = _help("Warm-up steps.", 200)
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    max_grad_norm: float = _help("Gradient-norm clip.", 1.0)
    threads: int = _help("torch CPU threads; 0 leaves torch's default.", 0)
    workers: int = _help("Data-loader processes drawing and rendering samples; 0 draws them in-process.", 0)
    device: str = _help("'cpu', 'cuda' or 'auto' (cuda when available).", "auto")
    time_budget_s: float = _help("If > 0, a wall-clock budget: the schedule runs on max(step / steps, elapsed / "
                                 "budget) and training stops when that reaches 1 (steps done are recorded).", 0.0)
    seed: int = _help("Seed of weights, data and noise.", 0)
    init_from: str = _help("Continue from this SHAPES checkpoint's weights and tokenizer instead of random ones "
                           "(stage 0 is skipped; the architecture fields must match it). Empty: from scratch.", "")

    def __post_init__(self) -> None:
        self.tasks, self.tag_words = tuple(self.tasks), tuple(self.tag_words)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("tag_prob", "tag_blend_prob", "refusal_tag_prob", "pad_weight", "plain_fraction", "visual_mask_prob", "visual_mask_max", "content_mask_share",
                     "content_mask_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def shapes_config(self) -> shapes.ShapesConfig:
        return shapes.ShapesConfig(image_size=self.image_size, grid=self.grid, style=self.style,
                                   min_objects=self.min_objects, max_objects=self.max_objects, tasks=self.tasks,
                                   seed=self.seed)

    def template(self) -> PromptTemplate:
        return PromptTemplate(system=self.system_prompt)


# -- model ---------------------------------------------------------------------------------------------
def write_initial_checkpoint(config: PretrainConfig, out_dir: Path) -> Path:
    """A random-weight checkpoint with the recipe's tokenizer and shapes (LLaDA-V layout)."""
    from disp.models.tiny import write_tiny_checkpoint

    lm = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
          "num_key_value_heads": config.num_heads, "max_position_embeddings": 512}
    vision = {"hidden_size": config.vision_hidden_size, "intermediate_size": config.vision_intermediate_size,
              "num_hidden_layers": config.vision_layers, "num_attention_heads": config.vision_heads,
              "image_size": config.image_size, "patch_size": config.patch_size}
    out = write_tiny_checkpoint(out_dir, seed=config.seed, corpus=tokenizer_corpus(config),
                                tokenizer_vocab=config.tokenizer_vocab, lm=lm, vision=vision, max_shard_bytes=0)
    _record_recipe(config, out)
    return out


def _record_recipe(config: PretrainConfig, out: Path, parent: dict[str, Any] | None = None) -> None:
    """The recipe (`disp_pretrain`) and prompt format in config.json, the scene settings beside it. A
    continued run keeps the recipe it started from under `continued_from` (so a chain nests)."""
    cfg = json.loads((out / "config.json").read_text())
    cfg["disp_prompt"] = {"system": config.system_prompt}
    cfg["disp_pretrain"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    if parent is not None:
        cfg["disp_pretrain"]["continued_from"] = parent
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    scene = config.shapes_config()
    (out / shapes.SHAPES_CONFIG_FILE).write_text(json.dumps(
        {k: getattr(scene, k) for k in ("image_size", "grid", "style", "min_objects", "max_objects")}) + "\n")


def load_base(path: str | Path, device: str | torch.device | None = None):
    """Load a checkpoint; `disp.models.load` applies its `disp_prompt` (the prompt format it was trained with)."""
    from disp import models

    return models.load(path, device=device)


def weighted_ce(ce: torch.Tensor, weight: torch.Tensor, *, per_row: bool) -> torch.Tensor:
    """Weighted mean of ce [B, L] (weight [B, L], 0 where not counted): over every token of the batch, or
    (`per_row`) within each row first and then over the rows that count any token, so that a one-word answer
    weighs as much as a caption."""
    if not per_row:
        return (ce * weight).sum() / weight.sum().clamp_min(1e-6)
    rows = weight.sum(1)
    has = rows > 0  # a short answer may draw no masked token at small t
    return ((ce * weight).sum(1)[has] / rows[has]).sum() / has.sum().clamp_min(1)


def pretrain_loss(model, examples: list[Example], config: PretrainConfig, generator: torch.Generator,
                  rng: random.Random, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Visual-token masking, answer masking and the recipe's loss on one batch.

    pixel_values [B, 3, S, S] are the examples' images, preprocessed (rendered from them if None).
    """
    if pixel_values is None:
        pixel_values = model.preprocess([e.image for e in examples])
    embeds = model.encode_images(pixel_values.to(model.device))  # (B, N_v, D)
    n_v = embeds.shape[1]
    keep = torch.ones(len(examples), n_v, dtype=torch.bool)
    answers = []
    for b, e in enumerate(examples):
        answer = e.answer
        if rng.random() < config.visual_mask_prob:
            if e.content and rng.random() < config.content_mask_share:
                k = int(round(rng.uniform(0, config.content_mask_max) * len(e.content)))
                hidden = rng.sample(list(e.content), k)
            else:
                k = int(round(rng.uniform(0, config.visual_mask_max) * n_v))
                hidden = rng.sample(range(n_v), k)
            keep[b, hidden] = False
            if e.tag_box is not None and set(tag_tokens(e.tag_box, config.image_size, config.patch_size)) <= set(hidden):
                answer = e.plain  # the tag is not visible: the plain answer
        answers.append(answer)
    keep = keep.to(embeds.device)
    embeds = torch.where(keep[..., None], embeds, model.mask_embedding().to(embeds.dtype))
    batch = training_batch(model, [e.question for e in examples], answers, image_embeds=embeds)
    masked, p_mask = mask_answers(batch.answer_mask, generator=generator)
    noisy = torch.where(masked[..., None], model.mask_embedding().to(batch.embeds.dtype), batch.embeds)
    start = int(batch.answer_mask.float().argmax(1).min())  # answers sit at the end of every row
    logits = model.forward_embeds(noisy, batch.attention_mask, logits_from=start)
    logp = torch.log_softmax(logits.float(), -1)
    targets, answer_mask, masked = batch.targets[:, start:], batch.answer_mask[:, start:], masked[:, start:]
    ce = -logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    tok = model.tokenizer
    pad = answer_mask & (targets == tok.eos_id)
    w = config.pad_eot_weight
    ce = torch.where(pad, (1 - w) * ce - w * logp[..., tok.eot_id], ce)
    if config.loss in ("mean_ce", "row_mean_ce"):
        return weighted_ce(ce, torch.where(pad, config.pad_weight, 1.0) * masked, per_row=config.loss == "row_mean_ce")
    lengths = answer_mask.sum(1).clamp_min(1)
    return (torch.where(masked, ce, 0).sum(1) / p_mask / lengths).mean()


def _lr_at(step: int, config: PretrainConfig, progress: float | None = None) -> float:
    """Linear warm-up over `warmup` steps, then cosine to 10 % over the rest (`progress` in 0..1 overrides
    the step-based position after warm-up)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    frac = (step - config.warmup) / max(1, config.steps - config.warmup)
    if progress is not None:
        frac = max(frac, min(1.0, progress))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def save_checkpoint(model, out_dir: Path, dtype: torch.dtype = torch.float16, steps_done: int | None = None) -> None:
    """Weights in `dtype` (model.safetensors); `torch_dtype` (and the recipe's `steps_done`) in config.json."""
    write_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if steps_done is not None:
        cfg["disp_pretrain"]["steps_done"] = steps_done
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def _continue_from(config: PretrainConfig, out: Path, device: str):
    """Copy `init_from` (weights, tokenizer, scene settings) to `out` with this recipe recorded, and load it
    in float32 for training. Refuses a checkpoint whose architecture differs from the recipe's."""
    import shutil

    src = Path(config.init_from)
    recipe = json.loads((src / "config.json").read_text()).get("disp_pretrain")
    if recipe is None:
        raise ValueError(f"init_from {src} is not a SHAPES base (no disp_pretrain in its config.json)")
    arch = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "vision_hidden_size", "vision_intermediate_size", "vision_layers", "vision_heads", "system_prompt")
    differ = [f"{k}: {recipe.get(k)!r} there, {getattr(config, k)!r} here" for k in arch
              if recipe.get(k) != getattr(config, k)]
    if differ:
        raise ValueError(f"init_from {src} has another architecture ({'; '.join(differ)})")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    _record_recipe(config, out, parent=recipe)
    return load_base(out, device=device).train()


def pretrain(config: PretrainConfig, out_dir: str | Path,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Train the recipe from scratch and write the checkpoint to `out_dir`; returns its path.

    `on_progress` receives {"step", "steps", "loss", "lr", "elapsed_s"} every 25 steps and at the end.
    """
    out = Path(out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if config.init_from:
        model = _continue_from(config, out, device)
    else:
        write_initial_checkpoint(config, out)
        model = load_base(out, device=device).train()
        with torch.no_grad():
            model.projector[-1].weight.mul_(config.projector_init_scale)
            tower = model.model.vision_tower.vision_tower.vision_model
            tower.embeddings.position_embedding.weight.normal_(0.0, config.vision_pos_init_std)
    torch.manual_seed(config.seed)
    if config.vision_steps and not config.init_from:
        from experiments.pretrain.vision import pretrain_vision

        pretrain_vision(model, config, on_progress=on_progress)
    rng = random.Random(f"pretrain/{config.seed}/mask")
    loader = iter(torch.utils.data.DataLoader(
        ExampleStream(config, model.processor), batch_size=None, num_workers=config.workers,
        pin_memory=device == "cuda", prefetch_factor=4 if config.workers else None,
        persistent_workers=config.workers > 0))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    if config.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    start, running = time.time(), None
    step, progress = 0, 0.0
    budget = config.time_budget_s
    while step < config.steps and progress < 1.0:
        lr = _lr_at(step, config, progress if budget > 0 else None)
        for group in opt.param_groups:
            group["lr"] = lr
        pixels, examples = next(loader)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = pretrain_loss(model, examples, config, generator, rng, pixel_values=pixels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        running = loss.detach() if running is None else 0.95 * running + 0.05 * loss.detach()
        step += 1
        if budget > 0:
            progress = (time.time() - start) / budget
        if on_progress is not None and (step % 25 == 1 or step == config.steps or progress >= 1.0):
            on_progress({"step": step, "steps": config.steps, "loss": running.item(), "lr": lr,
                         "elapsed_s": time.time() - start})
    save_checkpoint(model.eval(), out, steps_done=step)
    return out


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.pretrain.recipe OUT [--field value ...]`: any PretrainConfig field can be set."""
    import argparse

    from disp.cli_flags import field_help

    parser = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="checkpoint directory to write")
    for f in PretrainConfig.__dataclass_fields__.values():
        kind = type(f.default) if f.default is not None else str
        if kind is bool:
            kind = _parse_bool
        if isinstance(f.default, tuple):
            parser.add_argument(f"--{f.name}", nargs="+", default=None, help=field_help(f))
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=field_help(f))
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "out" and v is not None}
    if given.get("system_prompt") == "none":
        given["system_prompt"] = None
    config = PretrainConfig(**given)

    def report(p: dict[str, Any]) -> None:
        if p.get("stage") == "vision":
            print(f"vision {p['step']}/{p['steps']} loss {p['loss']:.4f} token acc {p['acc']:.3f}", flush=True)
            return
        print(f"step {p['step']}/{p['steps']} loss {p['loss']:.4f} lr {p['lr']:.2e} {p['elapsed_s']:.0f}s",
              flush=True)

    out = pretrain(config, args.out, on_progress=report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
