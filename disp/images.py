"""Read-only image sources: a folder, a zip or a tar archive, decoded in memory with size limits.

Archive entries that could escape the root (absolute, `..`, links, devices) make the whole archive
refused when it is opened; nothing is ever extracted to disk. Only PNG/JPEG/WEBP/GIF/BMP/TIFF decode,
and the pixel count is checked from the header before decoding (decompression bombs).
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_IGNORED_TOP = ("__MACOSX",)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad data: the message names the file, and where known the record index, its id and the field."""

    def __init__(self, message: str, *, source: str | None = None, index: int | None = None,
                 record_id: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.source, self.index, self.record_id, self.field = source, index, record_id, field


def _record_error(source: str, index: int, rid: Any, field: str, problem: str) -> DataError:
    who = f"record {index}" + (f" (id {rid!r})" if rid is not None else "")
    return DataError(f"{source}: {who}: field {field!r} {problem}", source=source, index=index,
                     record_id=None if rid is None else str(rid), field=field)


_PLAIN_PATH = re.compile(r"[\w-][\w.-]*(?:/[\w-][\w.-]*)*", re.ASCII)  # already canonical: no '.', '..', '//'


def normalise_name(name: str) -> str:
    """Return a relative image name in canonical ``a/b.png`` form; ValueError if it could escape a root."""
    if isinstance(name, str) and _PLAIN_PATH.fullmatch(name):
        return name
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"must be a non-empty relative path, got {name!r}")
    if "\\" in name or "\x00" in name:
        raise ValueError(f"must use '/' separators and no NUL bytes, got {name!r}")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"must be a relative path, got absolute {name!r}")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise ValueError(f"must not contain a '..' component, got {name!r}")
    if not parts:
        raise ValueError(f"must name a file, got {name!r}")
    return "/".join(parts)


