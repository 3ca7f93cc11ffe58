"""Pre-checks of uploaded datasets and checkpoints (no torch; shared by API and worker).

The API runs them on a multipart POST before storing anything; the worker runs them again on presigned
uploads, then checks every record and decodes every image with `disp.datacheck` (datasets; read by
`disp.formats`, the loader the CLI uses too) or compares every tensor's shape with the model its config
describes (checkpoints) before the upload becomes `ready`. Archive limits are checked from the headers
before any entry is inflated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from api.archive import (
    ArchiveError,
    Limits,
    common_root,
    list_entries,
    read_member,
    refuse_pickle_name,
    too_large,
)
from api.config import CommonSettings
from api.weights import detect_format, looks_like_pickle, read_head, safetensors_heads, safetensors_shapes
from disp.formats import FormatError, read_tree
from disp.images import DataError, TarSource, ZipSource
from disp.names import check_plain_name

TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# disp.formats' codes that the API has always spelt otherwise
_API_CODES = {
    "missing_dataset_file": "missing_dataset_json",
    "ambiguous_dataset_file": "ambiguous_dataset_json",
}


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
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(filename.replace("\\", "/")).name)[
        :200
    ]
    suffix = ".zip" if fmt == "zip" else ".tar"
    if not base.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        base = (base or "dataset") + suffix
    return path.rename(path.with_name(base))


def precheck_dataset(path: Path, settings: CommonSettings, filename: str = "dataset") -> DatasetSummary:
    """Archive readable, entries safe and within the limits (checked from the headers, before anything is
    inflated), a dataset file (any format `disp.formats` reads, at most `max_dataset_json_bytes`) with
    records."""
    fmt = detect_format(path)
    if fmt not in ("zip", "tar"):
        raise ArchiveError(
            "invalid_archive",
            "a dataset is a .zip or .tar(.gz) of a data file (JSON, JSONL, parquet, ...) and its images",
        )
    entries = list_entries(
        path, fmt, max_total_bytes=settings.max_expanded_bytes, limits=dataset_limits(settings)
    )
    try:
        tree = (ZipSource if fmt == "zip" else TarSource)(path)
        tree.name = Path(filename).name or "dataset"
        data = read_tree(tree, settings.max_dataset_json_bytes)
    except DataError as exc:
        if getattr(exc, "code", None) == "too_large":  # the data file is read whole: its own cap
            raise ArchiveError("dataset_json_too_large", f"{exc} (max_dataset_json_bytes)") from None
        raise dataset_error(exc) from None
    count = len(data.rows)
    if not count:
        raise dataset_error(FormatError(f"{data.name}: the dataset has no records", code="empty_dataset"))
    if count > settings.max_records:
        raise too_large("too_many_records", f"{count} records", settings.max_records, "max_records")
    return DatasetSummary(fmt, data.name, count, len(entries))


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
    if kind == "projector":
        if fmt != "safetensors":
            raise ArchiveError(
                "invalid_safetensors", f"{filename}: a projector checkpoint is one .safetensors file"
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
