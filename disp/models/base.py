"""The model interface every MDLM family implements, and the parts they share.

A family supplies the vision tower, the token embedding, the bidirectional language tower and the
lm head; everything DiSP does goes through the methods below, so saliency, purification and
fine-tuning have no family-specific code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from disp.constants import IMAGE_TOKEN_INDEX, PROJECTOR_PREFIX
from disp.models.checkpoint import CheckpointError, load_into, read_state_dict, shape_mismatch
from disp.tokenizer import ChatTokenizer, PromptTemplate


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA's projector: `mlp{N}x_gelu` is N linear layers with GELU between; `linear` is one layer."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    if kind.startswith("mlp") and kind.endswith("x_gelu"):
        depth = int(kind[3:-6])
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unsupported mm_projector_type {kind!r} (expected 'linear' or 'mlp<N>x_gelu')")


@dataclass
class ImageProcessing:
    """SigLIP preprocessing: square resize (bicubic), scale to [0, 1], normalise by mean/std.

    `aspect` "pad" first pads to a square with the mean colour (LLaVA's `expand2square`).
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    aspect: str = "square"

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → pixel values [N, 3, size, size] float32."""
        out = []
        for img in images:
            img = img.convert("RGB")
            if self.aspect == "pad" and img.width != img.height:
                side = max(img.size)
                fill = tuple(int(255 * m) for m in self.mean)
                canvas = Image.new("RGB", (side, side), fill)
                canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
                img = canvas
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) / 255.0
            out.append((torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(self.mean)[:, None, None])
                       / torch.tensor(self.std)[:, None, None])
        return torch.stack(out)


@dataclass
class PromptBatch:
    """Left-padded prompt embeddings with the image spliced in.

    embeds: [B, P, D]; attention_mask: [B, P] bool (False on padding);
    image_positions: [B, N_v] long, the column of each visual token in `embeds`.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    image_positions: torch.Tensor


def prompt_template(config: dict[str, Any]) -> PromptTemplate:
    """The checkpoint's declared prompt format: config.json `disp_prompt` ({"system": ...}),
    else LLaDA-V's `llava_llada` template with its system prompt."""
    fields = config.get("disp_prompt") or {}
    unknown = sorted(set(fields) - {"system", "image_first"})
    if unknown:
        raise CheckpointError(f"config.json: unknown disp_prompt fields {unknown}")
    return PromptTemplate(**fields)


def _optional_key(key: str) -> bool:
    """The tower's final LayerNorm is never used (LLaDA-V reads the pre-norm hidden states): a checkpoint
    may leave it out."""
    return ".post_layernorm." in key


class MDLM(nn.Module, ABC):
    """A multimodal masked-diffusion language model: vision tower → projector → bidirectional LM."""

    family: str = ""
    tokenizer: ChatTokenizer
    processor: ImageProcessing

    # -- the family-specific parts -------------------------------------------------------------
    @abstractmethod
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower output [N, N_v, C_v] for pixel values [N, 3, S, S]."""

    @property
    @abstractmethod
    def projector(self) -> nn.Module:
        """The trainable vision-to-language projector."""

    @abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., D] for ids [...]."""

    @abstractmethod
    def forward_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       logits_from: int = 0) -> torch.Tensor:
        """Bidirectional forward: embeddings [B, L, D], mask [B, L] bool (True = real) → logits [B, L', V].

        Only positions from `logits_from` on are returned (L' = L − logits_from); every position still
        attends and is attended to, a family may just skip the work for rows nobody reads.
        """

    # -- shared behaviour ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens(torch.zeros(1, dtype=torch.long, device=self.device)).dtype

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → pixel values [N, 3, S, S] on the model's device."""
        return self.processor(images).to(self.device)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [N, N_v, C_v] → visual token embeddings [N, N_v, D]."""
        return self.projector(features.to(next(self.projector.parameters()).dtype))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower then projector: [N, 3, S, S] → [N, N_v, D]."""
        return self.project(self.vision_features(pixel_values))

    def mask_embedding(self) -> torch.Tensor:
        """e_mask [D]: the embedding of `<|mdm_mask|>`."""
        return self.embed_tokens(torch.tensor([self.tokenizer.mask_id], device=self.device))[0]

    def build_prompts(self, prompt_ids: Sequence[Sequence[int]], image_embeds: torch.Tensor) -> PromptBatch:
        """Splice visual embeddings [B, N_v, D] into each prompt at IMAGE_TOKEN_INDEX, left-pad to a batch.

        One embedding lookup for the whole batch; padding columns hold zero vectors.
        """
        B, n_v, _ = image_embeds.shape
        if len(prompt_ids) != B:
            raise ValueError(f"{len(prompt_ids)} prompts for {B} images")
        starts = []
        for ids in prompt_ids:
            where = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
            if len(where) != 1:
                raise ValueError(f"each prompt needs exactly one image placeholder, found {len(where)}")
            starts.append(where[0])
        lengths = [len(ids) - 1 + n_v for ids in prompt_ids]
        width = max(lengths)
        ids = torch.zeros(B, width, dtype=torch.long)
        mask = torch.zeros(B, width, dtype=torch.bool)
        img_pos = torch.empty(B, n_v, dtype=torch.long)
        for b, (row, j, n) in enumerate(zip(prompt_ids, starts, lengths, strict=True)):
            pad = width - n
            ids[b, pad:pad + j] = torch.tensor(list(row[:j]), dtype=torch.long)
            ids[b, pad + j + n_v:] = torch.tensor(list(row[j + 1:]), dtype=torch.long)
            mask[b, pad:] = True
            img_pos[b] = torch.arange(pad + j, pad + j + n_v)
        dev = self.device
        ids, mask, img_pos = ids.to(dev), mask.to(dev), img_pos.to(dev)
        text = self.embed_tokens(ids)
        embeds = torch.where(mask[..., None], text, torch.zeros((), dtype=text.dtype, device=dev))
        embeds = embeds.scatter(1, img_pos[..., None].expand(-1, -1, text.shape[-1]), image_embeds.to(text.dtype))
        return PromptBatch(embeds, mask, img_pos)

    def prompt_batch(self, questions: Sequence[str], images: Sequence[Image.Image]) -> PromptBatch:
        """Questions + PIL images → PromptBatch, with the checkpoint's chat template."""
        ids = [self.tokenizer.encode_prompt(q) for q in questions]
        return self.build_prompts(ids, self.encode_images(self.preprocess(images)))

    # -- family behaviour with LLaDA-V defaults (a family overrides what it does differently) -------
    def default_sampler(self):
        """The family's sampler settings (LLaDA-V: the paper's 32/32/32, greedy, low-confidence)."""
        from disp.config import SamplerConfig

        return SamplerConfig()

    def generate(self, prompt: PromptBatch, config=None, *, held: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, on_step=None):
        """Denoise answers for a PromptBatch with the family's sampler (see `disp.sampling.generate`)."""
        from disp.sampling import generate

        return generate(self, prompt, config or self.default_sampler(), held=held, generator=generator,
                        on_step=on_step)

    def training_loss(self, batch, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The family's SFT loss on a TrainBatch (LLaDA-V: Eq. 2 with 1/t weighting)."""
        from disp.losses import sft_loss

        return sft_loss(self, batch, generator=generator)

    # -- projector weights ---------------------------------------------------------------------
    def projector_state_dict(self) -> dict[str, torch.Tensor]:
        """Projector weights under their published names, `model.mm_projector.*`."""
        return {PROJECTOR_PREFIX + k: v.detach().clone() for k, v in self.projector.state_dict().items()}

    def load_projector_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Lay projector weights (`model.mm_projector.*` keys) over the current ones; every key must match."""
        own = self.projector.state_dict()
        foreign = sorted(k for k in state if not k.startswith(PROJECTOR_PREFIX))
        stripped = {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
        missing = sorted(PROJECTOR_PREFIX + k for k in own if k not in stripped)
        unexpected = foreign + sorted(PROJECTOR_PREFIX + k for k in stripped if k not in own)
        bad = sorted(PROJECTOR_PREFIX + k for k in stripped if k in own and stripped[k].shape != own[k].shape)
        if missing or unexpected or bad:
            raise CheckpointError(
                f"projector weights do not match: missing {missing}, unexpected {unexpected}, wrong shape {bad}"
            )
        with torch.no_grad():
            for k, v in stripped.items():
                own[k].copy_(v.to(own[k].dtype))

    def freeze_all_but_projector(self) -> list[nn.Parameter]:
        """requires_grad only on the projector; returns its parameters."""
        for p in self.parameters():
            p.requires_grad_(False)
        params = list(self.projector.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    # -- checkpoint I/O in the LLaVA layout (both families) ----------------------------------------
    def checkpoint_ignores(self) -> list[str]:
        """Checkpoint keys this model reads past: dropped tower layers, post-norm, head, image_newline."""
        tower = self.model.vision_tower.vision_tower
        prefix = r"model\.vision_tower\.vision_tower\.vision_model\."
        dropped = "|".join(str(i) for i in range(tower.used_layers, tower.total_layers)) or "NONE"
        return [
            prefix + rf"encoder\.layers\.({dropped})\..*",
            prefix + r"head\..*",
            r"model\.image_newline",
        ]

    @classmethod
    def check_dir(cls, path: Path, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], *,
                  projector_only: bool = False) -> None:
        """Without reading a weight: the tokenizer in `path` loads, and the tensors `shapes` (name -> shape,
        from the safetensors headers) are exactly what `from_dir` would load (`projector_only`: what
        `load_projector_state_dict` would). The model is built on the meta device: its parameters cost no
        memory."""
        tokenizer = ChatTokenizer.from_dir(path, template=prompt_template(config))
        with torch.device("meta"):
            model = cls(config, tokenizer)
        if projector_only:
            own = {k: tuple(v.shape) for k, v in model.projector_state_dict().items()}
            problem = shape_mismatch(own, shapes)
        else:
            own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            given = {**{k: v for k, v in own.items() if _optional_key(k)}, **shapes}
            problem = shape_mismatch(own, given, ignore=model.checkpoint_ignores())
        if problem:
            raise CheckpointError("the weights do not match the model config.json describes: " + problem)

    @classmethod
    def from_dir(cls, path: Path, config: dict[str, Any], dtype: torch.dtype | None = None) -> MDLM:
        model = cls(config, ChatTokenizer.from_dir(path, template=prompt_template(config)))
        state = read_state_dict(path)
        own = model.state_dict()
        for k in own:
            if _optional_key(k):
                state.setdefault(k, own[k])
        load_into(model, state, ignore=model.checkpoint_ignores())
        if dtype is not None:
            model.to(dtype)
        return model.eval()
