"""GPU memory of DiSP's stages on LLaDA-V's 8B shape, from measured parts: the arithmetic behind the batch sizes.

    python -m experiments.benchmarks.memory_8b [--visual 3699] [--text 100] [--gen 32] [--gpu-gib 79]

Two figures are measured on this machine's CPU, the rest is arithmetic:

- the weights: LLaDA-V's 8B shape built on the meta device with LLaDA-V's published anyres config
  (`experiments.benchmarks.workloads`), parameters counted in bf16 (language model, SigLIP tower) and float32
  (the projector, which disp trains and ships in float32);
- the activations a backward pass keeps per token per layer: one decoder layer of the 8B shape (4096 wide,
  12288 MLP, 32 heads) in bf16, run forward on 256 tokens with grad on its input, every tensor autograd saves
  counted once (those sharing the parameters' storage excluded). CPU SDPA uses a flash kernel that keeps
  q, k, v, the output and the log-sum-exp, like the GPU's fused kernels, so no L x L matrix appears.

Scoring and fine-tuning keep every layer's activations for the backward (Hutchinson's probes differentiate
with respect to the input embeddings; fine-tuning to the projector, before every layer), so they need
weights + batch x tokens x 32 x (bytes per token per layer). Purification runs without grad: one layer's
activations at a time is an upper bound. The batch that fits is the largest with a stated headroom (5 GiB
for the probes' batched backward, the logits and the allocator). The same arithmetic for the square
layout's 729 visual tokens (prompts of ~860 tokens, batch 8) gives 47.7 GB, as the 47.7 GB measured for
scoring on an H100 (docs/performance.md, 2026-11-23).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

GIB = 1 << 30
HEADROOM_GIB = 5.0


def weights_bytes() -> dict[str, int]:
    """Parameter bytes of LLaDA-V's 8B shape with the anyres config: LM and tower in bf16, projector float32."""
    from disp.models.llada_v import LLaDAV
    from disp.models.tiny import LLADA_V_ANYRES, tiny_config
    from disp.tokenizer import ChatTokenizer
    from experiments.benchmarks.workloads import LLADA_V_8B_LM, LLADA_V_VOCAB, SIGLIP_SO400M

    config = tiny_config("llada-v", LLADA_V_VOCAB, LLADA_V_8B_LM, SIGLIP_SO400M, LLADA_V_ANYRES)
    tokenizer = _any_tokenizer(ChatTokenizer)
    with torch.device("meta"):
        model = LLaDAV(config, tokenizer)
    parts = {"language model (bf16)": 0, "vision tower (bf16)": 0, "projector (float32)": 0}
    for name, p in model.named_parameters():
        if ".vision_tower." in name:
            parts["vision tower (bf16)"] += 2 * p.numel()
        elif ".mm_projector." in name:
            parts["projector (float32)"] += 4 * p.numel()
        else:  # the language model and image_newline
            parts["language model (bf16)"] += 2 * p.numel()
    return parts


def _any_tokenizer(cls):
    import tempfile
    from pathlib import Path

    from disp.models.tiny import _write_config, _write_tokenizer, tiny_config

    with tempfile.TemporaryDirectory() as tmp:
        vocab = _write_tokenizer(Path(tmp), None, 512)
        _write_config(Path(tmp), tiny_config("llada-v", vocab))
        return cls.from_dir(tmp)


def saved_bytes_per_token_per_layer(tokens: int = 256) -> int:
    """Bytes autograd keeps for one 8B-shape decoder layer, per token (bf16, grad on the input only)."""
    from disp.models.llada_lm import DecoderLayer, LLaDAConfig, rope_cos_sin
    from experiments.benchmarks.workloads import LLADA_V_8B_LM

    cfg = LLaDAConfig(**{**LLADA_V_8B_LM, "num_hidden_layers": 1})
    torch.manual_seed(0)
    layer = DecoderLayer(cfg).to(torch.bfloat16).requires_grad_(False)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(tokens)[None], cfg.head_dim, cfg.rope_theta, torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, None)
    return math.ceil(sum(kept.values()) / tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--visual", type=int, default=3699, help="visual tokens per sample (2x2 anyres: 3699)")
    p.add_argument("--text", type=int, default=100, help="prompt text tokens (system prompt and question)")
    p.add_argument("--gen", type=int, default=32, help="answer tokens")
    p.add_argument("--gpu-gib", type=float, default=79.0, help="usable GPU memory (an 80 GB H100: 79.6 GiB)")
    args = p.parse_args(argv)
    from experiments.benchmarks.workloads import LLADA_V_8B_LM

    layers = LLADA_V_8B_LM["num_hidden_layers"]
    parts = weights_bytes()
    weights = sum(parts.values())
    per_layer = saved_bytes_per_token_per_layer()
    tokens = args.text + args.visual + args.gen
    print(f"LLaDA-V 8B shape, {args.visual} visual + {args.text} text + {args.gen} answer = {tokens} tokens per sample")
    for name, b in parts.items():
        print(f"  weights, {name:22s} {b / GIB:7.2f} GiB")
    print(f"  activations kept for a backward: {per_layer:,} bytes per token per layer (measured), "
          f"x {layers} layers = {per_layer * layers / 2**20:.2f} MiB per token")
    per_sample = tokens * per_layer * layers
    budget = args.gpu_gib * GIB - weights - HEADROOM_GIB * GIB
    fit = max(0, int(budget // per_sample))
    print(f"  scoring / fine-tuning: {per_sample / GIB:.2f} GiB per sample; batch that fits {args.gpu_gib:g} GiB "
          f"with {HEADROOM_GIB:g} GiB headroom: {fit} "
          f"({(weights + fit * per_sample) / GIB:.1f} GiB; {fit + 1}: {(weights + (fit + 1) * per_sample) / GIB:.1f} GiB)")
    print(f"  a LaViDa of this shape doubles the rows in fine-tuning (complementary masks): micro-batch {fit // 2}")
    one_layer = tokens * per_layer
    nograd = max(1, int(budget // one_layer))
    print(f"  purification (no grad, one layer at a time): {one_layer / GIB:.3f} GiB per sample; "
          f"batch 8: {(weights + 8 * one_layer) / GIB:.1f} GiB; up to {nograd} fit")
    square = 860 * per_layer * layers
    print(f"  check, square 729-token layout at batch 8 (~860 tokens): {(weights + 8 * square) / 1e9:.1f} GB "
          f"(measured on an H100 for scoring, 2026-11-23: 47.7 GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
