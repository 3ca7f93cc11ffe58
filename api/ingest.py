"""Pre-checks of uploaded datasets and checkpoints (stdlib only, shared by API and worker).

The API runs them on a multipart POST before storing anything; the worker runs them again on presigned
uploads, then decodes every image with `disp.data` before the dataset becomes `ready`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from api.archive import (
    MAX_SAFETENSORS_HEADER,
    ArchiveError,
    check_dataset_json,
    check_weights_file,
    common_root,
    detect_format,
    find_dataset_json,
    list_entries,
    looks_like_pickle,
    read_member,
    refuse_pickle_name,
    safetensors_tensors,
)
from api.config import CommonSettings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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


def precheck_dataset(path: Path, settings: CommonSettings) -> DatasetSummary:
    """Archive readable, entries safe, LLaVA JSON present and a non-empty list within limits."""
    fmt = detect_format(path)
    if fmt not in ("zip", "tar"):
        raise ArchiveError(
            "invalid_archive", "a dataset is a .zip or .tar(.gz) of a LLaVA JSON and its images"
        )
    entries = list_entries(path, fmt, max_total_bytes=settings.max_expanded_bytes)
    json_name = find_dataset_json(entries)
    size = next(e.size for e in entries if e.name == json_name)
    data = read_member(path, fmt, json_name, limit=size + 1)
    count = check_dataset_json(data, json_name)
    if count > settings.max_records:
        raise ArchiveError("too_many_records", f"{count} records, above the limit of {settings.max_records}")
    return DatasetSummary(fmt, json_name, count, len(entries))


def precheck_checkpoint(path: Path, filename: str, kind: str) -> CheckpointSummary:
    """Safetensors only: a pickle is refused by name before any byte is read, then by content."""
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
        names = check_weights_file(
            path, filename if filename.endswith(".safetensors") else "adapter.safetensors"
        )
        return CheckpointSummary("safetensors", len(names))
    if fmt not in ("zip", "tar"):
        raise ArchiveError(
            "invalid_archive", f"{filename}: a full checkpoint is a .zip or .tar of the checkpoint directory"
        )
    entries = list_entries(path, fmt, max_total_bytes=1 << 50)
    for entry in entries:
        refuse_pickle_name(entry.name)
    root = common_root(entries)
    names = {e.name[len(root) :] for e in entries}
    if "config.json" not in names:
        raise ArchiveError("invalid_checkpoint", f"{filename}: no config.json at the checkpoint's top level")
    try:
        json.loads(read_member(path, fmt, root + "config.json", limit=10 * 1024**2))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError("invalid_checkpoint", f"{filename}: config.json is not JSON: {exc}") from exc
    if not any(t in names for t in TOKENIZER_FILES):
        raise ArchiveError(
            "invalid_checkpoint", f"{filename}: no tokenizer files ({', '.join(TOKENIZER_FILES)})"
        )
    weights = [e for e in entries if PurePosixPath(e.name).suffix == ".safetensors"]
    if not weights:
        raise ArchiveError("invalid_checkpoint", f"{filename}: no .safetensors weights")
    tensors = 0
    for entry in weights:
        first = read_member(path, fmt, entry.name, limit=8)
        n = struct.unpack("<Q", first)[0] if len(first) == 8 and not looks_like_pickle(first) else 0
        head = read_member(path, fmt, entry.name, limit=8 + min(n, MAX_SAFETENSORS_HEADER))
        try:
            tensors += len(safetensors_tensors(head, entry.size))
        except ArchiveError as exc:
            raise ArchiveError(exc.code, f"{entry.name}: {exc}") from None
    return CheckpointSummary(fmt, tensors)