class ImageSource:
    """Read-only images under a root (folder or archive), decoded in memory with size limits.

    Args:
        name: display name used in error messages.
        max_pixels: largest width·height decoded (decompression-bomb guard).
        max_bytes: largest encoded file read.
    """

    def __init__(self, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        if max_pixels < 1 or max_bytes < 1:
            raise ValueError(f"max_pixels and max_bytes must be >= 1, got {max_pixels}, {max_bytes}")
        self.name, self.max_pixels, self.max_bytes = name, max_pixels, max_bytes

    # Subclasses implement these three on canonical names.
    def _has(self, key: str) -> bool:
        raise NotImplementedError

    def _size(self, key: str) -> int:
        raise NotImplementedError

    def _read(self, key: str, limit: int) -> bytes:
        raise NotImplementedError

    def names(self) -> list[str]:
        """All file names in the source, canonical and sorted."""
        raise NotImplementedError

    def _top_folder(self) -> str | None:
        tops = {n.split("/", 1)[0] for n in self.names() if not n.startswith(_IGNORED_TOP)}
        nested = all("/" in n for n in self.names() if not n.startswith(_IGNORED_TOP))
        return next(iter(tops)) if len(tops) == 1 and nested else None

    def _locate(self, name: str) -> str | None:
        try:
            key = normalise_name(name)
        except ValueError as err:
            raise DataError(f"{self.name}: image name {err}", source=self.name) from None
        if self._has(key):
            return key
        top = self._top_folder()
        if top and self._has(f"{top}/{key}"):
            return f"{top}/{key}"
        found = self._by_suffix().get(key.rsplit("/", 1)[-1], [])
        found = [n for n in found if n.endswith(f"/{key}")]
        return found[0] if len(found) == 1 else None

    def _by_suffix(self) -> dict[str, list[str]]:
        """File names by base name, built once: a record's ``0.png`` finds the source's only ``.../0.png``."""
        if getattr(self, "_suffix_index", None) is None:
            index: dict[str, list[str]] = {}
            for n in self.names():
                index.setdefault(n.rsplit("/", 1)[-1], []).append(n)
            self._suffix_index = index
        return self._suffix_index

    def where_hint(self) -> str:
        """Where the source's images are, for a not-found message: ``; its images are under 'images/' ...``."""
        images = [n for n in self.names() if n.lower().endswith(_IMAGE_SUFFIXES)]
        if not images:
            return f"; {self.name} holds no image files"
        folders: dict[str, int] = {}
        for n in images:
            folder = n.rsplit("/", 1)[0] + "/" if "/" in n else ""
            folders[folder] = folders.get(folder, 0) + 1
        where = sorted(folders, key=lambda f: (-folders[f], f))[:3]
        listed = ", ".join(repr(f) if f else "the top level" for f in where)
        return f"; its {len(images)} image file(s) are under {listed} (e.g. {images[0]!r})"

    def _key(self, name: str) -> str:
        key = self._locate(name)
        if key is None:
            raise DataError(f"{self.name}: image {name!r} not found{self.where_hint()}", source=self.name)
        return key

    def exists(self, name: str) -> bool:
        """Whether ``name`` resolves to a file of this source."""
        return self._locate(name) is not None

    def size(self, name: str) -> int:
        """Encoded size of ``name`` in bytes."""
        return self._size(self._key(name))

    def read_bytes(self, name: str) -> bytes:
        """Encoded bytes of ``name``; DataError beyond ``max_bytes``."""
        key = self._key(name)
        try:
            data = self._read(key, self.max_bytes + 1)
        except (OSError, EOFError, RuntimeError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as err:
            raise DataError(f"{self.name}: image {name!r} cannot be read: {err}", source=self.name) from None
        if len(data) > self.max_bytes:
            raise DataError(f"{self.name}: image {name!r} exceeds {self.max_bytes} bytes", source=self.name)
        return data

    def open(self, name: str) -> Image.Image:
        """Decode ``name`` to an RGB image; DataError if it is undecodable or above ``max_pixels``."""
        data = self.read_bytes(name)
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                if img.width * img.height > self.max_pixels:
                    raise DataError(f"{self.name}: image {name!r} is {img.width}x{img.height} pixels, above "
                                    f"the limit of {self.max_pixels}", source=self.name)
                img.load()
                if img.mode == "RGB":  # no second copy: the loaded pixels outlive the `with`
                    return img
                return img.convert("RGB")
        except Image.DecompressionBombError:  # Pillow's own guard, far above ours, read from the header too
            raise DataError(f"{self.name}: image {name!r} declares more pixels than the limit of {self.max_pixels}",
                            source=self.name) from None
        except Image.UnidentifiedImageError:
            raise DataError(f"{self.name}: image {name!r} cannot be decoded: not a "
                            f"{'/'.join(IMAGE_FORMATS)} image", source=self.name) from None
        except (OSError, SyntaxError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            reason = re.sub(r"<_io\.\w+ object at 0x[0-9a-f]+>", "the image", str(err))
            raise DataError(f"{self.name}: image {name!r} cannot be decoded: {reason}", source=self.name) from None

    def image_size(self, name: str) -> tuple[int, int]:
        """(width, height) of ``name`` from its header, without decoding the pixels."""
        data = self.read_bytes(name)
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                return img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{self.name}: image {name!r} cannot be decoded: {err}", source=self.name) from None

    def close(self) -> None:
        """Release open file handles (the source reopens them on next use)."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderSource(ImageSource):
    """Images in a folder; symlinks that resolve outside the folder are refused."""

    def __init__(self, root: Path, **limits: int) -> None:
        super().__init__(root.name or str(root), **limits)
        self.root = Path(os.path.realpath(root))

    def _path(self, key: str) -> Path:
        path = Path(os.path.realpath(self.root / key))
        if os.path.commonpath([path, self.root]) != str(self.root):
            raise DataError(f"{self.name}: image {key!r} resolves outside the folder", source=self.name)
        return path

    def _has(self, key: str) -> bool:
        return self._path(key).is_file()

    def _size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def _read(self, key: str, limit: int) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read(limit)

    def _top_folder(self) -> str | None:
        entries = [e for e in os.scandir(self.root) if e.name not in _IGNORED_TOP and not e.name.startswith(".")]
        return entries[0].name if len(entries) == 1 and entries[0].is_dir() else None

    def names(self) -> list[str]:
        out = []
        for dirpath, _, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            out += [f if rel == "." else f"{rel}/{f}" for f in files]
        return sorted(out)


class _ArchiveSource(ImageSource):
    """Shared part of zip and tar sources: the entry table is checked once, every entry must stay inside."""

    def __init__(self, path: Path, **limits: int) -> None:
        super().__init__(path.name, **limits)
        self.path = path
        self._lock = threading.Lock()
        self._handle: Any = None
        self._pid = -1
        try:
            self._entries = self._scan()  # canonical name -> (member, size)
        except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as err:
            raise DataError(f"{self.name}: cannot read archive: {err}", source=self.name) from None
        finally:
            self.close()
        self._top = ImageSource._top_folder(self)

    def _entry_name(self, raw: str) -> str:
        try:
            return normalise_name(raw.replace("\\", "/").rstrip("/") or raw)
        except ValueError as err:
            raise DataError(f"{self.name}: archive entry {raw!r} refused: {err}", source=self.name) from None

    def _add(self, entries: dict[str, Any], key: str, raw: str, member: Any, size: int) -> None:
        if key in entries:
            raise DataError(f"{self.name}: archive entry {raw!r} appears twice", source=self.name)
        entries[key] = (member, size)

    def _file(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def _has(self, key: str) -> bool:
        return key in self._entries

    def _size(self, key: str) -> int:
        return self._entries[key][1]

    def _top_folder(self) -> str | None:
        return self._top

    def names(self) -> list[str]:
        return sorted(self._entries)

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


class ZipSource(_ArchiveSource):
    """Images in a ``.zip``; absolute, ``..`` and symlink entries make the whole archive refused."""

    def _open(self) -> zipfile.ZipFile:
        return zipfile.ZipFile(self.path)

    def _scan(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        for info in self._file().infolist():
            key = self._entry_name(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{self.name}: archive entry {info.filename!r} refused: symlink", source=self.name)
            if not info.is_dir():
                self._add(entries, key, info.filename, info, info.file_size)
        return entries

    def _read(self, key: str, limit: int) -> bytes:
        with self._lock, self._file().open(self._entries[key][0]) as f:
            return f.read(limit)


class TarSource(_ArchiveSource):
    """Images in a tar (optionally compressed); links, devices, absolute and ``..`` entries are refused.

    The member table is read once and keeps each file's data offset, so a read is one seek (not a scan of
    the member list). A compressed tar is re-read from the start for every backwards seek: use ``.tar`` or
    ``.zip`` for large shuffled training sets.
    """

    def _open(self) -> tarfile.TarFile:
        return tarfile.open(self.path, "r:*")

    def _scan(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        for member in self._file():
            key = self._entry_name(member.name)
            if member.issym() or member.islnk():
                raise DataError(f"{self.name}: archive entry {member.name!r} refused: link", source=self.name)
            if member.isfile() and not member.issparse():
                self._add(entries, key, member.name, member.offset_data, member.size)
            elif not member.isdir():
                raise DataError(f"{self.name}: archive entry {member.name!r} refused: not a regular file",
                                source=self.name)
        return entries

    def _read(self, key: str, limit: int) -> bytes:
        offset, size = self._entries[key]
        with self._lock:
            data = self._file().fileobj
            data.seek(offset)
            return data.read(min(size, limit))


def open_image_source(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                      max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ImageSource:
    """Open a folder, ``.zip`` or tar (``.tar``, ``.tar.gz``, ``.tgz``, ...) of images."""
    path = Path(path)
    limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
    if path.is_dir():
        return FolderSource(path, **limits)
    if not path.is_file():
        raise DataError(f"{path}: image source not found", source=str(path))
    lower = path.name.lower()
    if lower.endswith(".zip"):
        return ZipSource(path, **limits)
    if lower.endswith(TAR_SUFFIXES):
        return TarSource(path, **limits)
    raise DataError(f"{path.name}: unsupported image source; expected a folder, .zip or {', '.join(TAR_SUFFIXES)}",
                    source=path.name)
