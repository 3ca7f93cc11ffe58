"""Stdlib-only inspection of uploaded archives and weight files: safe entry names, pickle and
safetensors detection, and a safe extractor. Nothing here unpickles or decodes untrusted data."""

from __future__ import annotations

import json
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from disp.constants import PICKLE_SUFFIXES

MAX_ENTRIES = 2_000_000
MAX_SAFETENSORS_HEADER = 8 * 1024 * 1024  # ~80k tensors; the format allows 100 MB, parsing that costs ~1 GB
RATIO_FLOOR = 1024 * 1024  # the compression-ratio check ignores entries (and archives) smaller than this
READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error)
DATASET_JSON_NAMES = ("data.json", "dataset.json", "train.json")


class ArchiveError(ValueError):
    """An upload is refused; `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Entry:
    name: str  # normalised relative path
    size: int


@dataclass(frozen=True)
class Limits:
    """What an archive may expand to; each refusal names the limit and its setting."""

    max_total_bytes: int
    max_entries: int = MAX_ENTRIES
    max_member_bytes: int | None = None
    max_ratio: int | None = None  # expanded / compressed bytes (zip: per entry; tar.gz: the whole archive)


def too_large(code: str, what: str, limit: int, setting: str) -> ArchiveError:
    return ArchiveError(code, f"{what}, above the limit of {limit} ({setting})")


def detect_format(path: Path) -> str | None:
    """'zip', 'tar' (any compression) or 'safetensors' by content, else None."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    if safetensors_header_ok(read_head(path), path.stat().st_size):
        return "safetensors"
    return None


