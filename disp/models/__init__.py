"""Model families behind one interface (`MDLM`), and `load(path)` that picks the family from config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from disp.models.base import MDLM, PromptBatch
from disp.models.checkpoint import CheckpointError, read_state_dict, refuse_pickle
from disp.models.lavida import LaViDa
from disp.models.llada_v import LLaDAV, read_config

FAMILIES: dict[str, type[MDLM]] = {"llada-v": LLaDAV, "lavida": LaViDa}


def detect_family(config: dict[str, Any]) -> str:
    """Family of a checkpoint from its config.json.

    LLaDA-V and LaViDa both call themselves `llava_llada`; they differ in architecture name and in
    the language-model fields (Llama-style `hidden_size` vs OLMo-style `d_model`).
    """
    explicit = config.get("disp_family")
    if explicit:
        if explicit not in FAMILIES:
            raise CheckpointError(f"config.json: unknown disp_family {explicit!r}; known: {sorted(FAMILIES)}")
        return explicit
    arch = " ".join(config.get("architectures") or [])
    if "ForMaskedDiffusion" in arch or "d_model" in config:
        return "lavida"
    if "LLaDA" in arch or config.get("model_type") in ("llava_llada", "llada") and "hidden_size" in config:
        return "llada-v"
    raise CheckpointError(
        f"config.json: cannot tell the model family (architectures {config.get('architectures')!r}, "
        f"model_type {config.get('model_type')!r})"
    )


def check(path: str | Path, shapes: dict[str, tuple[int, ...]], *, projector_only: bool = False) -> str:
    """Check a checkpoint without loading its weights; return its family.

    `path` holds config.json and the tokenizer files; `shapes` maps each tensor the weights hold to its shape
    (read from the safetensors headers). The family must be known, the tokenizer must load, and the tensors
    must be exactly those the model described by config.json loads (with `projector_only`: a projector
    overlay, `model.mm_projector.*` tensors of the right shapes, and `model.image_newline` if the model has
    one). Image fields the model cannot build from (anyres pinpoints, merge type) are named. CheckpointError
    says what is wrong.
    """
    from disp.constants import IMAGE_NEWLINE_KEY, PROJECTOR_PREFIX
    from disp.tokenizer import TokenizerError

    path = Path(path)
    config = read_config(path)
    family = detect_family(config)
    if family not in FAMILIES:
        raise CheckpointError(f"model family {family!r} is not available; known: {sorted(FAMILIES)}")
    if projector_only:
        foreign = sorted(k for k in shapes if not k.startswith(PROJECTOR_PREFIX) and k != IMAGE_NEWLINE_KEY)
        if foreign or not any(k.startswith(PROJECTOR_PREFIX) for k in shapes):
            raise CheckpointError(f"an adapter holds only {PROJECTOR_PREFIX}* tensors (and {IMAGE_NEWLINE_KEY}); "
                                  f"found {foreign[:5] or 'none'}")
    try:
        FAMILIES[family].check_dir(path, config, shapes, projector_only=projector_only)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    return family


def resolve_device(device: str | torch.device | None) -> str | torch.device:
    """None or "auto" → "cuda" when a GPU is visible, else "cpu"; anything else as given, once checked:
    ValueError naming the device when torch does not know it or this machine does not have it."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"with CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"built {build}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here; use cpu")
    return device


def load(path: str | Path, *, projector: str | Path | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None) -> MDLM:
    """Load a checkpoint directory; optionally lay a projector-only safetensors file over it.

    The model is built on the meta device and its weights are read straight into place, in the checkpoint's
    dtype unless `dtype` is given (an 8B bf16 checkpoint needs about its own size in memory, not 2x in
    float32); on a CPU, float16 weights (the SHAPES bases) are read into float32.
    """
    path = Path(path)
    if device is not None:
        resolve_device(device)
    refuse_pickle(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory with config.json, tokenizer and safetensors")
    config = read_config(path)
    family = detect_family(config)
    if family not in FAMILIES:
        raise CheckpointError(f"model family {family!r} is not available; known: {sorted(FAMILIES)}")
    model = FAMILIES[family].from_dir(path, config, dtype=dtype, device=device)
    if projector is not None:
        model.load_projector_state_dict(read_state_dict(Path(projector)))
    return model


__all__ = ["MDLM", "PromptBatch", "CheckpointError", "FAMILIES", "check", "detect_family", "load"]
