"""The LLaDA language model: Llama-style blocks with bidirectional attention.

RMSNorm, rotary position embeddings, SwiGLU MLP, and scaled-dot-product attention with no causal mask
(LLaDA's "MDM" modification): every position attends to every non-padding position. Module names follow
LLaDA-V's renamed checkpoint (`model.layers.N.self_attn.q_proj`, ...), so its safetensors load as is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LLaDAConfig:
    """Language-model hyper-parameters (the Llama-style fields of LLaDA-V's config.json)."""

    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 16384

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLaDAConfig:
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in ("vocab_size", "hidden_size", "num_hidden_layers") if n not in d)
        if missing:
            raise ValueError(f"config.json lacks language-model fields {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("num_key_value_heads", d.get("num_attention_heads", cls.num_attention_heads))
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Rotary tables for integer positions [B, L] → cos, sin [B, 1, L, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, L, hd/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key halves: x [B, H, L, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def bidirectional_attention(q, k, v, key_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA without a causal mask. q [B,H,L,hd], k/v [B,Hkv,L,hd], key_mask [B,L] bool (True = attend)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # no mask when nothing is padded, so fused (flash) kernels stay eligible
    attn_mask = None if key_mask is None or bool(key_mask.all()) else key_mask[:, None, None, :]
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # bf16 recovery on a CPU (FinetuneConfig.bf16_cpu): torch's CPU flash attention is several times slower
        # in bf16 than in float32, backward most, so attention stays in the inputs' precision (float32)
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)


KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PrefixCache:
    """Per-layer rotary keys/values [B, H_kv, P, hd] of a prompt, and its attention mask [B, P]."""

    layers: list[KV]
    attention_mask: torch.Tensor

    def rows(self, index: torch.Tensor) -> PrefixCache:
        """The cache of the batch rows `index` [B'] (a generation drops rows that have stopped)."""
        if index.numel() == self.attention_mask.shape[0] and bool(
                (index == torch.arange(index.numel(), device=index.device)).all()):
            return self
        return PrefixCache([(k[index], v[index]) for k, v in self.layers], self.attention_mask[index])


class SelfAttention(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, key_mask, q_start: int = 0, *, past: KV | None = None,
                kv_sink: list[KV] | None = None):
        """x [B, L, D] → [B, L − q_start, D]: every position is a key, queries only from q_start on.

        past: keys/values [B, H_kv, P, hd] of earlier positions (a cached prompt) that x's queries also attend
        to; key_mask then covers [B, P + L]. kv_sink: receives this call's rotary keys/values [B, H_kv, L, hd].
        """
        B, L, _ = x.shape
        xq = x[:, q_start:]
        q = self.q_proj(xq).view(B, L - q_start, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, hd)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:, :, q_start:], sin[:, :, q_start:]), apply_rope(k, cos, sin)
        if kv_sink is not None:
            kv_sink.append((k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        y = bidirectional_attention(q, k, v, key_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, L - q_start, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, key_mask, q_start: int = 0, *, past: KV | None = None,
                kv_sink: list[KV] | None = None):
        """x [B, L, D] → [B, L − q_start, D] (the last layer need only compute the rows that are read);
        `past` and `kv_sink` as in `SelfAttention.forward`."""
        x = x[:, q_start:] + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, q_start, past=past,
                                            kv_sink=kv_sink)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_from_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Position ids [B, L]: 0.. over real tokens, so left padding does not shift a sample's positions."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for linear and embedding weights, zeros for biases (LLaDA's initializer_range)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
