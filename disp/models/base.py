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

from disp.constants import IMAGE_NEWLINE_KEY, IMAGE_TOKEN_INDEX, PROJECTOR_PREFIX
from disp.models.anyres import ImageLayout, Size
from disp.models.checkpoint import CheckpointError, materialise, shape_mismatch
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
    """SigLIP preprocessing of each view: S×S (bicubic), scale to [0, 1], normalise by mean/std.

    `layout` decides the views of an image (one square or padded view, or anyres crops).
    """

    layout: ImageLayout
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def size(self) -> int:
        return self.layout.image_size

    def normalise(self, img: Image.Image) -> torch.Tensor:
        """An S×S RGB view → [3, S, S] float32."""
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(self.mean)[:, None, None]) \
            / torch.tensor(self.std)[:, None, None]

    def views(self, image: Image.Image) -> ImageViews:
        """One image → its views' pixel values [n_views, 3, S, S] and its size."""
        image = image.convert("RGB")
        fill = tuple(int(255 * m) for m in self.mean)
        return ImageViews(torch.stack([self.normalise(v) for v in self.layout.views(image, fill)]), image.size)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → pixel values [N, 3, S, S] of their single views (square and pad layouts)."""
        if self.layout.multi_view:
            raise ValueError("an anyres checkpoint gives each image its own number of views: use views()")
        return torch.cat([self.views(img).pixels for img in images])


@dataclass
class ImageViews:
    """One image as the tower takes it: pixel values [n_views, 3, S, S] (the whole image first) and the
    image's original size (width, height), which the anyres merge needs."""

    pixels: torch.Tensor
    size: Size


@dataclass
class ImageFeatures:
    """The tower's output for one image: [n_views, N_view, C_v], and the image's size (width, height)."""

    features: torch.Tensor
    size: Size


