"""Projector-only fine-tuning with the masked-diffusion SFT loss (paper §3.3 last step, App. B).

Everything but the projector is frozen. The vision tower runs once per image (its features are cached),
so each step costs a projector pass and a language-model pass. AdamW with linear warm-up then cosine
decay, gradient accumulation, bf16 autocast (GPU; opt-in on a CPU), a resumable state saved as safetensors
after every epoch. An optional feature anchor (`FinetuneConfig.anchor_weight`, disp's, not the paper's) keeps the
projector's outputs on chosen samples close to the starting projector's. Data order and diffusion noise are
functions of (seed, epoch, step), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from disp.config import FinetuneConfig
from disp.losses import training_batch
from disp.models.base import MDLM, ImageFeatures

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised between batches when the caller asked to stop."""


@dataclass
class FinetuneResult:
    epochs: int
    steps: int
    samples: int
    epoch_losses: list[float]
    seconds: float
    resumed_from_epoch: int


@torch.no_grad()
def vision_features(model: MDLM, images: Sequence[Image.Image], batch_size: int = 32) -> list[ImageFeatures]:
    """Tower outputs for every image (all its views), computed once, on the CPU."""
    out: list[ImageFeatures] = []
    for i in range(0, len(images), batch_size):
        out += [ImageFeatures(f.features.cpu(), f.size)
                for f in model.tower(model.image_views(images[i : i + batch_size]))]
    return out


def autocast(config: FinetuneConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast of a training step: on a GPU with `config.bf16`, on a CPU with `config.bf16_cpu`."""
    enabled = config.bf16 if device.type == "cuda" else config.bf16_cpu and device.type == "cpu"
    return torch.autocast("cuda" if device.type == "cuda" else "cpu", dtype=torch.bfloat16, enabled=enabled)


def lr_at(step: int, total: int, config: FinetuneConfig) -> float:
    """Linear warm-up over warmup_ratio·total steps, then cosine decay to zero."""
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _save_state(path: Path, model: MDLM, opt: torch.optim.Optimizer, epoch: int, steps: int,
                losses: list[float]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            tensors[f"optimizer.{i}.{name}"] = value.detach().cpu().reshape(-1) if value.dim() == 0 else value
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path / "state.safetensors"))
    (path / "state.json").write_text(json.dumps({"epoch": epoch, "steps": steps, "losses": losses}))


def _load_state(path: Path, model: MDLM, opt: torch.optim.Optimizer) -> tuple[int, int, list[float]]:
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    model.projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    sd["state"] = state
    opt.load_state_dict(sd)
    return meta["epoch"], meta["steps"], meta["losses"]


def anchor_penalty(embeds: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], keep: torch.Tensor
                   ) -> torch.Tensor:
    """Sum over the kept samples of the relative squared change of their visual embeddings.

    embeds, reference: per sample [N_b, D] (trained and starting projector; a [B, N_v, D] tensor works too);
    keep: [B] bool. Each kept sample adds mean_v ||e_v - r_v||^2 / mean_v ||r_v||^2, so the penalty depends
    neither on the embedding scale nor on the sample's number of visual tokens.
    """
    total = torch.zeros((), device=keep.device)
    for e, r, k in zip(embeds, reference, keep.tolist(), strict=True):
        if k:
            total = total + (e.float() - r.float()).pow(2).sum(-1).mean() / r.float().pow(2).sum(-1).mean().clamp_min(1e-12)
    return total


def finetune_projector(model: MDLM, questions: Sequence[str | Sequence[str]], answers: Sequence[str | Sequence[str]],
                       features: Sequence[ImageFeatures], config: FinetuneConfig, *,
                       anchor: Sequence[bool] | None = None, systems: Sequence[str | None] | None = None,
                       state_dir: Path | None = None, on_progress: Progress | None = None,
                       should_stop: StopCheck | None = None) -> FinetuneResult:
    """Train the projector on (question, answer, cached tower outputs of the image) triples.

    A sample's question and answer may be tuples of all its user and assistant turns: every answer is then
    trained on (`disp.losses.training_batch`); `systems` gives samples their own system prompt.

    With `config.anchor_weight` > 0 the loss adds anchor_weight × the mean over the batch of
    `anchor_penalty` on the samples where `anchor` is True (default: every sample), measured against the
    projector the model holds when this is called (so a resumed run anchors to the same one).
    """
    n = len(questions)
    if not n or len(answers) != n or len(features) != n:
        raise ValueError(f"need equally many questions, answers and features, got {n}, {len(answers)}, "
                         f"{len(features)}")
    if anchor is not None and len(anchor) != n:
        raise ValueError(f"anchor has {len(anchor)} flags for {n} samples")
    device = model.device
    keep = torch.tensor(list(anchor) if anchor is not None else [True] * n, dtype=torch.bool)
    start = None
    anchor_weight = config.anchor_weight or 0.0  # None (unset, no DefenseConfig to set it): off
    if anchor_weight > 0 and keep.any():
        start = copy.deepcopy(model.projector).eval().requires_grad_(False)
    params = model.freeze_all_but_projector()
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(n / config.batch_size)
    total_steps = math.ceil(per_epoch / config.grad_accum) * config.epochs
    start_epoch, steps, losses = 0, 0, []
    if state_dir is not None and (state_dir / "state.json").is_file():
        start_epoch, steps, losses = _load_state(state_dir, model, opt)
    mixed = autocast(config, device)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, config.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
        running, seen = 0.0, 0
        for mb in range(per_epoch):
            if should_stop is not None and should_stop():
                raise Cancelled("fine-tuning cancelled")
            idx = order[mb * config.batch_size : (mb + 1) * config.batch_size]
            noise = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + epoch * per_epoch + mb)
            with mixed:
                feats = [features[i] for i in idx]
                embeds = model.visual_tokens(feats)
                batch = training_batch(model, [questions[i] for i in idx], [answers[i] for i in idx],
                                       image_embeds=embeds,
                                       systems=None if systems is None else [systems[i] for i in idx])
                loss = model.training_loss(batch, generator=noise)
                if start is not None:
                    with torch.no_grad():
                        reference = model.visual_tokens(feats, projector=start)
                    loss = loss + anchor_weight * anchor_penalty(embeds, reference, keep[idx]) / len(idx)
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
            if on_progress is not None:
                on_progress(epoch * per_epoch + mb + 1, config.epochs * per_epoch)
        losses.append(running / seen)
        if state_dir is not None:
            _save_state(state_dir, model, opt, epoch + 1, steps, losses)
    model.eval()
    return FinetuneResult(epochs=config.epochs, steps=steps, samples=n, epoch_losses=losses,
                          seconds=time.perf_counter() - t0, resumed_from_epoch=start_epoch)


def result_dict(result: FinetuneResult) -> dict:
    return asdict(result)
