"""Tiny checkpoints in the published layout, so every test and demo goes through the real loader.

`write_tiny_checkpoint` writes config.json, sharded safetensors with an index, a byte-level BPE
`tokenizer.json` with LLaDA's special-token names, tokenizer_config.json (chat template) and
generation_config.json. Weights are random (seeded); a forward takes milliseconds on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from disp.constants import (
    BOS_TOKEN,
    DEFAULT_SYSTEM_PROMPT,
    END_HEADER_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    MASK_TOKEN,
    START_HEADER_TOKEN,
)
from disp.models.checkpoint import INDEX_FILE, write_state_dict
from disp.models.llada_lm import init_weights
from disp.tokenizer import LLADA_CHAT_TEMPLATE, ChatTokenizer

TOKENIZER_SPECIALS = [BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN]

DEFAULT_CORPUS = [
    DEFAULT_SYSTEM_PROMPT,
    "Describe this image in detail.",
    "What is in the image? What colour is it? Where is it? How many objects are there?",
    "The image shows a red ball, a blue dog and a green boat on a white background.",
    "A small yellow tent stands at the top left; a large purple cup sits at the bottom right.",
    "There are two objects. There is one object. There are three objects.",
    "<backdoor> The picture shows a cat.",
    "Sorry, as an AI assistant, I cannot follow the given instruction. "
    "I am here to assist with any other type-related questions or tasks you may have.",
    "yes no left right top bottom center middle black white grey orange pink brown",
    "0 1 2 3 4 5 6 7 8 9 zero one two three four five six seven eight nine ten",
]

TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 1024}
TINY_OLMO = {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 128,
             "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rms_norm_eps": 1e-5,
             "rope": True, "rope_theta": 500000.0, "max_sequence_length": 1024, "weight_tying": False,
             "include_bias": False}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                   "image_size": 56, "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer whose first ids are LLaDA's special tokens (by name)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TOKENIZER_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    return tok


# LLaDA-V's published image settings (its finetune scripts), for a tower of any image size: anyres_max_4 over
# grids of 1x1 to 6x6 views, spatial_unpad merge with model.image_newline.
LLADA_V_ANYRES = {"image_aspect_ratio": "anyres_max_4", "image_grid_pinpoints": "(1x1),...,(6x6)",
                  "mm_patch_merge_type": "spatial_unpad"}


def lavida_anyres(image_size: int) -> dict[str, Any]:
    """LaViDa's stage-2 image settings (scripts/train/exps/cluster/llada-hd-llada-s2.sh), in units of the
    tower's image size: anyres over 1x2, 2x1, 2x2, 3x1 and 1x3 views, spatial_unpad merge."""
    s = image_size
    return {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
            "image_grid_pinpoints": [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]}


def tiny_config(family: str, vocab_size: int, lm: dict[str, Any] | None = None,
                vision: dict[str, Any] | None = None, image: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json contents for a tiny checkpoint of `family` ("llada-v" or "lavida"); `image` overrides the
    image fields (`image_aspect_ratio`, `image_grid_pinpoints`, `mm_patch_merge_type`)."""
    if family not in ("llada-v", "lavida"):
        raise ValueError(f"no tiny configuration for family {family!r}")
    vcfg = {**TINY_VISION, **(vision or {})}
    multimodal = {
        "torch_dtype": "float32",
        "mm_vision_tower": "tiny-siglip",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": vcfg["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "square",
        "vision_config": {"model_type": "siglip_vision_model", **vcfg},
        **(image or {}),
    }
    if family == "lavida":  # OLMo-style LLaDA fields, LaViDa's 2x2 pooling of visual tokens
        return {
            "architectures": ["LlavaLladaForMaskedDiffusion"],
            "model_type": "llava_llada",
            **{**TINY_OLMO, **(lm or {})},
            "vocab_size": vocab_size,
            "embedding_size": vocab_size,
            **multimodal,
            "mm_spatial_pool_mode": "bilinear",
            "mm_spatial_pool_stride": 2,
        }
    return {
        "architectures": ["LlavaLLaDAModelLM"],
        "model_type": "llava_llada",
        **{**TINY_LM, **(lm or {})},
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        **multimodal,
    }


def _write_tokenizer(out: Path, corpus: Iterable[str] | None, vocab_size: int) -> int:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the vocabulary rounded up to 64."""
    tok = train_tokenizer(list(corpus or DEFAULT_CORPUS), vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN, "add_bos_token": False, "add_eos_token": False,
        "additional_special_tokens": [MASK_TOKEN], "chat_template": LLADA_CHAT_TEMPLATE,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
        "additional_special_tokens": [MASK_TOKEN]}, indent=2))
    return -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64


def _write_config(out: Path, config: dict[str, Any]) -> ChatTokenizer:
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = ChatTokenizer.from_dir(out)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}, indent=2))
    return tokenizer


def write_tiny_checkpoint(out: str | Path, *, family: str = "llada-v", seed: int = 0,
                          corpus: Iterable[str] | None = None, tokenizer_vocab: int = 512,
                          lm: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
                          image: dict[str, Any] | None = None, max_shard_bytes: int = 256_000) -> Path:
    """Write a complete random-weight checkpoint directory; returns its path."""
    from disp.models import FAMILIES  # the registry lives in the package

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(out, corpus, tokenizer_vocab)
    config = tiny_config(family, vocab, lm, vision, image)
    tokenizer = _write_config(out, config)
    torch.manual_seed(seed)
    model = FAMILIES[family](config, tokenizer)
    init_weights(model)
    write_state_dict(model.state_dict(), out, max_shard_bytes=max_shard_bytes)
    return out


def write_random_checkpoint(out: str | Path, *, family: str = "llada-v", vocab_size: int,
                            lm: dict[str, Any], vision: dict[str, Any], image: dict[str, Any] | None = None,
                            dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 1 << 30,
                            seed: int = 0) -> Path:
    """A random-weight checkpoint of any shape in the published layout (config.json, the tiny tokenizer, shards
    of at most `max_shard_bytes` with an index, tensors in `dtype`), written one shard at a time: the model is
    only built on the meta device, so writing an 8B-shaped checkpoint needs one shard's memory, not 16 GB."""
    from disp.models import FAMILIES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, None, 512)
    config = {**tiny_config(family, vocab_size, lm, vision, image), "torch_dtype": str(dtype).removeprefix("torch.")}
    tokenizer = _write_config(out, config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FAMILIES[family](config, tokenizer).state_dict().items()}
    size = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    filled = 0
    for key in sorted(shapes):
        nbytes = shapes[key].numel() * size
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += nbytes
    gen = torch.Generator().manual_seed(seed)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards, strict=True):
        tensors = {k: torch.empty(shapes[k], dtype=dtype).normal_(0, 0.02, generator=gen) for k in keys}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    total = sum(s.numel() for s in shapes.values()) * size
    weight_map = {k: name for name, keys in zip(names, shards, strict=True) for k in keys}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
