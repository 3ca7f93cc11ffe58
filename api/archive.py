"""Stdlib-only inspection of uploaded archives and weight files: safe entry names, pickle and
safetensors detection, and a safe extractor. Nothing here unpickles or decodes untrusted data."""

from __future__ import annotations

import json
import shutil
import stat
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from disp.constants import PICKLE_SUFFIXES

MAX_ENTRIES = 2_000_000
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own cap


class ArchiveError(ValueError):
    """An upload is refused; `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Entry:
    name: str  # normalised relative path
    size: int


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


def list_entries(path: Path, fmt: str, *, max_total_bytes: int) -> list[Entry]:
    """Regular-file entries; links, devices, absolute or `..` names refuse the whole archive."""
    entries: dict[str, Entry] = {}
    total = 0
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as zf:
                members = [
                    (i.filename, i.file_size, i.is_dir(), stat.S_ISLNK(i.external_attr >> 16), False)
                    for i in zf.infolist()
                ]
        else:
            with tarfile.open(path, "r:*") as tf:
                members = [
                    (
                        m.name,
                        m.size,
                        m.isdir(),
                        m.issym() or m.islnk(),
                        not (m.isfile() or m.isdir() or m.issym() or m.islnk()),
                    )
                    for m in tf
                ]
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise ArchiveError("invalid_archive", f"cannot read the {fmt} archive: {exc}") from exc
    for raw, size, is_dir, is_link, is_special in members:
        name = _normalise(raw)
        if is_link:
            raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} is a link")
        if is_special:
            raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} is not a regular file")
        if is_dir:
            continue
        if name in entries:
            raise ArchiveError("unsafe_archive_entry", f"archive entry {raw!r} appears twice")
        total += size
        if total > max_total_bytes or len(entries) >= MAX_ENTRIES:
            raise ArchiveError("archive_too_large", f"archive expands beyond {max_total_bytes} bytes")
        entries[name] = Entry(name, size)
    return sorted(entries.values(), key=lambda e: e.name)


def read_member(path: Path, fmt: str, name: str, *, limit: int) -> bytes:
    """Bytes of entry `name` (as listed by list_entries), at most `limit` (keep it near the entry's size:
    readers may allocate it up front)."""
    if fmt == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir() and _normalise(info.filename) == name:
                    with zf.open(info) as fh:
                        return fh.read(limit)
    else:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if member.isfile() and _normalise(member.name) == name:
                    fh = tf.extractfile(member)
                    assert fh is not None
                    with fh:
                        return fh.read(limit)
    raise ArchiveError("invalid_archive", f"archive has no entry {name!r}")


def common_root(entries: list[Entry]) -> str:
    """The single top folder all entries share (archives of `folder/...`), or ''."""
    tops = {e.name.split("/", 1)[0] for e in entries if not e.name.startswith("__MACOSX")}
    nested = all("/" in e.name for e in entries if not e.name.startswith("__MACOSX"))
    return next(iter(tops)) + "/" if len(tops) == 1 and nested else ""


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


def safetensors_tensors(head: bytes, size: int) -> list[str]:
    """Tensor names from the start of a safetensors file (8-byte length + JSON header), checked for bounds."""
    if looks_like_pickle(head):
        raise ArchiveError("pickle_refused", "the file is a pickle, not safetensors; it was not opened")
    if len(head) < 8:
        raise ArchiveError("invalid_safetensors", "file too short for a safetensors header")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_SAFETENSORS_HEADER or n + 8 > size:
        raise ArchiveError("invalid_safetensors", "safetensors header length out of bounds")
    if len(head) < 8 + n:
        raise ArchiveError("invalid_safetensors", "need the whole header")
    try:
        header = json.loads(head[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError("invalid_safetensors", f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ArchiveError("invalid_safetensors", "safetensors header is not an object")
    data_len = size - 8 - n
    names = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise ArchiveError("invalid_safetensors", f"tensor {key!r} lies outside the file")
        names.append(key)
    return names


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


def safe_extract(path: Path, fmt: str, dest: Path, *, max_total_bytes: int) -> list[Entry]:
    """Extract regular files only, after list_entries accepted every name; pickles refuse the archive."""
    entries = list_entries(path, fmt, max_total_bytes=max_total_bytes)
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
    return entries
