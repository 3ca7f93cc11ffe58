"""Pre-checks of uploaded datasets and checkpoints (stdlib only, shared by API and worker).

The API runs them on a multipart POST before storing anything; the worker runs them again on presigned
uploads, then decodes every image with `disp.data` (datasets) or compares every tensor's shape with the
model its config describes (checkpoints) before the upload becomes `ready`. Every read is bounded: archive
headers are checked before any entry is inflated, and the records file is parsed as a stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from api.archive import (
    ArchiveError,
    Entry,
    Limits,
    common_root,
    count_records,
    find_dataset_json,
    list_entries,
    open_member,
    read_member,
    refuse_pickle_name,
    too_large,
)
from api.config import CommonSettings
from api.weights import detect_format, looks_like_pickle, read_head, safetensors_heads, safetensors_shapes
from disp.names import check_plain_name

TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class DatasetSummary:
    archive_format: str
    json_name: str
    num_records: int
    num_files: int


@dataclass(frozen=True)
class CheckpointSummary:
    archive_format: str
    num_tensors: int
    shapes: dict[str, tuple[int, ...]]  # every tensor the checkpoint loads, by name
    root: str  # the folder inside the archive that holds config.json ('' at the top)


def dataset_limits(settings: CommonSettings) -> Limits:
    return Limits(
        settings.max_expanded_bytes,
        max_entries=settings.max_archive_entries,
        max_member_bytes=settings.max_member_bytes,
        max_ratio=settings.max_compression_ratio,
    )


def checkpoint_limits(settings: CommonSettings) -> Limits:
    return Limits(settings.max_expanded_bytes, max_entries=settings.max_archive_entries)


def dataset_entries(path: Path, settings: CommonSettings) -> tuple[str, list[Entry], str]:
    """(format, entries, records file name) of a dataset archive, every limit checked from the headers."""
    fmt = detect_format(path)
    if fmt not in ("zip", "tar"):
        raise ArchiveError(
            "invalid_archive", "a dataset is a .zip or .tar(.gz) of a LLaVA JSON and its images"
        )
    entries = list_entries(
        path, fmt, max_total_bytes=settings.max_expanded_bytes, limits=dataset_limits(settings)
    )
    json_name = find_dataset_json(entries)
    size = next(e.size for e in entries if e.name == json_name)
    if size > settings.max_dataset_json_bytes:
        raise too_large(
            "dataset_json_too_large",
            f"{json_name} is {size} bytes",
            settings.max_dataset_json_bytes,
            "max_dataset_json_bytes",
        )
    return fmt, entries, json_name


def precheck_dataset(path: Path, settings: CommonSettings) -> DatasetSummary:
    """Archive readable, entries safe and within the limits, LLaVA JSON present, and its records streamed
    once: a non-empty list of objects within the limits (the worker checks each record fully)."""
    fmt, entries, json_name = dataset_entries(path, settings)
    with open_member(
        path, fmt, json_name, limit=settings.max_dataset_json_bytes, setting="max_dataset_json_bytes"
    ) as stream:
        records = count_records(
            stream, json_name, max_record_bytes=settings.max_record_bytes, max_records=settings.max_records
        )
    return DatasetSummary(fmt, json_name, records, len(entries))


def precheck_checkpoint(path: Path, filename: str, kind: str, settings: CommonSettings) -> CheckpointSummary:
    """Safetensors only: a pickle is refused by name before any byte is read, then by content. A full
    checkpoint needs config.json, tokenizer.json and its weights at one top level; every shard its index
    names is a plain name present beside it and holds the tensors the index puts there."""
    refuse_pickle_name(filename)
    with open(path, "rb") as fh:
        head = fh.read(16)
    if looks_like_pickle(head):
        raise ArchiveError("pickle_refused", f"{filename}: the file is a pickle; it was refused unopened")
    fmt = detect_format(path)
    if kind == "adapter":
        if fmt != "safetensors":
            raise ArchiveError(
                "invalid_safetensors", f"{filename}: an adapter is one projector .safetensors file"
            )
        try:
            shapes = safetensors_shapes(read_head(path), path.stat().st_size)
        except ArchiveError as exc:
            raise ArchiveError(exc.code, f"{filename}: {exc}") from None
        return CheckpointSummary("safetensors", len(shapes), shapes, "")
    if fmt not in ("zip", "tar"):
        raise ArchiveError(
            "invalid_archive", f"{filename}: a full checkpoint is a .zip or .tar of the checkpoint directory"
        )
    entries = list_entries(
        path, fmt, max_total_bytes=settings.max_expanded_bytes, limits=checkpoint_limits(settings)
    )
    for entry in entries:
        refuse_pickle_name(entry.name)
    root = common_root(entries)
    sizes = {e.name[len(root) :]: e.size for e in entries}
    if "config.json" not in sizes:
        raise ArchiveError("invalid_checkpoint", f"{filename}: no config.json at the checkpoint's top level")
    config = _json_member(path, fmt, root + "config.json", settings)
    if not isinstance(config, dict):
        raise ArchiveError("invalid_checkpoint", "config.json must hold a JSON object")
    if TOKENIZER_FILE not in sizes:
        raise ArchiveError(
            "invalid_checkpoint",
            f"{filename}: no {TOKENIZER_FILE} at the checkpoint's top level (it must ship its tokenizer)",
        )
    if sizes[TOKENIZER_FILE] > settings.max_tokenizer_bytes:
        raise too_large(
            "member_too_large",
            f"{TOKENIZER_FILE} is {sizes[TOKENIZER_FILE]} bytes",
            settings.max_tokenizer_bytes,
            "max_tokenizer_bytes",
        )
    shards = _weight_files(path, fmt, root, sizes, settings)
    heads = safetensors_heads(path, fmt, {root + shard for shard in shards})
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for shard, wanted in shards.items():
        try:
            found = safetensors_shapes(heads[root + shard], sizes[shard])
        except ArchiveError as exc:
            raise ArchiveError(exc.code, f"{shard}: {exc}") from None
        if wanted is not None:
            missing = sorted(set(wanted) - set(found))
            if missing:
                raise ArchiveError(
                    "invalid_checkpoint",
                    f"{INDEX_FILE} puts {len(missing)} tensor(s) in {shard} that it does "
                    f"not hold: {', '.join(missing[:5])}",
                )
            found = {k: found[k] for k in wanted}
        for key, shape in found.items():
            if key in where:
                raise ArchiveError(
                    "invalid_checkpoint", f"tensor {key!r} is in both {where[key]} and {shard}"
                )
            where[key], shapes[key] = shard, shape
    return CheckpointSummary(fmt, len(shapes), shapes, root)


def _json_member(path: Path, fmt: str, name: str, settings: CommonSettings):
    data = read_member(
        path, fmt, name, limit=settings.max_checkpoint_json_bytes, setting="max_checkpoint_json_bytes"
    )
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArchiveError(
            "invalid_checkpoint", f"{PurePosixPath(name).name} is not valid JSON: {exc}"
        ) from None


def _weight_files(
    path: Path, fmt: str, root: str, sizes: dict[str, int], settings: CommonSettings
) -> dict[str, list[str] | None]:
    """Shard file name -> the tensors the index puts in it (None: all it holds), as the loader reads them:
    the index if there is one, else model.safetensors, else every top-level .safetensors file."""
    if INDEX_FILE in sizes:
        index = _json_member(path, fmt, root + INDEX_FILE, settings)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ArchiveError("invalid_checkpoint", f"{INDEX_FILE} has no weight_map object")
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            try:
                check_plain_name(shard)
            except ValueError as exc:
                raise ArchiveError(
                    "unsafe_checkpoint_index", f"{INDEX_FILE}: the shard of tensor {key!r} {exc}"
                ) from None
            shards.setdefault(shard, []).append(key)
        missing = sorted(s for s in shards if s not in sizes)
        if missing:
            raise ArchiveError(
                "invalid_checkpoint", f"shard(s) named in {INDEX_FILE} are missing: {', '.join(missing[:5])}"
            )
        bad = sorted(s for s in shards if not s.endswith(".safetensors"))
        if bad:
            raise ArchiveError("invalid_safetensors", f"{INDEX_FILE} names non-safetensors shards: {bad[:5]}")
        return dict(shards)
    if SINGLE_FILE in sizes:
        return {SINGLE_FILE: None}
    top = sorted(n for n in sizes if "/" not in n and n.endswith(".safetensors"))
    if not top:
        raise ArchiveError("invalid_checkpoint", "no .safetensors weights at the checkpoint's top level")
    return dict.fromkeys(top)