def looks_like_pickle(head: bytes) -> bool:
    """Pickle protocol 2+ opcode, or a torch zip holding a pickle."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _normalise(raw: str) -> str:
    name = raw.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} is an absolute path")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} escapes the archive folder")
    if not parts:
        raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} has an empty name")
    return "/".join(parts)


def _zip_members(path: Path) -> Iterator[tuple[str, int, int | None, bool, bool, bool]]:
    with zipfile.ZipFile(path) as zf:
        for i in zf.infolist():
            yield (
                i.filename,
                i.file_size,
                i.compress_size,
                i.is_dir(),
                stat.S_ISLNK(i.external_attr >> 16),
                False,
            )


def _tar_members(path: Path) -> Iterator[tuple[str, int, int | None, bool, bool, bool]]:
    with tarfile.open(path, "r:*") as tf:
        for m in tf:  # lazily: a refusal stops before the rest of a compressed stream is inflated
            special = not (m.isfile() or m.isdir() or m.issym() or m.islnk()) or m.issparse()
            yield m.name, m.size, None, m.isdir(), m.issym() or m.islnk(), special


def list_entries(path: Path, fmt: str, *, max_total_bytes: int, limits: Limits | None = None) -> list[Entry]:
    """Regular-file entries; links, devices, absolute or `..` names refuse the whole archive, and so does
    any entry, count, total or compression ratio above `limits` (checked from the headers, before any
    entry is inflated)."""
    limits = limits or Limits(max_total_bytes)
    entries: dict[str, Entry] = {}
    total, archive_bytes = 0, path.stat().st_size
    members = _zip_members(path) if fmt == "zip" else _tar_members(path)
    try:
        for raw, size, packed, is_dir, is_link, is_special in members:
            name = _normalise(raw)
            if is_link:
                raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} is a link")
            if is_special:
                raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} is not a regular file")
            if is_dir:
                continue
            if name in entries:
                raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} appears twice")
            _check_entry(name, size, packed, limits, len(entries))
            total += size
            if total > max_total_bytes:
                raise too_large(
                    "archive_too_large", "the archive expands beyond", max_total_bytes, "max_expanded_bytes"
                )
            ratio = limits.max_ratio
            if ratio and packed is None and total > max(RATIO_FLOOR, ratio * archive_bytes):
                raise too_large(
                    "compression_ratio_too_high",
                    f"the archive expands more than {ratio}x its {archive_bytes} bytes",
                    ratio,
                    "max_compression_ratio",
                )
            entries[name] = Entry(name, size)
    except READ_ERRORS as exc:
        raise ArchiveError("invalid_archive", f"cannot read the {fmt} archive: {exc}") from None
    return sorted(entries.values(), key=lambda e: e.name)


def _check_entry(name: str, size: int, packed: int | None, limits: Limits, count: int) -> None:
    if count >= limits.max_entries:
        raise too_large(
            "too_many_entries", "the archive holds more files", limits.max_entries, "max_archive_entries"
        )
    if limits.max_member_bytes is not None and size > limits.max_member_bytes:
        raise too_large(
            "member_too_large",
            f"archive entry {name!r} is {size} bytes",
            limits.max_member_bytes,
            "max_member_bytes",
        )
    ratio = limits.max_ratio
    if ratio and packed is not None and size > RATIO_FLOOR and size > ratio * max(packed, 1):
        raise too_large(
            "compression_ratio_too_high",
            f"archive entry {name!r} expands {size // max(packed, 1)}x",
            ratio,
            "max_compression_ratio",
        )


class _Bounded:
    """A member stream: read errors (bad CRC, truncated data) become ArchiveError, and so does a member
    longer than `limit` bytes."""

    def __init__(self, raw: BinaryIO, name: str, limit: int, setting: str) -> None:
        self.raw, self.name, self.limit, self.setting, self.seen = raw, name, limit, setting, 0

    def read(self, n: int = -1) -> bytes:
        want = self.limit + 1 - self.seen if n < 0 else min(n, self.limit + 1 - self.seen)
        try:
            data = self.raw.read(max(want, 0))
        except READ_ERRORS as exc:
            raise ArchiveError(
                "invalid_archive", f"{self.name}: cannot be read from the archive: {exc}"
            ) from None
        self.seen += len(data)
        if self.seen > self.limit:
            raise too_large("member_too_large", f"{self.name} is longer", self.limit, self.setting)
        return data


@contextmanager
def open_member(path: Path, fmt: str, name: str, *, limit: int, setting: str = "max_member_bytes"):
    """A binary stream of entry `name` (as listed by list_entries) that refuses to yield more than `limit`
    bytes; read it in chunks to keep memory bounded."""
    with ExitStack() as stack:
        try:
            raw = _find_member(stack, path, fmt, name)
        except READ_ERRORS as exc:
            raise ArchiveError("invalid_archive", f"cannot read the {fmt} archive: {exc}") from None
        yield _Bounded(raw, name, limit, setting)


def _find_member(stack: ExitStack, path: Path, fmt: str, name: str) -> BinaryIO:
    if fmt == "zip":
        zf = stack.enter_context(zipfile.ZipFile(path))
        for info in zf.infolist():
            if not info.is_dir() and _normalise(info.filename) == name:
                return stack.enter_context(zf.open(info))
    else:
        tf = stack.enter_context(tarfile.open(path, "r:*"))
        for member in tf:
            if member.isfile() and _normalise(member.name) == name:
                fh = tf.extractfile(member)
                assert fh is not None
                return stack.enter_context(fh)
    raise ArchiveError("invalid_archive", f"archive has no entry {name!r}")


def read_member(path: Path, fmt: str, name: str, *, limit: int, setting: str = "max_member_bytes") -> bytes:
    """All bytes of a small entry; ArchiveError (naming `setting`) when it is longer than `limit`."""
    with open_member(path, fmt, name, limit=limit, setting=setting) as fh:
        return fh.read()


def safetensors_heads(path: Path, fmt: str, names: set[str]) -> dict[str, bytes]:
    """The header bytes (8-byte length + JSON, at most MAX_SAFETENSORS_HEADER) of each named entry, in one
    pass over the archive (a compressed tar is inflated once, not once per shard)."""

    def head(fh) -> bytes:
        first = fh.read(8)
        if len(first) < 8 or looks_like_pickle(first):
            return first
        (n,) = struct.unpack("<Q", first)
        return first + (fh.read(n) if n <= MAX_SAFETENSORS_HEADER else b"")

    heads: dict[str, bytes] = {}
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and _normalise(info.filename) in names:
                        with zf.open(info) as fh:
                            heads[_normalise(info.filename)] = head(fh)
        else:
            with tarfile.open(path, "r:*") as tf:
                for member in tf:
                    if member.isfile() and _normalise(member.name) in names:
                        fh = tf.extractfile(member)
                        assert fh is not None
                        with fh:
                            heads[_normalise(member.name)] = head(fh)
    except READ_ERRORS as exc:
        raise ArchiveError("invalid_archive", f"cannot read the {fmt} archive: {exc}") from None
    return heads


def copy_member(path: Path, fmt: str, name: str, dest: Path, *, limit: int, setting: str) -> None:
    """Write an entry to `dest` in 1 MiB chunks."""
    with open_member(path, fmt, name, limit=limit, setting=setting) as fh, open(dest, "wb") as out:
        while chunk := fh.read(1024 * 1024):
            out.write(chunk)


def common_root(entries: list[Entry]) -> str:
    """The single top folder all entries share (archives of `folder/...`), or ''."""
    tops = {e.name.split("/", 1)[0] for e in entries if not e.name.startswith("__MACOSX")}
    nested = all("/" in e.name for e in entries if not e.name.startswith("__MACOSX"))
    return next(iter(tops)) + "/" if len(tops) == 1 and nested else ""


def find_dataset_json(entries: list[Entry]) -> str:
    """The LLaVA JSON of a dataset archive: the only top-level .json, or data/dataset/train.json."""
    root = common_root(entries)
    top = [e.name for e in entries if e.name.endswith(".json") and "/" not in e.name[len(root) :]]
    if len(top) == 1:
        return top[0]
    for want in DATASET_JSON_NAMES:
        if root + want in top:
            return root + want
    if not top:
        raise ArchiveError("missing_dataset_json", "the archive has no LLaVA .json file at its top level")
    raise ArchiveError(
        "ambiguous_dataset_json",
        f"several top-level .json files ({', '.join(top[:5])}); name one {DATASET_JSON_NAMES[0]}",
    )


def count_records(stream: BinaryIO, name: str, *, max_record_bytes: int, max_records: int) -> int:
    """Stream the records list once: a JSON list of objects, non-empty, within the limits. Full per-record
    checks run in the worker."""
    from api.jsonstream import JsonStreamError, iter_array

    count = 0
    try:
        for record in iter_array(stream, name=name, max_element_chars=max_record_bytes):
            if not isinstance(record, dict):
                raise ArchiveError(
                    "malformed_json", f"{name}: record {count} must be an object, got {type(record).__name__}"
                )
            count += 1
            if count > max_records:
                raise too_large("too_many_records", f"{name} holds more records", max_records, "max_records")
    except JsonStreamError as exc:
        raise ArchiveError(exc.code, str(exc)) from None
    if not count:
        raise ArchiveError("empty_dataset", f"{name}: the dataset has no records")
    return count


def refuse_pickle_name(name: str) -> None:
    if PurePosixPath(name).suffix.lower() in PICKLE_SUFFIXES:
        raise ArchiveError(
            "pickle_refused",
            f"{name}: pickle weight files ({', '.join(PICKLE_SUFFIXES)}) are refused unopened because "
            "loading one can run code; convert the checkpoint to safetensors",
        )


def safetensors_header_ok(head: bytes, size: int) -> bool:
    try:
        safetensors_tensors(head, size)
    except ArchiveError:
        return False
    return True


DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


def safetensors_tensors(head: bytes, size: int) -> list[str]:
    """Tensor names from the start of a safetensors file (8-byte length + JSON header), checked for bounds."""
    return list(safetensors_shapes(head, size))


def safetensors_shapes(head: bytes, size: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; every tensor's dtype, shape and byte range must agree
    and lie inside the file."""
    if looks_like_pickle(head):
        raise ArchiveError("pickle_refused", "the file is a pickle, not safetensors; it was not opened")
    if len(head) < 8:
        raise ArchiveError("invalid_safetensors", "file too short for a safetensors header")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_SAFETENSORS_HEADER or n + 8 > size:
        raise ArchiveError(
            "invalid_safetensors",
            f"safetensors header length {n} out of bounds (at most {MAX_SAFETENSORS_HEADER})",
        )
    if len(head) < 8 + n:
        raise ArchiveError("invalid_safetensors", "need the whole header")
    try:
        header = json.loads(head[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArchiveError("invalid_safetensors", f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ArchiveError("invalid_safetensors", "safetensors header is not an object")
    data_len = size - 8 - n
    shapes = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise ArchiveError("invalid_safetensors", f"tensor {key!r} lies outside the file")
        if (
            not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape))
            or dtype not in DTYPE_BYTES
        ):
            raise ArchiveError("invalid_safetensors", f"tensor {key!r} has no valid shape and dtype")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise ArchiveError(
                "invalid_safetensors", f"tensor {key!r}: {dtype}{shape} does not fill its byte range"
            )
        shapes[key] = tuple(shape)
    return shapes


def read_head(path: Path, limit: int = MAX_SAFETENSORS_HEADER + 8) -> bytes:
    with open(path, "rb") as fh:
        first = fh.read(8)
        if len(first) == 8 and not looks_like_pickle(first):
            (n,) = struct.unpack("<Q", first)
            return first + fh.read(min(n, limit))
        return first


def check_weights_file(path: Path, name: str) -> list[str]:
    """Refuse pickles by name and by content; return the tensor names of a valid safetensors file."""
    refuse_pickle_name(name)
    if not name.endswith(".safetensors"):
        raise ArchiveError("invalid_safetensors", f"{name}: weights must be .safetensors files")
    try:
        return safetensors_tensors(read_head(path), path.stat().st_size)
    except ArchiveError as exc:
        raise ArchiveError(exc.code, f"{name}: {exc}") from None


def safe_extract(
    path: Path, fmt: str, dest: Path, *, max_total_bytes: int, limits: Limits | None = None
) -> list[Entry]:
    """Extract regular files only, after list_entries accepted every name; pickles refuse the archive."""
    entries = list_entries(path, fmt, max_total_bytes=max_total_bytes, limits=limits)
    for entry in entries:
        refuse_pickle_name(entry.name)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()

    def target(raw: str) -> Path:
        out = (root / _normalise(raw)).resolve()
        if not out.is_relative_to(root):
            raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} escapes the archive folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        with zf.open(info) as src, open(target(info.filename), "wb") as out:
                            shutil.copyfileobj(src, out, 1024 * 1024)
        else:
            with tarfile.open(path, "r:*") as tf:
                for member in tf:
                    if member.isfile():
                        src = tf.extractfile(member)
                        assert src is not None
                        with src, open(target(member.name), "wb") as out:
                            shutil.copyfileobj(src, out, 1024 * 1024)
    except (EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as exc:
        raise ArchiveError("invalid_archive", f"cannot extract the {fmt} archive: {exc}") from None
    return entries
