"""LaViDa: SigLIP tower → `mlp2x_gelu` projector → 2×2 token pooling → OLMo-style LLaDA.

Loads a checkpoint directory in LaViDa's published layout (`LlavaLladaForMaskedDiffusion`,
`model_type "llava_llada"`): `config.json` with OLMo-style language-model fields (`d_model, n_heads,
n_kv_heads, n_layers, mlp_hidden_size, rope_theta, rms_norm_eps, vocab_size / embedding_size`) and
LLaVA's `mm_*` fields; safetensors keys `model.transformer.wte`, `model.transformer.blocks.N.{attn_norm,
q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}`, `model.transformer.ln_f`,
`model.transformer.ff_out` (the lm head; no weight tying), `model.mm_projector.{0,2}`,
`model.vision_tower.vision_tower.vision_model.*`.

The block math is LLaDA's (RMSNorm, rotary embeddings, SwiGLU, attention without a causal mask) and is
taken from `disp.models.llada_lm`; only the module names differ from LLaDA-V's Llama renaming.

Visual tokens (LaViDa `llava_arch.py`): `encode_images` runs tower then projector, and every view is
then pooled by `get_2dPool(stride=2)`. The pooling mode is `mm_spatial_pool_mode`, whose LLaVA-NeXT
training default is "bilinear": a resize of the s×s grid to ceil(s/2)×ceil(s/2), so 27×27 = 729 → 14×14 = 196
tokens per view. On an even side that resize is exactly 2×2 average pooling; on an odd side it is a
bilinear resample. "average" / "max" are `avg_pool2d` / `max_pool2d` with floor division (27 → 13) as
upstream. `mm_spatial_pool_stride` 1 disables pooling (LaViDa's stage-1 `NOT_ALWASY_DO_2DPOOL`).

Attention is fully bidirectional by default. `prefix_length` selects LaViDa's prefix-DLM mask
(`kv < prefix or q >= prefix`: the prompt attends only to itself, the answer to everything); only under
that mask is the prompt's key/value cache (`prefill` / `forward_cached`) exact.

Images: the config's layout (`disp.models.anyres`); LaViDa's stage-2 checkpoints use `anyres` with the
pinpoints [(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)] and `spatial_unpad`, merged after
the per-view pooling (a 768×768 image: 196 + 28·29 = 1008 visual tokens).

Deviations, all invisible to a single unpadded sequence: rotary positions skip left padding (upstream
counts padding), and padding keys are masked (upstream's MDM attention ignores the mask).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from disp.models.base import MDLM, ImageProcessing, PromptBatch, build_projector
from disp.models.checkpoint import CheckpointError
from disp.models.llada_lm import (
    KV,
    LLaDAConfig,
    PrefixCache,
    RMSNorm,
    apply_rope,
    bidirectional_attention,
    positions_from_mask,
    rope_cos_sin,
)
from disp.models.llada_v import (
    SiglipTower,
    _VisionTowerHolder,
    layout_of,
    new_image_newline,
    vision_config_from,
)
from disp.tokenizer import ChatTokenizer

if TYPE_CHECKING:  # imported lazily below: those modules import the model package
    from disp.config import SamplerConfig
    from disp.losses import TrainBatch
    from disp.sampling import Generation

ARCHITECTURE = "LlavaLladaForMaskedDiffusion"
POOL_MODES = ("bilinear", "average", "max")

# OLMo `ModelConfig` options this adapter implements, with the only value it accepts.
_REQUIRED_OPTIONS = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
                     "alibi": False, "weight_tying": False, "include_bias": False, "attention_layer_norm": False,
                     "input_emb_norm": False, "scale_logits": False, "multi_query_attention": False}


def olmo_lm_config(cfg: dict[str, Any]) -> LLaDAConfig:
    """LLaDA's OLMo-style config.json fields → the language-model hyper-parameters.

    `embedding_size` (the padded row count of `wte` and `ff_out`) wins over `vocab_size`;
    `rms_norm_eps` over `layer_norm_eps`. Options this adapter does not implement are refused by name.
    """
    missing = sorted(n for n in ("d_model", "n_heads", "n_layers") if n not in cfg)
    if missing or not (cfg.get("embedding_size") or cfg.get("vocab_size")):
        raise CheckpointError(f"config.json lacks OLMo language-model fields {missing or ['vocab_size']}")
    unsupported = sorted(f"{k}={cfg[k]!r} (need {v!r})" for k, v in _REQUIRED_OPTIONS.items()
                         if k in cfg and cfg[k] is not None and cfg[k] != v)
    if unsupported:
        raise CheckpointError(f"config.json: unsupported LLaDA options: {', '.join(unsupported)}")
    d_model, n_heads = int(cfg["d_model"]), int(cfg["n_heads"])
    hidden = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * d_model
    eps = cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-5))
    return LLaDAConfig(
        vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
        hidden_size=d_model,
        intermediate_size=int(hidden),
        num_hidden_layers=int(cfg["n_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(cfg.get("n_kv_heads") or n_heads),
        rms_norm_eps=float(eps),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        max_position_embeddings=int(cfg.get("max_sequence_length", 4096)),
    )


def pool_visual_tokens(x: torch.Tensor, stride: int = 2, mode: str = "bilinear") -> torch.Tensor:
    """LaViDa's `get_2dPool`: [N, s·s, D] row-major grid per view → [N, s'·s', D].

    s' = ceil(s / stride) for "bilinear" (a resize, align_corners=False), floor(s / stride) for
    "average" and "max". stride 1 returns x unchanged.
    """
    if stride == 1:
        return x
    N, P, D = x.shape
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"cannot pool {P} visual tokens: not a square grid")
    grid = x.transpose(1, 2).reshape(N, D, side, side)  # (N, D, s, s)
    if mode == "bilinear":
        out = math.ceil(side / stride)
        grid = F.interpolate(grid, size=(out, out), mode="bilinear", align_corners=False)
    elif mode == "average":
        grid = F.avg_pool2d(grid, stride)
    elif mode == "max":
        grid = F.max_pool2d(grid, stride)
    else:
        raise ValueError(f"mm_spatial_pool_mode must be one of {POOL_MODES}, got {mode!r}")
    return grid.flatten(2).transpose(1, 2)  # (N, s'·s', D)


def pooled_side(side: int, stride: int, mode: str) -> int:
    if stride == 1:
        return side
    return math.ceil(side / stride) if mode == "bilinear" else side // stride


class LLaDALlamaBlock(nn.Module):
    """One LLaDA block under its OLMo names: pre-norm attention and SwiGLU MLP, no biases.

    forward(x [B, L, D], cos/sin [B, 1, L, hd], key_mask [B, L_k] | None) → (x [B, L, D], (k, v)),
    k/v [B, H_kv, L, hd] with rotary embeddings applied (the prompt cache stores these).
    """

    def __init__(self, cfg: LLaDAConfig, qkv_bias: bool = False):
        super().__init__()
        D, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(D, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(self.n_heads * hd, D, bias=False)
        self.ff_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(D, cfg.intermediate_size, bias=False)  # gate
        self.up_proj = nn.Linear(D, cfg.intermediate_size, bias=False)
        self.ff_out = nn.Linear(cfg.intermediate_size, D, bias=False)  # down

    def forward(self, x, cos, sin, key_mask, *, prefix: int | None = None, past: KV | None = None):
        """Full attention; or prefix-DLM attention (`prefix`); or x is the answer after a cached prompt (`past`)."""
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(h).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.v_proj(h).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            y = bidirectional_attention(q, torch.cat([past[0], k], 2), torch.cat([past[1], v], 2), key_mask)
        elif prefix:
            # prompt queries see the prompt only; answer queries see every key
            head_mask = None if key_mask is None else key_mask[:, :prefix]
            y = torch.cat([bidirectional_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], head_mask),
                           bidirectional_attention(q[:, :, prefix:], k, v, key_mask)], dim=2)
        else:
            y = bidirectional_attention(q, k, v, key_mask)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)), (k, v)


class _Inner(nn.Module):
    """The `model.` namespace of the checkpoint."""

    def __init__(self, lm: LLaDAConfig, vcfg: dict[str, Any], select_layer: int, projector_type: str,
                 qkv_bias: bool, newline: bool):
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(lm.vocab_size, lm.hidden_size),
            "blocks": nn.ModuleList(LLaDALlamaBlock(lm, qkv_bias) for _ in range(lm.num_hidden_layers)),
            "ln_f": RMSNorm(lm.hidden_size, lm.rms_norm_eps),
            "ff_out": nn.Linear(lm.hidden_size, lm.vocab_size, bias=False),
        })
        self.vision_tower = _VisionTowerHolder(SiglipTower(vcfg, select_layer))
        self.mm_projector = build_projector(projector_type, vcfg["hidden_size"], lm.hidden_size)
        if newline:
            self.image_newline = new_image_newline(lm.hidden_size)


class LaViDa(MDLM):
    family = "lavida"

    def __init__(self, config: dict[str, Any], tokenizer: ChatTokenizer):
        super().__init__()
        self.config = config
        self.lm_config = olmo_lm_config(config)
        vcfg = vision_config_from(config)
        self.pool_stride = int(config.get("mm_spatial_pool_stride") or 2)
        self.pool_mode = str(config.get("mm_spatial_pool_mode") or "bilinear")
        if self.pool_mode not in POOL_MODES:
            raise CheckpointError(f"config.json: mm_spatial_pool_mode must be one of {POOL_MODES}, "
                                  f"got {self.pool_mode!r}")
        side = pooled_side(vcfg["image_size"] // vcfg["patch_size"], self.pool_stride, self.pool_mode)
        self.processor = ImageProcessing(layout_of(config, vcfg, grid=side))
        self.model = _Inner(self.lm_config, vcfg, int(config.get("mm_vision_select_layer", -2)),
                            config.get("mm_projector_type", "mlp2x_gelu"), bool(config.get("include_qkv_bias")),
                            self.processor.layout.newline)
        self.tokenizer = tokenizer
        if tokenizer.vocab_size > self.lm_config.vocab_size:
            raise CheckpointError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's embedding_size is {self.lm_config.vocab_size}"
            )

    # -- the MDLM parts --------------------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.model.mm_projector

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_tower.vision_tower(pixel_values)

    def project(self, features: torch.Tensor, projector: nn.Module | None = None) -> torch.Tensor:
        """Projector, then per-view pooling (LaViDa pools after the projector): [N, s², C_v] → [N, s'², D]."""
        return pool_visual_tokens(super().project(features, projector), self.pool_stride, self.pool_mode)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.wte(ids)

    def forward_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       prefix_length: int | None = None, logits_from: int = 0) -> torch.Tensor:
        """Embeddings [B, L, D], mask [B, L] bool → logits [B, L, V].

        prefix_length P: prefix-DLM attention, columns [0, P) (the left-padded prompt) see only themselves.
        """
        B, L, _ = embeds.shape
        cos, sin = self._rope(positions_from_mask(attention_mask, B, L, embeds.device), embeds.dtype)
        h = embeds
        for block in self.model.transformer.blocks:
            h, _ = block(h, cos, sin, attention_mask, prefix=prefix_length)
        return self._head(h[:, logits_from:])

    # -- prefix-DLM key/value cache ------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt: PromptBatch) -> PrefixCache:
        """Run the prompt alone [B, P, D] and keep every layer's keys/values.

        Exact for the prefix-DLM mask, under which the prompt never attends to the answer.
        """
        embeds, mask = prompt.embeds, prompt.attention_mask
        B, P, _ = embeds.shape
        cos, sin = self._rope(positions_from_mask(mask, B, P, embeds.device), embeds.dtype)
        h, layers = embeds, []
        for block in self.model.transformer.blocks:
            h, kv = block(h, cos, sin, mask)
            layers.append(kv)
        return PrefixCache(layers, mask)

    def forward_cached(self, embeds: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """Answer embeddings [B, G, D] after a cached prompt → logits [B, G, V] (prefix-DLM attention)."""
        B, G, _ = embeds.shape
        mask = torch.cat([cache.attention_mask, torch.ones(B, G, dtype=torch.bool, device=embeds.device)], 1)
        pos = positions_from_mask(mask, B, mask.shape[1], embeds.device)[:, -G:]
        cos, sin = self._rope(pos, embeds.dtype)
        h = embeds
        for block, past in zip(self.model.transformer.blocks, cache.layers, strict=True):
            h, _ = block(h, cos, sin, mask, past=past)
        return self._head(h)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, self.lm_config.head_dim, self.lm_config.rope_theta, dtype)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        return t.ff_out(t.ln_f(h))  # (B, L, V)

    # -- family hooks (proposed for MDLM) ------------------------------------------------------
    def training_loss(self, batch: TrainBatch, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """LaViDa's complementary-masking loss on a `disp.losses.TrainBatch`."""
        from disp.losses_lavida import complementary_loss

        return complementary_loss(self, batch, generator=generator)

    def default_sampler(self) -> SamplerConfig:
        """The paper's 32-token answers; LaViDa's own options at their defaults (`disp.config.LaViDaSampling`:
        LaViDa's captioning evaluation, eval/run_coco.sh)."""
        from disp.config import SamplerConfig

        return SamplerConfig()

    def generate(self, prompt: PromptBatch, config: SamplerConfig | None = None, *, held: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, on_step=None) -> Generation:
        """`disp.sampling_lavida.generate` with this model; config None → `default_sampler()`."""
        from disp.sampling_lavida import generate

        return generate(self, prompt, config or self.default_sampler(), held=held, generator=generator,
                        on_step=on_step)


