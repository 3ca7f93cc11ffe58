"""LLaDA-V: SigLIP tower (last layer dropped) → `mlp2x_gelu` projector → LLaDA language model.

Loads a checkpoint directory in LLaDA-V's published layout: `config.json` with the Llama-style LM fields
and LLaVA's `mm_*` fields, safetensors (sharded with `model.safetensors.index.json` or single), keys
`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`, `model.mm_projector.{0,2}`,
`model.vision_tower.vision_tower.vision_model.*`.

Images become visual tokens as the config says (`disp.models.anyres`): one square or padded view, or
LLaDA-V's published `anyres_max_4` crops with `spatial_unpad` and `model.image_newline`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from disp.models.anyres import ImageLayout
from disp.models.base import MDLM, ImageProcessing, build_projector
from disp.models.checkpoint import CheckpointError
from disp.models.llada_lm import (
    KV,
    DecoderLayer,
    LLaDAConfig,
    PrefixCache,
    RMSNorm,
    positions_from_mask,
    rope_cos_sin,
)
from disp.tokenizer import ChatTokenizer

ARCHITECTURE = "LlavaLLaDAModelLM"

# SigLIP towers LLaDA-V was published with, for configs that name the tower but carry no vision_config.
KNOWN_TOWERS = {
    "so400m-patch14-384": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                               "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
}

VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "image_size", "patch_size", "layer_norm_eps", "hidden_act", "num_channels")


def vision_config_from(cfg: dict[str, Any]) -> dict[str, Any]:
    """The SigLIP hyper-parameters: `vision_config` if present, else looked up from `mm_vision_tower`."""
    if isinstance(cfg.get("vision_config"), dict):
        return {k: v for k, v in cfg["vision_config"].items() if k in VISION_FIELDS}
    name = str(cfg.get("mm_vision_tower", ""))
    for key, known in KNOWN_TOWERS.items():
        if key in name:
            return dict(known)
    raise CheckpointError(
        f"config.json: cannot tell the vision tower's shape: no 'vision_config' and unknown mm_vision_tower {name!r}"
    )


class SiglipTower(nn.Module):
    """SigLIP vision encoder truncated at `mm_vision_select_layer`; no post-norm, no pooling head
    (LLaDA-V reads the pre-norm hidden states, so the post-norm is replaced by the identity)."""

    def __init__(self, vcfg: dict[str, Any], select_layer: int):
        super().__init__()
        total = vcfg["num_hidden_layers"]
        used = total + 1 + select_layer if select_layer < 0 else select_layer
        if not 1 <= used <= total:
            raise ValueError(f"mm_vision_select_layer {select_layer} is out of range for a {total}-layer tower")
        self.total_layers, self.used_layers = total, used
        self.vision_model = SiglipVisionModel(SiglipVisionConfig(**{**vcfg, "num_hidden_layers": used},
                                                                 vision_use_head=False))
        self.vision_model.post_layernorm = nn.Identity()

    def reset_buffers(self, device: str | torch.device | None = None) -> None:
        """Recreate the position-id buffer, which a meta-device build leaves empty (it is not in checkpoints)."""
        emb = self.vision_model.embeddings
        emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=device)[None], persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        h = vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype))
        return vm.encoder(inputs_embeds=h).last_hidden_state  # (N, N_v, C_v)


class _VisionTowerHolder(nn.Module):
    """Gives the tower LLaVA's double name: `model.vision_tower.vision_tower.vision_model.*`."""

    def __init__(self, tower: SiglipTower):
        super().__init__()
        self.vision_tower = tower


def new_image_newline(hidden_size: int) -> nn.Parameter:
    """`model.image_newline` [D], initialised as LLaVA does (N(0, 1/D)); checkpoints overwrite it."""
    return nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))