@dataclass
class PromptBatch:
    """Left-padded prompt embeddings with each sample's visual tokens spliced in.

    embeds: [B, P, D]; attention_mask: [B, P] bool (False on padding);
    image_positions: [B, N] long, the column of each visual token in `embeds`, N the most visual tokens of a
    sample in the batch; image_mask: [B, N] bool, False on the entries past a sample's own count (those
    entries repeat the sample's first visual column). None: every entry is a visual token.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    image_positions: torch.Tensor
    image_mask: torch.Tensor | None = None

    def visual_mask(self) -> torch.Tensor:
        """[B, N] bool, True on the entries that are visual tokens."""
        if self.image_mask is None:
            return torch.ones_like(self.image_positions, dtype=torch.bool)
        return self.image_mask

    def visual_counts(self) -> list[int]:
        """Visual tokens per sample."""
        return self.visual_mask().sum(1).tolist()


def prompt_template(config: dict[str, Any]) -> PromptTemplate:
    """The checkpoint's declared prompt format: config.json `disp_prompt` ({"system": ...}),
    else LLaDA-V's `llava_llada` template with its system prompt."""
    fields = config.get("disp_prompt") or {}
    unknown = sorted(set(fields) - {"system", "image_first"})
    if unknown:
        raise CheckpointError(f"config.json: unknown disp_prompt fields {unknown}")
    return PromptTemplate(**fields)


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

    def forward_and_cache(self, embeds: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int):
        """Full forward of [prompt | answer] → (answer logits [B, G, V], the prompt's keys/values), for the
        approximate prompt cache (`SamplerConfig.prompt_cache_refresh`); families without one refuse it."""
        raise NotImplementedError(f"the {self.family} family has no approximate prompt key/value cache "
                                  "(SamplerConfig.prompt_cache_refresh)")

    # -- shared behaviour ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens(torch.zeros(1, dtype=torch.long, device=self.device)).dtype

    @property
    def layout(self) -> ImageLayout:
        return self.processor.layout

    @property
    def image_newline(self) -> torch.Tensor | None:
        """`model.image_newline` [D], present when the merge type has "unpad"."""
        return getattr(self.model, "image_newline", None)

    @property
    def num_image_tokens(self) -> int | None:
        """Visual tokens per image when every image gets the same number (one view); None for anyres."""
        return None if self.layout.multi_view else self.layout.token_count((self.layout.image_size,) * 2)

    def visual_token_count(self, size: Size) -> int:
        """Visual tokens of an image of `size` (width, height), by the checkpoint's layout."""
        return self.layout.token_count(size)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → pixel values [N, 3, S, S] of their single views, on the model's device."""
        return self.processor(images).to(self.device)

    def project(self, features: torch.Tensor, projector: nn.Module | None = None) -> torch.Tensor:
        """Per-view vision features [N, N_view, C_v] → per-view token embeddings [N, g², D]."""
        projector = projector or self.projector
        return projector(features.to(next(projector.parameters()).dtype))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower then projector, per view: [N, 3, S, S] → [N, g², D]."""
        return self.project(self.vision_features(pixel_values))

    def image_views(self, images: Sequence[Image.Image]) -> list[ImageViews]:
        """PIL images → their views (CPU)."""
        return [self.processor.views(img) for img in images]

    def tower(self, views: Sequence[ImageViews]) -> list[ImageFeatures]:
        """The vision tower over every view of `views` in one pass, split back per image."""
        counts = [len(v.pixels) for v in views]
        feats = self.vision_features(torch.cat([v.pixels for v in views]).to(self.device))
        return [ImageFeatures(f, v.size) for f, v in zip(feats.split(counts), views, strict=True)]

    def visual_tokens(self, features: Sequence[ImageFeatures], projector: nn.Module | None = None
                      ) -> list[torch.Tensor]:
        """Tower outputs → each image's visual tokens [N_b, D] (projector, then the layout's merge).

        `projector` replaces the model's own (fine-tuning's feature anchor compares against a copy).
        """
        counts = [len(f.features) for f in features]
        per_view = self.project(torch.cat([f.features for f in features]).to(self.device), projector)
        return [self.layout.merge_views(t, f.size, self.image_newline)
                for t, f in zip(per_view.split(counts), features, strict=True)]

    def image_tokens(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """PIL images → each one's visual tokens [N_b, D]."""
        return self.visual_tokens(self.tower(self.image_views(images)))

    def mask_embedding(self) -> torch.Tensor:
        """e_mask [D]: the embedding of `<|mdm_mask|>`."""
        return self.embed_tokens(torch.tensor([self.tokenizer.mask_id], device=self.device))[0]

    def build_prompts(self, prompt_ids: Sequence[Sequence[int]],
                      image_embeds: torch.Tensor | Sequence[torch.Tensor]) -> PromptBatch:
        """Splice each sample's visual tokens ([B, N_v, D], or B tensors [N_b, D]) into its prompt at
        IMAGE_TOKEN_INDEX, left-pad to a batch.

        One embedding lookup for the whole batch; padding columns hold zero vectors.
        """
        B = len(image_embeds)
        if len(prompt_ids) != B:
            raise ValueError(f"{len(prompt_ids)} prompts for {B} images")
        counts = [len(e) for e in image_embeds]
        starts = []
        for ids in prompt_ids:
            where = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
            if len(where) != 1:
                raise ValueError(f"each prompt needs exactly one image placeholder, found {len(where)}")
            starts.append(where[0])
        lengths = [len(ids) - 1 + n for ids, n in zip(prompt_ids, counts, strict=True)]
        width, n_max = max(lengths), max(counts)
        ids = torch.zeros(B, width, dtype=torch.long)
        mask = torch.zeros(B, width, dtype=torch.bool)
        img_pos = torch.empty(B, n_max, dtype=torch.long)
        img_mask = torch.zeros(B, n_max, dtype=torch.bool)
        for b, (row, j, n, length) in enumerate(zip(prompt_ids, starts, counts, lengths, strict=True)):
            pad = width - length
            ids[b, pad:pad + j] = torch.tensor(list(row[:j]), dtype=torch.long)
            ids[b, pad + j + n:] = torch.tensor(list(row[j + 1:]), dtype=torch.long)
            mask[b, pad:] = True
            img_pos[b] = pad + j  # entries past n repeat the first visual column
            img_pos[b, :n] = torch.arange(pad + j, pad + j + n)
            img_mask[b, :n] = True
        dev = self.device
        ids, mask, img_pos, img_mask = ids.to(dev), mask.to(dev), img_pos.to(dev), img_mask.to(dev)
        text = self.embed_tokens(ids)
        embeds = torch.where(mask[..., None], text, torch.zeros((), dtype=text.dtype, device=dev))
        rows = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(counts)]).to(dev)
        vis = torch.cat([e.reshape(-1, text.shape[-1]) for e in image_embeds]).to(dev, text.dtype)
        embeds = embeds.index_put((rows, img_pos[img_mask]), vis)
        return PromptBatch(embeds, mask, img_pos, None if all(n == n_max for n in counts) else img_mask)

    def prompt_batch(self, questions: Sequence[str], images: Sequence[Image.Image]) -> PromptBatch:
        """Questions + PIL images → PromptBatch, with the checkpoint's chat template."""
        ids = [self.tokenizer.encode_prompt(q) for q in questions]
        return self.build_prompts(ids, self.image_tokens(images))

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
        """Projector weights under their published names, `model.mm_projector.*`, and `model.image_newline`
        where the model has one (it shapes the visual tokens too, so an overlay carries it)."""
        out = {PROJECTOR_PREFIX + k: v.detach().clone() for k, v in self.projector.state_dict().items()}
        if self.image_newline is not None:
            out[IMAGE_NEWLINE_KEY] = self.image_newline.detach().clone()
        return out

    def load_projector_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Lay projector weights (`model.mm_projector.*` keys, every one) and optionally `model.image_newline`
        over the current ones; anything else, a missing projector key or a wrong shape is refused by name."""
        own = self.projector.state_dict()
        newline = self.image_newline
        foreign = sorted(k for k in state if not k.startswith(PROJECTOR_PREFIX)
                         and not (k == IMAGE_NEWLINE_KEY and newline is not None))
        stripped = {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
        missing = sorted(PROJECTOR_PREFIX + k for k in own if k not in stripped)
        unexpected = foreign + sorted(PROJECTOR_PREFIX + k for k in stripped if k not in own)
        bad = sorted(PROJECTOR_PREFIX + k for k in stripped if k in own and stripped[k].shape != own[k].shape)
        if IMAGE_NEWLINE_KEY in state and newline is not None and state[IMAGE_NEWLINE_KEY].shape != newline.shape:
            bad.append(IMAGE_NEWLINE_KEY)
        if missing or unexpected or bad:
            raise CheckpointError(
                f"projector weights do not match: missing {missing}, unexpected {unexpected}, wrong shape {bad}"
            )
        with torch.no_grad():
            for k, v in stripped.items():
                own[k].copy_(v.to(own[k].dtype))
            if IMAGE_NEWLINE_KEY in state:
                newline.copy_(state[IMAGE_NEWLINE_KEY].to(newline.dtype))

    def freeze_all_but_projector(self) -> list[nn.Parameter]:
        """requires_grad only on the projector (image_newline stays frozen, as in LLaVA's `mm_mlp_adapter`
        training); returns its parameters."""
        for p in self.parameters():
            p.requires_grad_(False)
        params = list(self.projector.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    # -- checkpoint I/O in the LLaVA layout (both families) ----------------------------------------
    def checkpoint_ignores(self) -> list[str]:
        """Checkpoint keys this model reads past: dropped tower layers, the tower's post-norm and head, and
        image_newline when the merge type has no use for it."""
        tower = self.model.vision_tower.vision_tower
        prefix = r"model\.vision_tower\.vision_tower\.vision_model\."
        dropped = "|".join(str(i) for i in range(tower.used_layers, tower.total_layers)) or "NONE"
        ignores = [prefix + rf"encoder\.layers\.({dropped})\..*", prefix + r"(head|post_layernorm)\..*"]
        return ignores if self.image_newline is not None else [*ignores, r"model\.image_newline"]

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
            if IMAGE_NEWLINE_KEY in own and IMAGE_NEWLINE_KEY not in shapes:  # optional in an overlay
                del own[IMAGE_NEWLINE_KEY]
            problem = shape_mismatch(own, shapes)
        else:
            own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            problem = shape_mismatch(own, shapes, ignore=model.checkpoint_ignores())
        if problem:
            raise CheckpointError("the weights do not match the model config.json describes: " + problem)

    @classmethod
    def from_dir(cls, path: Path, config: dict[str, Any], dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> MDLM:
        """Build on the meta device (no memory), then read the weights straight into the parameters, on
        `device` (default CPU), in the checkpoint's dtype unless `dtype` is given; on a CPU float16 weights
        become float32 (CPU float16 kernels are slow and round differently; bfloat16 stays)."""
        tokenizer = ChatTokenizer.from_dir(path, template=prompt_template(config))
        with torch.device("meta"):
            model = cls(config, tokenizer)
        on_cpu = torch.device(device or "cpu").type == "cpu"
        materialise(model, path, ignore=model.checkpoint_ignores(), dtype=dtype, device=device,
                    half_to_float32=on_cpu)
        model.model.vision_tower.vision_tower.reset_buffers(device)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointError(f"tensors not filled by the checkpoint: {left[:8]}")
        return model.eval()
