"""Stdlib-only inspection of uploaded archives: safe entry names, limits checked from the headers before
anything is inflated, bounded member streams, the records file counted as a stream, and a safe extractor.
Nothing here unpickles or decodes untrusted data (weight files: `api.weights`)."""

from __future__ import annotations

import shutil
import stat
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
RATIO_FLOOR = 1024 * 1024  # the compression-ratio check ignores entries (and archives) smaller than this
READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error)


class ArchiveError(ValueError):
    """An upload is refused; `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
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


def entry_name(raw: str) -> str:
    """An archive entry's name as a relative `a/b` path; ArchiveError if it is absolute, empty or has `..`."""
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
            name = entry_name(raw)
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
            if not info.is_dir() and entry_name(info.filename) == name:
                return stack.enter_context(zf.open(info))
    else:
        tf = stack.enter_context(tarfile.open(path, "r:*"))
        for member in tf:
            if member.isfile() and entry_name(member.name) == name:
                fh = tf.extractfile(member)
                assert fh is not None
                return stack.enter_context(fh)
    raise ArchiveError("invalid_archive", f"archive has no entry {name!r}")


def read_member(path: Path, fmt: str, name: str, *, limit: int, setting: str = "max_member_bytes") -> bytes:
    """All bytes of a small entry; ArchiveError (naming `setting`) when it is longer than `limit`."""
    with open_member(path, fmt, name, limit=limit, setting=setting) as fh:
        return fh.read()


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


def refuse_pickle_name(name: str) -> None:
    if PurePosixPath(name).suffix.lower() in PICKLE_SUFFIXES:
        raise ArchiveError(
            "pickle_refused",
            f"{name}: pickle weight files ({', '.join(PICKLE_SUFFIXES)}) are refused unopened because "
            "loading one can run code; convert the checkpoint to safetensors",
        )


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
        out = (root / entry_name(raw)).resolve()
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
