"""Checkpoint files: safetensors only, single or sharded, with key checks that name what is wrong.

Pickle formats (`.bin`, `.pt`, `.pth`, `.pkl`, ...) are refused by name before any byte is read:
unpickling an uploaded file can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from disp.constants import PICKLE_SUFFIXES
from disp.names import check_plain_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, or does not match the model."""


def refuse_pickle(path: Path) -> None:
    """Raise if `path` names a pickle-format weight file. Never opens it."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused and never opened, "
            "because loading one can run code; convert it to safetensors"
        )


def _read_file(path: Path, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            wanted = list(f.keys()) if keys is None else list(keys)
            return {k: f.get_tensor(k) for k in wanted}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError on corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc


def _own_file(directory: Path, name: str) -> Path:
    """`directory / name` after checking that it stays there: a plain name (no folder, no `..`, not absolute)
    and, if it is a link, one to a file inside the same directory. An index naming another checkpoint's
    shards (`../<other>/model-00001.safetensors`) must never read them."""
    try:
        check_plain_name(name)
    except ValueError as exc:
        raise CheckpointError(f"{INDEX_FILE}: a shard name {exc}") from None
    file = directory / name
    if os.path.islink(file):
        root = os.path.realpath(directory)
        if os.path.commonpath([os.path.realpath(file), root]) != root:
            raise CheckpointError(
                f"{name}: a link to a file outside the checkpoint directory; a checkpoint is read only from its "
                "own directory (copy the files instead of linking them)"
            )
    return file


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: a `.safetensors` file, or a directory (sharded with an index or single).

    Every file a directory names must lie in it (see `_own_file`). A directory that holds only pickle weight
    files is refused, naming them.
    """
    path = Path(path)
    if path.is_file():
        return _read_file(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    index = _own_file(path, INDEX_FILE)
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            by_shard: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(key)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{INDEX_FILE}: malformed index ({exc})") from exc
        files = {shard: _own_file(path, shard) for shard in by_shard}
        missing = sorted(s for s, f in files.items() if not f.is_file())
        if missing:
            raise CheckpointError(f"{path.name}: shards named in {INDEX_FILE} are missing: {missing}")
        state: dict[str, torch.Tensor] = {}
        for shard, keys in sorted(by_shard.items()):
            state.update(_read_file(files[shard], keys))
        return state
    single = _own_file(path, SINGLE_FILE)
    if single.is_file():
        return _read_file(single)
    shards = [_own_file(path, p.name) for p in sorted(path.glob("*.safetensors"))]
    if shards:
        state = {}
        for shard in shards:
            state.update(_read_file(shard))
        return state
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weight files found ({pickles}); they are refused and never opened, "
            "convert them to safetensors"
        )
    raise CheckpointError(f"{path}: no safetensors weights found")


def write_state_dict(state: dict[str, torch.Tensor], out_dir: str | Path, *, max_shard_bytes: int = 0) -> list[Path]:
    """Write `state` as `model.safetensors`, or as shards + index when `max_shard_bytes` > 0 splits it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return [out_dir / SINGLE_FILE]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [out_dir / n for n in names]


def shape_mismatch(expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], *,
                   ignore: Iterable[str] = (), strict: bool = True) -> str | None:
    """What keeps checkpoint tensors `given` (name -> shape) from loading into a model whose state has
    `expected` shapes: missing, unexpected and wrong-shape keys, by name; None when they fit.

    `ignore` holds regular expressions for checkpoint keys the model deliberately does not use.
    With strict=False only keys present in `given` are checked (a projector overlay).
    """
    patterns = [re.compile(p) for p in ignore]
    unexpected = sorted(k for k in given if k not in expected and not any(p.fullmatch(k) for p in patterns))
    missing = sorted(k for k in expected if k not in given) if strict else []
    bad_shape = sorted(
        f"{k}: checkpoint {tuple(given[k])} vs model {tuple(expected[k])}"
        for k in given
        if k in expected and tuple(given[k]) != tuple(expected[k])
    )
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if bad_shape:
        parts.append(f"shape mismatches ({len(bad_shape)}): {_short(bad_shape)}")
    return "; ".join(parts) or None


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, ignore: Iterable[str] = (), strict: bool = True) -> None:
    """Copy `state` into `module`, listing missing and unexpected keys by name on mismatch (`shape_mismatch`)."""
    expected = module.state_dict()
    problem = shape_mismatch({k: tuple(v.shape) for k, v in expected.items()},
                             {k: tuple(v.shape) for k, v in state.items()}, ignore=ignore, strict=strict)
    if problem:
        raise CheckpointError("checkpoint does not match the model: " + problem)
    with torch.no_grad():
        for k, v in state.items():
            if k in expected:
                expected[k].copy_(v.to(expected[k].dtype))


def _short(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
