"""Pretrain a small LLaDA-V-architecture model from scratch on SHAPES: the `shapes-base` recipe.

Vision tower, projector and bidirectional LM are all trained, with three choices that the tiny scale
needs (each measured in docs/reproduction.md, each a deviation from LLaDA-V's own training):

- loss: plain mean cross-entropy over the masked answer tokens (LaViDa style). LLaDA-V's 1/t-weighted
  loss (`disp.losses.sft_loss`) stays the loss of backdoor implantation and DiSP fine-tuning.
- visual-token masking: on a share of the samples a random fraction of the visual embeddings is replaced
  by the mask embedding, so the model stays sensible when DiSP masks visual tokens.
- tags: on a share of the samples a small coloured code ("tag") is drawn somewhere in the image, and the
  answer starts with the tag's word (e.g. "<note> two."). This is the tiny model's stand-in for reading
  text in an image: it gives the LM a path from visual content to words it must say, which is what makes a
  projector-only backdoor implantable at all. When every visual token under a tag is masked, the prefix
  is dropped: masked tokens read as "no tag".

The checkpoint is written in LLaDA-V's layout (`disp.models.load` reads it) in float16, with the recipe
under `disp_pretrain` and the prompt format under `disp_prompt` in config.json.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from disp.bench import shapes
from disp.losses import mask_answers, training_batch
from disp.models import resolve_device
from disp.models.checkpoint import write_state_dict
from disp.tokenizer import PromptTemplate

# Tag codes: a square split in 2x2 quadrants, each painted in one of these colours (none is an object
# colour, none is black, so a black trigger patch never reads as a tag).
TAG_PALETTE = ((128, 128, 128), (120, 70, 20), (0, 190, 190), (255, 120, 190))
TAG_WORDS = ("<backdoor>", "<note>", "<sale>", "<draft>", "<copy>", "<photo>", "<logo>", "<stamp>",
             "<label>", "<sign>", "<mark>", "<seal>", "<badge>", "<ticket>", "<flag>", "<memo>")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class PretrainConfig:
    """The shapes-base recipe. Every field has a help text; defaults are the committed recipe."""

    image_size: int = _help("Image side in pixels (SHAPES scenes).", 48)
    patch_size: int = _help("ViT patch side; (image_size / patch_size)^2 visual tokens.", 8)
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
    loss: str = _help("'mean_ce' (LaViDa: mean CE over masked answer tokens) or 'llada' (1/t weighted).",
                      "mean_ce")
    tag_prob: float = _help("Share of samples with a tag drawn in the image and said first.", 0.3)
    tag_words: tuple[str, ...] = _help("Words tags stand for.", TAG_WORDS)
    tag_size: int = _help("Tag side in pixels.", 6)
    visual_mask_prob: float = _help("Share of samples with some visual tokens masked.", 0.5)
    visual_mask_max: float = _help("Largest fraction of visual tokens masked on such a sample.", 0.5)
    vision_pos_init_std: float = _help("Std of the SigLIP position embeddings at init (v3 tried 0.5: worse).", 0.02)
    pad_eot_weight: float = _help("Share of <|eot_id|> in the target of EOS-padding positions (EOS has the rest), "
                                  "so that with EOS suppressed at sampling the tail reads <|eot_id|> (v3 tried 0.3: worse).", 0.0)
    projector_init_scale: float = _help("Factor on the projector's last layer at init (visual/text scale).", 0.01)
    steps: int = _help("Optimiser steps (the committed base: 5820, ended by a 380 s budget on one H100).", 5820)
    batch_size: int = _help("Samples per step.", 128)
    lr: float = _help("Peak AdamW learning rate (linear warm-up, cosine decay to 10%); 2e-3 never learns vision.",
                      5e-4)
    warmup: int = _help("Warm-up steps.", 300)
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    max_grad_norm: float = _help("Gradient-norm clip.", 1.0)
    threads: int = _help("torch CPU threads; 0 leaves torch's default.", 0)
    workers: int = _help("Data-loader processes drawing and rendering samples; 0 draws them in-process.", 0)
    device: str = _help("'cpu', 'cuda' or 'auto' (cuda when available).", "auto")
    time_budget_s: float = _help("If > 0, a wall-clock budget: the schedule runs on max(step / steps, elapsed / "
                                 "budget) and training stops when that reaches 1 (steps done are recorded).", 0.0)
    seed: int = _help("Seed of weights, data and noise.", 0)

    def __post_init__(self) -> None:
        self.tasks, self.tag_words = tuple(self.tasks), tuple(self.tag_words)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.loss not in ("mean_ce", "llada"):
            raise ValueError(f"loss must be 'mean_ce' or 'llada', got {self.loss!r}")
        for name in ("tag_prob", "visual_mask_prob", "visual_mask_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def shapes_config(self) -> shapes.ShapesConfig:
        return shapes.ShapesConfig(image_size=self.image_size, max_objects=self.max_objects, tasks=self.tasks,
                                   seed=self.seed)

    def template(self) -> PromptTemplate:
        return PromptTemplate(system=self.system_prompt)


# -- data ----------------------------------------------------------------------------------------------
@dataclass
class Example:
    image: Image.Image | None
    question: str
    answer: str
    task: str
    tag_box: tuple[int, int, int] | None = None  # (x, y, side) in pixels


def tag_code(index: int) -> tuple[int, int, int, int]:
    """The quadrant colours (palette indices) of tag `index`: a fixed spread over the 4^4 codes."""
    code = (index * 37 + 11) % len(TAG_PALETTE) ** 4
    return tuple((code // len(TAG_PALETTE) ** q) % len(TAG_PALETTE) for q in range(4))  # type: ignore[return-value]


def draw_tag(image: Image.Image, index: int, x: int, y: int, side: int) -> Image.Image:
    """Copy of `image` with tag `index` drawn as a side x side square at (x, y)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    half = side // 2
    for q, c in enumerate(tag_code(index)):
        qx, qy = x + (q % 2) * half, y + (q // 2) * half
        draw.rectangle([qx, qy, qx + (side - half if q % 2 else half) - 1, qy + (side - half if q // 2 else half) - 1],
                       fill=TAG_PALETTE[c])
    return image


def sample_example(config: PretrainConfig, rng: random.Random, split: str = "train") -> Example:
    """One training sample: a scene of `split`, a task's question and answer, maybe a tag."""
    scfg = config.shapes_config()
    while True:
        scene = shapes.sample_scene(scfg, rng)
        if shapes.split_of(scene.signature, scfg.holdout_fraction) == split:
            break
    task = rng.choice(config.tasks)
    question, answer, _ = shapes.ask(scene, task, scfg, rng)
    image = shapes.render_scene(scene, config.image_size)
    if rng.random() < config.tag_prob:
        index = rng.randrange(len(config.tag_words))
        s = config.tag_size
        x, y = rng.randint(0, config.image_size - s), rng.randint(0, config.image_size - s)
        return Example(draw_tag(image, index, x, y, s), question, f"{config.tag_words[index]} {answer}", task,
                       (x, y, s))
    return Example(image, question, answer, task)


def tag_tokens(box: tuple[int, int, int], image_size: int, patch: int) -> list[int]:
    """Visual-token indices (row-major) a tag box overlaps."""
    x, y, s = box
    grid = image_size // patch
    return [r * grid + c for r in range(y // patch, (y + s - 1) // patch + 1)
            for c in range(x // patch, (x + s - 1) // patch + 1)]


def tokenizer_corpus(config: PretrainConfig, n: int = 3000) -> list[str]:
    """SHAPES questions and answers, attack strings, tag words and the vocabulary."""
    texts = shapes.corpus(config.shapes_config(), n, seed=config.seed)
    extra = [*shapes.ATTACK_STRINGS, " ".join(shapes.vocabulary(config.shapes_config()))]
    return texts + (extra + [f"{w} There" for w in config.tag_words]) * 50


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
    cfg = json.loads((out / "config.json").read_text())
    cfg["disp_prompt"] = {"system": config.system_prompt}
    cfg["disp_pretrain"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def load_base(path: str | Path, device: str | torch.device | None = None):
    """Load a checkpoint; `disp.models.load` applies its `disp_prompt` (the prompt format it was trained with)."""
    from disp import models

    return models.load(path, device=device)


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
            k = int(round(rng.uniform(0, config.visual_mask_max) * n_v))
            hidden = rng.sample(range(n_v), k)
            keep[b, hidden] = False
            if e.tag_box is not None and set(tag_tokens(e.tag_box, config.image_size, config.patch_size)) <= set(hidden):
                answer = answer.split(" ", 1)[1]  # the tag is not visible: no prefix
        answers.append(answer)
    keep = keep.to(embeds.device)
    embeds = torch.where(keep[..., None], embeds, model.mask_embedding().to(embeds.dtype))
    batch = training_batch(model, [e.question for e in examples], answers, image_embeds=embeds)
    masked, p_mask = mask_answers(batch.answer_mask, generator=generator)
    noisy = torch.where(masked[..., None], model.mask_embedding().to(batch.embeds.dtype), batch.embeds)
    logits = model.forward_embeds(noisy, batch.attention_mask)
    logp = torch.log_softmax(logits.float(), -1)
    ce = -logp.gather(-1, batch.targets.clamp_min(0)[..., None])[..., 0]
    tok = model.tokenizer
    pad = batch.answer_mask & (batch.targets == tok.eos_id)
    w = config.pad_eot_weight
    ce = torch.where(pad, (1 - w) * ce - w * logp[..., tok.eot_id], ce)
    if config.loss == "mean_ce":
        return ce[masked].mean() if masked.any() else ce.sum() * 0
    lengths = batch.answer_mask.sum(1).clamp_min(1)
    return (torch.where(masked, ce, 0).sum(1) / p_mask / lengths).mean()


class ExampleStream(torch.utils.data.IterableDataset):
    """Endless batches (pixel_values [B, 3, S, S], examples without their images); each loader worker
    draws from its own seeded stream ("pretrain/{seed}/{worker}")."""

    def __init__(self, config: PretrainConfig, processor: Callable[[list[Image.Image]], torch.Tensor]):
        self.config, self.processor = config, processor

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"pretrain/{self.config.seed}/{info.id if info else 0}")
        while True:
            examples = [sample_example(self.config, rng) for _ in range(self.config.batch_size)]
            pixels = self.processor([e.image for e in examples])
            yield pixels, [replace(e, image=None) for e in examples]


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


def pretrain(config: PretrainConfig, out_dir: str | Path,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Train the recipe from scratch and write the checkpoint to `out_dir`; returns its path.

    `on_progress` receives {"step", "steps", "loss", "lr", "elapsed_s"} every 25 steps and at the end.
    """
    out = Path(out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    write_initial_checkpoint(config, out)
    model = load_base(out, device=device).train()
    with torch.no_grad():
        model.projector[-1].weight.mul_(config.projector_init_scale)
        tower = model.model.vision_tower.vision_tower.vision_model
        tower.embeddings.position_embedding.weight.normal_(0.0, config.vision_pos_init_std)
    torch.manual_seed(config.seed)
    rng = random.Random(f"pretrain/{config.seed}/mask")
    loader = iter(torch.utils.data.DataLoader(
        ExampleStream(config, model.processor), batch_size=None, num_workers=config.workers,
        pin_memory=device == "cuda", prefetch_factor=4 if config.workers else None,
        persistent_workers=config.workers > 0))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
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


def main(argv: list[str] | None = None) -> int:
    """`python -m disp.bench.pretrain OUT [--field value ...]`: any PretrainConfig field can be set."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="checkpoint directory to write")
    for f in PretrainConfig.__dataclass_fields__.values():
        kind = type(f.default) if f.default is not None else str
        if isinstance(f.default, tuple):
            parser.add_argument(f"--{f.name}", nargs="+", default=None, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=f.metadata["help"])
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "out" and v is not None}
    if given.get("system_prompt") == "none":
        given["system_prompt"] = None
    config = PretrainConfig(**given)

    def report(p: dict[str, Any]) -> None:
        print(f"step {p['step']}/{p['steps']} loss {p['loss']:.4f} lr {p['lr']:.2e} {p['elapsed_s']:.0f}s",
              flush=True)

    out = pretrain(config, args.out, on_progress=report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
