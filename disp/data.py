"""LLaVA-format visual instruction data: records, samples, image sources and a torch Dataset.

A record is ``{"id": str|int, "image": "rel/path.png", "conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``. Each record becomes one `Sample`: turn 0 (human) is the question,
turn 1 (gpt) the answer; later turns are checked for shape but otherwise ignored.

Rules, decided once here:
- ids are compared as strings, so ``1`` and ``"1"`` collide; `Sample.id` is always a string.
- the question holds at most one ``<image>``; with none, ``"<image>\\n"`` is prepended (as LLaVA's
  preprocessing does); a placeholder that is present is left where it is written.
- image names are relative ``/``-separated paths without ``..``, looked up relative to the image source's
  root; if the name is not found there and every file of the source lies under one top-level folder
  (an archive of ``images/...``), the name is looked up under that folder.
- text must not contain the tokenizer's special tokens: they would break the chat template.
- images are decoded from memory, never extracted to disk, and only as PNG/JPEG/WEBP/GIF/BMP/TIFF.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import stat
import tarfile
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch.utils.data
from PIL import Image

from disp.constants import IMAGE_PLACEHOLDER, SPECIAL_TOKENS

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_IGNORED_TOP = ("__MACOSX",)


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


@dataclass(frozen=True)
class Sample:
    """One training/evaluation example.

    Args:
        index: position of the record in its file.
        id: record id as a string.
        image: normalised relative image name.
        question: first human turn, with exactly one ``<image>``.
        answer: the gpt turn after it.
    """

    index: int
    id: str
    image: str
    question: str
    answer: str


def normalise_name(name: str) -> str:
    """Return a relative image name in canonical ``a/b.png`` form; ValueError if it could escape a root."""
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


def _check_text(value: Any, source: str, index: int, rid: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _record_error(source, index, rid, field, f"must be a string, got {type(value).__name__}")
    for token in SPECIAL_TOKENS:
        if token in value:
            raise _record_error(source, index, rid, field, f"must not contain the special token {token!r}")
    return value


def _parse_one(rec: Any, source: str, index: int) -> Sample:
    if not isinstance(rec, dict):
        raise DataError(f"{source}: record {index}: must be an object, got {type(rec).__name__}",
                        source=source, index=index)
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or (isinstance(rid, str) and not rid.strip()):
        raise _record_error(source, index, None, "id", f"must be a non-empty string or integer, got {rid!r}")
    if "image" not in rec:
        raise _record_error(source, index, rid, "image", "is missing (text-only records are not supported)")
    if not isinstance(rec["image"], str):
        raise _record_error(source, index, rid, "image",
                            f"must be one relative path string, got {type(rec['image']).__name__}")
    try:
        image = normalise_name(rec["image"])
    except ValueError as err:
        raise _record_error(source, index, rid, "image", str(err)) from None
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        got = f"{len(conv)} turn(s)" if isinstance(conv, list) else repr(type(conv).__name__)
        raise _record_error(source, index, rid, "conversations", f"must be a list of >= 2 turns, got {got}")
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise _record_error(source, index, rid, f"conversations[{t}]",
                                f"must be an object, got {type(turn).__name__}")
        want = ("human",) if t == 0 else ("gpt",) if t == 1 else ("human", "gpt")
        role = turn.get("from")
        if role not in want:
            raise _record_error(source, index, rid, f"conversations[{t}].from",
                                f"must be {' or '.join(map(repr, want))}, got {role!r}")
        _check_text(turn.get("value"), source, index, rid, f"conversations[{t}].value")
    question, answer = conv[0]["value"], conv[1]["value"]
    count = question.count(IMAGE_PLACEHOLDER)
    if count > 1:
        raise _record_error(source, index, rid, "conversations[0].value",
                            f"must contain at most one {IMAGE_PLACEHOLDER!r}, got {count}")
    if count == 0:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    if IMAGE_PLACEHOLDER in answer:
        raise _record_error(source, index, rid, "conversations[1].value",
                            f"must not contain {IMAGE_PLACEHOLDER!r}")
    return Sample(index=index, id=str(rid), image=image, question=question, answer=answer)


def parse_samples(records: Any, source_name: str = "records") -> list[Sample]:
    """Validate LLaVA records and turn each into a `Sample`; DataError names the first bad record/field."""
    if not isinstance(records, list):
        raise DataError(f"{source_name}: top level must be a list of records, got {type(records).__name__}",
                        source=source_name)
    samples, seen = [], {}
    for index, rec in enumerate(records):
        sample = _parse_one(rec, source_name, index)
        if sample.id in seen:
            raise _record_error(source_name, index, sample.id, "id",
                                f"duplicates the id of record {seen[sample.id]}")
        seen[sample.id] = index
        samples.append(sample)
    return samples


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON list of records (UTF-8); DataError on unreadable JSON or a non-list top level."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path.name}: cannot read: {err}", source=path.name) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path.name}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}",
                        source=path.name) from None
    if not isinstance(data, list):
        raise DataError(f"{path.name}: top level must be a list of records, got {type(data).__name__}",
                        source=path.name)
    return data


def load_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """`load_records` then `parse_samples`, errors naming the file."""
    return parse_samples(load_records(path), Path(path).name)


def to_record(sample: Sample, *, image: str | None = None, answer: str | None = None) -> dict[str, Any]:
    """Two-turn LLaVA record of a sample, optionally with another image name or answer."""
    return {"id": sample.id, "image": sample.image if image is None else image,
            "conversations": [{"from": "human", "value": sample.question},
                              {"from": "gpt", "value": sample.answer if answer is None else answer}]}


def replace_answers(records: list[dict[str, Any]], answers: Mapping[str, str],
                    source_name: str = "records") -> list[dict[str, Any]]:
    """Copy of validated records with turn 1 (the answer) replaced for each id in ``answers``."""
    samples = parse_samples(records, source_name)
    unknown = sorted(set(answers) - {s.id for s in samples})
    if unknown:
        raise DataError(f"{source_name}: answers given for unknown ids {unknown[:10]}", source=source_name)
    out = copy.deepcopy(records)
    for sample, rec in zip(samples, out, strict=True):
        if sample.id in answers:
            rec["conversations"][1]["value"] = _check_text(answers[sample.id], source_name, sample.index,
                                                           sample.id, "conversations[1].value")
    return out


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON atomically (UTF-8, indent 1, trailing newline), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_records(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]]) -> Path:
    """Write a list of LLaVA records (see `write_json`)."""
    return write_json(path, [dict(r) for r in records])


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
        return f"{top}/{key}" if top and self._has(f"{top}/{key}") else None

    def _key(self, name: str) -> str:
        key = self._locate(name)
        if key is None:
            raise DataError(f"{self.name}: image {name!r} not found", source=self.name)
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
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            if isinstance(err, DataError):
                raise
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

    A compressed tar is re-read from the start for every backwards seek: use ``.tar`` or ``.zip`` for large
    shuffled training sets.
    """

    def _open(self) -> tarfile.TarFile:
        return tarfile.open(self.path, "r:*")

    def _scan(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        for member in self._file().getmembers():
            key = self._entry_name(member.name)
            if member.issym() or member.islnk():
                raise DataError(f"{self.name}: archive entry {member.name!r} refused: link", source=self.name)
            if member.isfile():
                self._add(entries, key, member.name, member.name, member.size)
            elif not member.isdir():
                raise DataError(f"{self.name}: archive entry {member.name!r} refused: not a regular file",
                                source=self.name)
        return entries

    def _read(self, key: str, limit: int) -> bytes:
        with self._lock:
            f = self._file().extractfile(self._entries[key][0])
            assert f is not None  # only regular files are in the table
            with f:
                return f.read(limit)


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


def validate_dataset(samples: Sequence[Sample], source: ImageSource, *, check_images: bool = True,
                     max_bytes: int | None = None, source_name: str = "dataset", max_report: int = 10) -> None:
    """Check each sample's image exists (and, with ``check_images``, decodes; with ``max_bytes``, is small).

    Raises one DataError listing up to ``max_report`` bad records; its fields describe the first one.
    """
    problems: list[DataError] = []
    for s in samples:
        try:
            if not source.exists(s.image):
                problem = f"refers to {s.image!r}, which is not in {source.name}"
            elif max_bytes is not None and source.size(s.image) > max_bytes:
                problem = f"refers to {s.image!r} of {source.size(s.image)} bytes, above the limit of {max_bytes}"
            else:
                problem = None
                if check_images:
                    source.open(s.image)
        except DataError as err:
            problem = f"refers to {s.image!r}, which is unusable: {err}"
        if problem is not None:
            problems.append(_record_error(source_name, s.index, s.id, "image", problem))
    if problems:
        lines = [str(p) for p in problems[:max_report]]
        if len(problems) > max_report:
            lines.append(f"... and {len(problems) - max_report} more")
        first = problems[0]
        raise DataError(f"{len(problems)} of {len(samples)} records have unusable images:\n" + "\n".join(lines),
                        source=source_name, index=first.index, record_id=first.record_id, field="image")


class LlavaDataset(torch.utils.data.Dataset):
    """Samples with their decoded images; item ``i`` is ``(Sample, PIL RGB image)``."""

    def __init__(self, samples: Sequence[Sample], source: ImageSource, source_name: str = "dataset") -> None:
        self.samples, self.source, self.source_name = list(samples), source, source_name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Sample, Image.Image]:
        s = self.samples[i]
        try:
            return s, self.source.open(s.image)
        except DataError as err:
            raise _record_error(self.source_name, s.index, s.id, "image",
                                f"refers to {s.image!r}, which is unusable: {err}") from None


def collate_samples(batch: Sequence[tuple[Sample, Image.Image]]) -> dict[str, list[Any]]:
    """DataLoader collate: ``{"samples": [Sample], "images": [PIL image]}``, no tensors."""
    return {"samples": [s for s, _ in batch], "images": [img for _, img in batch]}
