"""Pre-checks of uploaded datasets and checkpoints (no torch; shared by API and worker).

The API runs them on a multipart POST before storing anything; the worker runs them again on presigned
uploads, then checks every record and decodes every image with `disp.datacheck` before the dataset
becomes `ready`. Datasets are read by `disp.formats`, the loader the CLI uses too.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from api.archive import (
    MAX_SAFETENSORS_HEADER,
    ArchiveError,
    check_weights_file,
    common_root,
    detect_format,
    list_entries,
    looks_like_pickle,
    read_member,
    refuse_pickle_name,
    safetensors_tensors,
)
from api.config import CommonSettings
from disp.formats import FormatError, read_tree
from disp.images import DataError, TarSource, ZipSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# disp.formats' codes that the API has always spelt otherwise
_API_CODES = {"missing_dataset_file": "missing_dataset_json", "ambiguous_dataset_file": "ambiguous_dataset_json"}


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


def problem_code(code: str | None, field: str | None, message: str) -> str:
    """The API error code of a dataset problem (`disp.formats.FormatError.code`, else by field)."""
    if "archive entry" in message and "refused" in message:
        return "unsafe_archive_entry"
    code = code or ("invalid_image" if field == "image" else "invalid_record")
    return _API_CODES.get(code, code)


def dataset_error(exc: DataError) -> ArchiveError:
    """A dataset the loader refused, as the API's error."""
    return ArchiveError(problem_code(getattr(exc, "code", None), exc.field, str(exc)), str(exc))


def named_copy(path: Path, filename: str, fmt: str) -> Path:
    """Rename an upload so that messages name the client's file and its suffix tells its format."""
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(filename.replace("\\", "/")).name)[:200]
    suffix = ".zip" if fmt == "zip" else ".tar"
    if not base.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        base = (base or "dataset") + suffix
    return path.rename(path.with_name(base))


def precheck_dataset(path: Path, settings: CommonSettings, filename: str = "dataset") -> DatasetSummary:
    """Archive readable, entries safe, a dataset file (any format `disp.formats` reads) with records."""
    fmt = detect_format(path)
    if fmt not in ("zip", "tar"):
        raise ArchiveError(
            "invalid_archive", "a dataset is a .zip or .tar(.gz) of a data file (JSON, JSONL, parquet, ...) and its images"
        )
    entries = list_entries(path, fmt, max_total_bytes=settings.max_expanded_bytes)
    try:
        tree = (ZipSource if fmt == "zip" else TarSource)(path)
        tree.name = Path(filename).name or "dataset"
        data = read_tree(tree)
    except DataError as exc:
        raise dataset_error(exc) from None
    count = len(data.rows)
    if not count:
        raise dataset_error(FormatError(f"{data.name}: the dataset has no records", code="empty_dataset"))
    if count > settings.max_records:
        raise ArchiveError("too_many_records", f"{count} records, above the limit of {settings.max_records}")
    return DatasetSummary(fmt, data.name, count, len(entries))


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
