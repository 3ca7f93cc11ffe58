"""Benchmark workloads: the SHAPES-base-shaped CPU model and data, and LLaDA-V's 8B shape for a GPU."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from disp import models, shapes
from disp.attacks import TriggerConfig, poison_dataset
from disp.config import PAPER_MASK_RATIO, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.constants import DEFAULT_SYSTEM_PROMPT
from disp.data import ImageSource, Sample, parse_samples
from disp.models.base import MDLM
from disp.models.tiny import LLADA_V_ANYRES, TINY_LM, TINY_VISION, write_tiny_checkpoint
from disp.pipeline import VisionCache, finetune_samples, load_dataset

# The CPU workload: the first shapes-base recipe's architecture (LM 128, SigLIP 96; the committed base is 192/128,
# docs/reproduction.md), random weights. Kept so that the figures in docs/performance.md stay comparable.
SHAPES_BASE_LM = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
SHAPES_BASE_VISION = {
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 48,
    "patch_size": 8,
}
# LLaDA-V's language model (config.json of GSAI-ML/LLaDA-V) and its SigLIP so400m-patch14-384 tower.
LLADA_V_8B_LM = {
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 16384,
}
LLADA_V_VOCAB = 126464
SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}


# -- workloads ----------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    model: MDLM
    samples: list[Sample]
    source: ImageSource
    saliency: SaliencyConfig
    purify: PurifyConfig
    finetune: FinetuneConfig
    reference_samples: int  # the reference runs on the first this many samples
    description: dict[str, Any] = field(default_factory=dict)


def purified_samples(records: list[dict]) -> list[Sample]:
    """The purified records a product side wrote, as the samples its recovery trains on."""
    return parse_samples([{k: r[k] for k in ("id", "image", "conversations")} for r in records], "purified")


def finetune_purified(w: Workload, train: list[Sample], tmp: Path, cache: VisionCache) -> dict:
    """The product's recovery of `w.model` on `train`, in a fresh run folder under `tmp`; its metrics."""
    run = uuid.uuid4().hex
    return finetune_samples(w.model, train, w.source, w.finetune, tmp / f"ft-{run[:8]}", run_key=run, cache=cache)


def write_shapes_data(
    root: Path, n: int, image_size: int = 48, seed: int = 0, config: shapes.ShapesConfig | None = None
) -> tuple[list[Sample], ImageSource]:
    """n SHAPES training samples, 20% poisoned (insertion, corner trigger), as a dataset folder (scenes of
    `config`, default: the default scenes at `image_size`)."""
    paths = shapes.write_dataset(
        root / "shapes", config or shapes.ShapesConfig(image_size=image_size), sizes={"train": n}, seed=seed
    )
    samples, source = load_dataset(paths["train"], root / "shapes")
    res = poison_dataset(
        samples,
        source,
        target="insertion",
        trigger=TriggerConfig(kind="corner"),
        ratio=0.2,
        seed=seed,
        out_dir=root / "poisoned",
    )
    return load_dataset(res.data_path, res.data_path.parent)


def write_benchmark_checkpoint(out: Path, lm: dict | None = None, vision: dict | None = None) -> Path:
    """A random-weight LLaDA-V checkpoint with a BPE tokenizer trained on SHAPES text and the system prompt."""

    corpus = shapes.corpus(shapes.ShapesConfig(), 300) + [DEFAULT_SYSTEM_PROMPT]
    return write_tiny_checkpoint(
        out, corpus=corpus, tokenizer_vocab=640, lm=lm or SHAPES_BASE_LM, vision=vision or SHAPES_BASE_VISION
    )


def _shapes_workload(name: str, model: MDLM, data: tuple[list[Sample], ImageSource], n: int, epochs: int,
                     gen_length: int, description: dict[str, Any]) -> Workload:
    """A SHAPES workload: the paper's sampler over `gen_length` tokens in one block, the Fisher saliency (what
    the reference computes), `epochs` of recovery."""
    sampler = SamplerConfig(gen_length=gen_length, block_length=gen_length, steps=gen_length)
    return Workload(name=name, model=model, samples=data[0], source=data[1], saliency=SaliencyConfig(method="fisher"),
                    purify=PurifyConfig(mask_ratio=PAPER_MASK_RATIO, sampler=sampler), finetune=FinetuneConfig(epochs=epochs), reference_samples=n,
                    description={**description, "vocab_size": model.lm_config.vocab_size,
                                 "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")})


def cpu_workload(
    root: Path, n: int, epochs: int, device: str = "cpu", size: str = "shapes-base", gen_length: int = 32
) -> Workload:
    """The main workload; `size` "tiny" takes `write_tiny_checkpoint`'s test shapes (for the tests), "trained"
    the shipped SHAPES base (`disp.cell.BASE_CHECKPOINT`, trained weights) on scenes of its own settings."""
    if size == "trained":
        return trained_workload(root, n, epochs, device=device, gen_length=gen_length)
    lm, vision = (SHAPES_BASE_LM, SHAPES_BASE_VISION) if size == "shapes-base" else (TINY_LM, TINY_VISION)
    model = models.load(write_benchmark_checkpoint(root / "model", lm, vision), device=device)
    return _shapes_workload(f"{size} architecture (random weights)", model, write_shapes_data(root / "data", n), n,
                            epochs, gen_length,
                            {"checkpoint": f"write_tiny_checkpoint(lm={size.upper().replace('-', '_')}_LM, ...)",
                             "lm": lm, "vision": vision})