def layout_of(config: dict[str, Any], vcfg: dict[str, Any], grid: int | None = None) -> ImageLayout:
    """The checkpoint's image layout; `grid` is the tokens per side of a view (default: the tower's patches)."""
    return ImageLayout.from_config(config, vcfg["image_size"], grid or vcfg["image_size"] // vcfg["patch_size"])


class _Inner(nn.Module):
    """The `model.` namespace of the checkpoint."""

    def __init__(self, lm: LLaDAConfig, vcfg: dict[str, Any], select_layer: int, projector_type: str,
                 newline: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(lm) for _ in range(lm.num_hidden_layers))
        self.norm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)
        self.vision_tower = _VisionTowerHolder(SiglipTower(vcfg, select_layer))
        self.mm_projector = build_projector(projector_type, vcfg["hidden_size"], lm.hidden_size)
        if newline:
            self.image_newline = new_image_newline(lm.hidden_size)


class LLaDAV(MDLM):
    family = "llada-v"

    def __init__(self, config: dict[str, Any], tokenizer: ChatTokenizer):
        super().__init__()
        self.config = config
        self.lm_config = LLaDAConfig.from_dict(config)
        vcfg = vision_config_from(config)
        self.processor = ImageProcessing(layout_of(config, vcfg))
        self.model = _Inner(self.lm_config, vcfg, int(config.get("mm_vision_select_layer", -2)),
                            config.get("mm_projector_type", "mlp2x_gelu"), self.processor.layout.newline)
        self.lm_head = nn.Linear(self.lm_config.hidden_size, self.lm_config.vocab_size, bias=False)
        self.tokenizer = tokenizer
        if tokenizer.vocab_size > self.lm_config.vocab_size:
            raise CheckpointError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {self.lm_config.vocab_size}"
            )

    @property
    def projector(self) -> nn.Module:
        return self.model.mm_projector

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_tower.vision_tower(pixel_values)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       logits_from: int = 0, kv_sink: list[KV] | None = None) -> torch.Tensor:
        """`MDLM.forward_embeds`; `kv_sink` receives each layer's rotary keys/values [B, H_kv, L, hd]."""
        B, L, _ = embeds.shape
        pos = positions_from_mask(attention_mask, B, L, embeds.device)
        cos, sin = rope_cos_sin(pos, self.lm_config.head_dim, self.lm_config.rope_theta, embeds.dtype)
        h = embeds
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, attention_mask, logits_from if i == last else 0, kv_sink=kv_sink)
        return self.lm_head(self.model.norm(h))  # (B, L − logits_from, V)

    # -- approximate prompt key/value reuse (disp.sampling, SamplerConfig.prompt_cache_refresh) ---------
    def forward_and_cache(self, embeds: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
                          ) -> tuple[torch.Tensor, PrefixCache]:
        """A full forward of [prompt | answer] ([B, P + G, D], mask [B, P + G]) → the answer's logits
        [B, G, V] (the same numbers as `forward_embeds(..., logits_from=P)`) and the prompt's keys/values."""
        sink: list[KV] = []
        logits = self.forward_embeds(embeds, attention_mask, logits_from=prompt_length, kv_sink=sink)
        P = prompt_length
        return logits, PrefixCache([(k[:, :, :P], v[:, :, :P]) for k, v in sink], attention_mask[:, :P])

    def forward_cached(self, embeds: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """Answer embeddings [B, G, D] → logits [B, G, V], attending to the cached prompt keys/values.

        Not exact under LLaDA-V's bidirectional attention: the prompt's keys/values are those of the
        forward that made the cache, when the answer held other tokens (dLLM-Cache / Fast-dLLM's prefix cache).
        """
        B, G, _ = embeds.shape
        mask = torch.cat([cache.attention_mask, torch.ones(B, G, dtype=torch.bool, device=embeds.device)], 1)
        pos = positions_from_mask(mask, B, mask.shape[1], embeds.device)[:, -G:]
        cos, sin = rope_cos_sin(pos, self.lm_config.head_dim, self.lm_config.rope_theta, embeds.dtype)
        h = embeds
        for layer, past in zip(self.model.layers, cache.layers, strict=True):
            h = layer(h, cos, sin, mask, past=past)
        return self.lm_head(self.model.norm(h))  # (B, G, V)


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {exc}") from exc