def trained_workload(root: Path, n: int, epochs: int, device: str = "cpu", gen_length: int = 32) -> Workload:
    """The shipped SHAPES base (trained: its first denoising step is confident, as a real model's is, which
    the random-weight workload's is not) on n scenes of its own settings, 20% poisoned as above; the sampler,
    saliency and fine-tuning settings of the random-weight workload."""
    from disp.cell import BASE_CHECKPOINT

    model = models.load(BASE_CHECKPOINT, device=device)
    data = write_shapes_data(root / "data", n, config=shapes.config_of_checkpoint(BASE_CHECKPOINT))
    return _shapes_workload("the shipped SHAPES base (trained weights)", model, data, n, epochs, gen_length,
                            {"checkpoint": "disp/assets/shapes-base",
                             "lm": {k: getattr(model.lm_config, k) for k in SHAPES_BASE_LM},
                             "vision": json.loads((BASE_CHECKPOINT / "config.json").read_text()).get("vision_config")})


def build_llada_v_8b_shape(
    tokenizer_dir: Path,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    lm: dict | None = None,
    vision: dict | None = None,
    vocab_size: int = LLADA_V_VOCAB,
    seed: int = 0,
    image: dict | None = None,
) -> MDLM:
    """LLaDA-V's architecture with random weights, built directly on `device` in `dtype` (no checkpoint).

    `lm` / `vision` override the shapes (tests build a small one on the CPU through the same code); `image`
    the image fields (`LLADA_V_ANYRES`: LLaDA-V's published anyres_max_4 with image_newline).
    """
    from disp.models.llada_lm import init_weights
    from disp.models.llada_v import LLaDAV
    from disp.models.tiny import tiny_config
    from disp.tokenizer import ChatTokenizer

    config = tiny_config(
        "llada-v", vocab_size, {**LLADA_V_8B_LM, **(lm or {})}, {**SIGLIP_SO400M, **(vision or {})}, image
    )
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tokenizer = ChatTokenizer.from_dir(tokenizer_dir)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = LLaDAV(config, tokenizer)
            init_weights(model)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def gpu_8b_workload(
    root: Path,
    n: int,
    reference_n: int,
    epochs: int,
    device: str = "cuda",
    lm: dict | None = None,
    vision: dict | None = None,
    anyres: bool = False,
) -> Workload:
    """LLaDA-V's 8B shape on SHAPES data. `anyres`: LLaDA-V's published anyres_max_4 layout on 768 px images
    (2x2 crops: 729 + 54 * 55 = 3699 visual tokens, prompts of ~3.8k tokens), with the batches that fit an 80 GB
    GPU by `python -m experiments.benchmarks.memory_8b` (docs/performance.md)."""
    tok_dir = write_benchmark_checkpoint(root / "tokenizer-source")
    image = LLADA_V_ANYRES if anyres else None
    model = build_llada_v_8b_shape(tok_dir, device=device, lm=lm, vision=vision, image=image)
    # SHAPES sides are multiples of 3; any side in (S, 2S] fills a 2x2 grid of S-pixel crops
    side = 2 * model.layout.image_size - (2 * model.layout.image_size) % 3 if anyres else 48
    samples, source = write_shapes_data(root / "data8b", n, image_size=side)
    sampler = SamplerConfig(gen_length=32, block_length=32, steps=32)
    lm_shape = {**LLADA_V_8B_LM, **(lm or {})}
    if anyres:
        # ~16 GiB of activations per 3.8k-token sample for a backward: 3 fit next to the 15.7 GiB of weights
        saliency, purify = SaliencyConfig(method="fisher", batch_size=3), PurifyConfig(mask_ratio=PAPER_MASK_RATIO, sampler=sampler, batch_size=8)
        finetune = FinetuneConfig(epochs=epochs, batch_size=3, grad_accum=3)
    else:
        saliency, purify = SaliencyConfig(method="fisher", batch_size=8), PurifyConfig(mask_ratio=PAPER_MASK_RATIO, sampler=sampler, batch_size=8)
        # fine-tuning in micro-batches of 4 (x2 accumulation): the logits of 8 x ~830 tokens x 126k in float32
        # for the loss would add ~10 GB to the ~60 GB that a batch of 8 already holds
        finetune = FinetuneConfig(epochs=epochs, batch_size=4, grad_accum=2)
    return Workload(
        name="LLaDA-V 8B shape (random bf16 weights)" + (", anyres_max_4 on 768 px images" if anyres else ""),
        model=model,
        samples=samples,
        source=source,
        saliency=saliency,
        purify=purify,
        finetune=finetune,
        reference_samples=min(reference_n, n),
        description={
            "lm": lm_shape,
            "vision": {**SIGLIP_SO400M, **(vision or {})},
            "image": image or {"image_aspect_ratio": "square"},
            "vocab_size": LLADA_V_VOCAB,
            "dtype": "bfloat16",
            "lm_params": sum(p.numel() for n_, p in model.named_parameters() if "vision_tower" not in n_),
        },
    )
