"""One loader for every dataset format, shared by the CLI, the worker and the API (no torch here).

A dataset PATH is a data file, a folder or a ``.zip``/``.tar*`` archive holding one:

=====================  ==========================================================================
format                 what is read
=====================  ==========================================================================
``json``               a JSON list of records (LLaVA, ShareGPT or OpenAI ``messages``, mixed freely)
``jsonl``              one record per line (blank lines skipped); also a ``.json`` file laid out so
``cc-sbu-align``       ``filter_cap.json`` = ``{"annotations": [{"image_id", "caption"}]}`` with
                       ``image/<image_id>.jpg`` beside it (see `disp.records.CC_SBU_PROMPT`)
``parquet``            a parquet file, one record per row; an image column holds Hugging Face's
                       ``{"bytes", "path"}`` struct (or a list of them), or plain path strings
``hf-datasets``        a ``datasets`` ``save_to_disk`` folder (``dataset_info.json``, ``state.json``,
                       ``data-*.arrow``); of a ``DatasetDict`` the ``train`` split, or its only one
=====================  ==========================================================================

In a folder or archive the data file is ``filter_cap.json``, the Hugging Face layout, the only top-level
``.json``/``.jsonl``/``.parquet``, or else the one named ``data``, ``dataset`` or ``train``. Images are looked
up in the folder or archive (a record's ``0.png`` also finds ``images/0.png``), beside a lone data file,
in the data file itself (parquet and Hugging Face bytes), or in ``--images`` where given. Parquet and
Hugging Face datasets need pyarrow, the optional extra ``disp[data]``.
"""

from __future__ import annotations

import json
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from disp.data import ParsedRecords, Sample, parse_records, raise_listed
from disp.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    TAR_SUFFIXES,
    DataError,
    FolderSource,
    ImageSource,
    _record_error,
    open_image_source,
)

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
PREFERRED_STEMS = ("data", "dataset", "train")
NOT_DATA = ("manifest.json", "dataset_info.json", "state.json", "dataset_dict.json")
CC_SBU_FILE = "filter_cap.json"
HF_FILES = ("dataset_info.json", "state.json")
HF_DICT_FILE = "dataset_dict.json"
DEFAULT_MAX_DATA_BYTES = 2 * 1024**3
EXTRA_HINT = "install the optional extra: pip install 'disp[data]'"


class FormatError(DataError):
    """The dataset as a whole cannot be read; `code` names the kind of problem for the API."""

    def __init__(self, message: str, *, code: str, source: str | None = None) -> None:
        super().__init__(message, source=source)
        self.code = code


@dataclass
class DataFile:
    """Raw records of one data file: `rows` as read, `format`, display `name`, and the images the file
    itself holds (``{name: read_bytes}``; parquet and Hugging Face datasets only)."""

    rows: list[Any]
    format: str
    name: str
    embedded: dict[str, Callable[[], bytes]] | None = None


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise FormatError(f"parquet and Hugging Face datasets need pyarrow, which is not installed; {EXTRA_HINT}",
                          code="missing_extra") from None
    return pyarrow


# -- JSON, JSONL, CC-SBU-Align ---------------------------------------------------------------------
def _jsonl(text: str, name: str) -> list[Any]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except RecursionError:
                raise FormatError(f"{name}: line {lineno} is nested too deeply to be a record", code="malformed_json",
                                  source=name) from None
            except json.JSONDecodeError as err:
                raise FormatError(f"{name}: invalid JSON at line {lineno} (record {len(rows)}) column {err.colno}: "
                                  f"{err.msg}", code="malformed_json", source=name) from None
    return rows


def parse_json_bytes(data: bytes, name: str) -> DataFile:
    """A JSON list, JSON lines or CC-SBU-Align's ``{"annotations": [...]}``, told apart by content."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FormatError(f"{name}: not UTF-8 text: {err}", code="malformed_json", source=name) from None
    if name.lower().endswith(".jsonl"):
        return DataFile(_jsonl(text, name), "jsonl", name)
    try:
        top = json.loads(text)
    except RecursionError:
        raise FormatError(f"{name}: nested too deeply to be a list of records", code="malformed_json",
                          source=name) from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return DataFile(_jsonl(text, name), "jsonl", name)
        raise FormatError(f"{name}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}",
                          code="malformed_json", source=name) from None
    if isinstance(top, list):
        return DataFile(top, "json", name)
    if isinstance(top, dict) and isinstance(top.get("annotations"), list):
        return DataFile(top["annotations"], "cc-sbu-align", name)
    got = "an object without an 'annotations' list" if isinstance(top, dict) else type(top).__name__
    raise FormatError(f"{name}: top level must be a list of records, JSON lines, or CC-SBU-Align's "
                      f"{{\"annotations\": [...]}}, got {got}", code="malformed_json", source=name)


# -- parquet and Hugging Face datasets (pyarrow) -------------------------------------------------------
def _image_kind(pa, typ) -> str | None:
    """'struct' for Hugging Face's Image {bytes, path}, 'list' for a list of them, else None."""
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return "list" if _image_kind(pa, typ.value_type) == "struct" else None
    if pa.types.is_struct(typ) and {typ.field(i).name for i in range(typ.num_fields)} >= {"bytes", "path"}:
        return "struct"
    return None


def table_rows(table: Any, name: str, fmt: str) -> DataFile:
    """Rows of an Arrow table; image columns become names whose bytes stay in the table until read."""
    pa = _pyarrow()
    kinds = {f.name: _image_kind(pa, f.type) for f in table.schema}
    image_cols = [c for c, k in kinds.items() if k]
    if len(image_cols) > 1:
        raise FormatError(f"{name}: {len(image_cols)} image columns ({', '.join(image_cols)}); one image per record "
                          "is supported", code="malformed_dataset", source=name)
    rows = table.drop_columns(image_cols).to_pylist()
    embedded: dict[str, Callable[[], bytes]] = {}
    for col in image_cols:
        arr, is_list = table.column(col).combine_chunks(), kinds[col] == "list"
        values = arr.values if is_list else arr
        offsets = arr.offsets.to_pylist() if is_list else list(range(len(arr) + 1))
        row_valid, valid = arr.is_valid().to_pylist(), values.is_valid().to_pylist()
        blobs, paths = values.field("bytes"), values.field("path").to_pylist()
        has_bytes = blobs.is_valid().to_pylist()
        for r in range(len(arr)):
            names = []
            for k, j in enumerate(range(offsets[r], offsets[r + 1]) if row_valid[r] else ()):
                if not valid[j]:
                    continue
                if not has_bytes[j]:
                    names.append(paths[j])  # a path only: looked up beside the data
                    continue
                names.append(f"row-{r:06d}{f'-{k}' if k else ''}{PurePosixPath(paths[j] or '').suffix}")
                embedded[names[-1]] = lambda b=blobs, j=j: b[j].as_py()
            if names:
                rows[r]["images" if is_list else "image"] = names if is_list else names[0]
    return DataFile(rows, fmt, name, embedded)


def parse_parquet_bytes(data: bytes, name: str) -> DataFile:
    pa = _pyarrow()
    try:
        table = pa.parquet.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise FormatError(f"{name}: cannot read parquet: {err}", code="malformed_dataset", source=name) from None
    return table_rows(table, name, "parquet")


def _hf_split(tree: ImageSource, root: str, name: str) -> str:
    """The folder (prefix) of the split to read: the dataset itself, or a DatasetDict's train/only split."""
    if tree._has(root + HF_DICT_FILE):
        try:
            splits = json.loads(tree._read(root + HF_DICT_FILE, 1 << 20))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise FormatError(f"{name}: {HF_DICT_FILE} is unreadable: {err}", code="malformed_dataset",
                              source=name) from None
        if "train" not in splits and len(splits) != 1:
            raise FormatError(f"{name}: a DatasetDict with splits {splits} and no 'train'; give the split's folder",
                              code="ambiguous_dataset_file", source=name)
        return f"{root}{'train' if 'train' in splits else splits[0]}/"
    return root


def read_hf_dataset(tree: ImageSource, root: str, name: str, max_bytes: int) -> DataFile:
    """A `datasets` save_to_disk folder inside `tree` (folder or archive) at prefix `root`."""
    pa = _pyarrow()
    root = _hf_split(tree, root, name)
    try:
        state = json.loads(tree._read(root + "state.json", 1 << 24))
        files = [f["filename"] for f in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError, OSError) as err:
        raise FormatError(f"{name}: state.json does not list the data files: {err}", code="malformed_dataset",
                          source=name) from None
    tables = []
    for f in files:
        key = root + str(PurePosixPath(f))
        if not tree._has(key):
            raise FormatError(f"{name}: state.json lists {f!r}, which is missing", code="malformed_dataset", source=name)
        try:
            if isinstance(tree, FolderSource):
                stream = pa.ipc.open_stream(pa.memory_map(str(tree._path(key))))
            else:
                stream = pa.ipc.open_stream(pa.py_buffer(tree._read(key, max_bytes)))
            tables.append(stream.read_all())
        except (pa.ArrowException, OSError) as err:
            raise FormatError(f"{name}: {f} is not an Arrow stream: {err}", code="malformed_dataset",
                              source=name) from None
    if not tables:
        raise FormatError(f"{name}: the dataset has no data files", code="empty_dataset", source=name)
    return table_rows(pa.concat_tables(tables), name, "hf-datasets")


# -- finding the data file in a folder or archive --------------------------------------------------------
def find_data_file(names: list[str], archive: str) -> tuple[str, str]:
    """(kind, name) of the dataset in a listing: kind 'hf-datasets' (name: its folder prefix) or 'file'."""
    tops = {n.split("/", 1)[0] for n in names if not n.startswith("__MACOSX")}
    nested = all("/" in n for n in names if not n.startswith("__MACOSX"))
    root = next(iter(tops)) + "/" if len(tops) == 1 and nested else ""
    top = [n for n in names if n.startswith(root) and "/" not in n[len(root):]]
    if root + HF_DICT_FILE in top or all(root + f in top for f in HF_FILES):
        return "hf-datasets", root
    if root + CC_SBU_FILE in top:
        return "file", root + CC_SBU_FILE
    found = [n for n in top if n.lower().endswith(DATA_SUFFIXES) and n[len(root):] not in NOT_DATA]
    if len(found) == 1:
        return "file", found[0]
    for stem in PREFERRED_STEMS:
        for suffix in DATA_SUFFIXES:
            if root + stem + suffix in found:
                return "file", root + stem + suffix
    if not found:
        raise FormatError(f"{archive}: no dataset file at its top level (a .json, .jsonl or .parquet, "
                          f"{CC_SBU_FILE}, or a Hugging Face datasets folder)", code="missing_dataset_file",
                          source=archive)
    raise FormatError(f"{archive}: several dataset files at its top level ({', '.join(found[:5])}); name the one "
                      "to use data.json (or .jsonl/.parquet)", code="ambiguous_dataset_file", source=archive)


def _parse_file_bytes(data: bytes, name: str) -> DataFile:
    return parse_parquet_bytes(data, name) if name.lower().endswith(".parquet") else parse_json_bytes(data, name)


def _read_limited(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FormatError(f"{path.name}: {size} bytes, above the limit of {max_bytes}", code="too_large",
                              source=path.name)
        return path.read_bytes()
    except OSError as err:
        raise FormatError(f"{path.name}: cannot read: {err.strerror or err}", code="unreadable",
                          source=path.name) from None


def read_data_file(path: Path, max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> DataFile:
    """One data file on disk: .json (list, JSON lines or CC-SBU-Align), .jsonl or .parquet."""
    return _parse_file_bytes(_read_limited(path, max_bytes), path.name)


def read_tree(tree: ImageSource, max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> DataFile:
    """The dataset in a folder or archive (see `find_data_file`)."""
    kind, name = find_data_file(tree.names(), tree.name)
    if kind == "hf-datasets":
        return read_hf_dataset(tree, name, f"{tree.name}/{name}".rstrip("/"), max_bytes)
    size = tree._size(name)
    if size > max_bytes:
        raise FormatError(f"{tree.name}: {name} is {size} bytes, above the limit of {max_bytes}", code="too_large",
                          source=tree.name)
    try:
        data = tree._read(name, size + 1)
    except (OSError, EOFError, RuntimeError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as err:
        raise FormatError(f"{tree.name}: {name} cannot be read: {err}", code="unreadable", source=tree.name) from None
    return _parse_file_bytes(data, name)


# -- image sources ------------------------------------------------------------------------------------------
class EmbeddedSource(ImageSource):
    """Images stored in the data file (parquet, Hugging Face), read on demand; other names from `base`."""

    def __init__(self, name: str, embedded: dict[str, Callable[[], bytes]], base: ImageSource | None,
                 **limits: int) -> None:
        super().__init__(name, **limits)
        self.embedded, self.base = embedded, base

    def _has(self, key: str) -> bool:
        return key in self.embedded or (self.base is not None and self.base.exists(key))

    def _size(self, key: str) -> int:
        return len(self.embedded[key]()) if key in self.embedded else self.base.size(key)

    def _read(self, key: str, limit: int) -> bytes:
        return self.embedded[key]()[:limit] if key in self.embedded else self.base.read_bytes(key)[:limit]

    def names(self) -> list[str]:
        return sorted({*self.embedded, *(self.base.names() if self.base is not None else ())})

    def _top_folder(self) -> str | None:
        return None

    def close(self) -> None:
        if self.base is not None:
            self.base.close()


def _is_tree(path: Path) -> bool:
    return path.is_dir() or path.name.lower().endswith((".zip", *TAR_SUFFIXES))


def _read_path(path: Path, limits: dict[str, int], max_data_bytes: int) -> tuple[DataFile, ImageSource]:
    """The data file at `path` and the images beside or inside it."""
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder", code="not_found", source=str(path))
    if _is_tree(path):
        tree = open_image_source(path, **limits)
        data = read_tree(tree, max_data_bytes)
        return data, tree
    if not path.name.lower().endswith(DATA_SUFFIXES):
        raise FormatError(f"{path.name}: not a dataset; expected a .json, .jsonl or .parquet file, a folder, or a "
                          f".zip/{'/'.join(TAR_SUFFIXES)} archive", code="invalid_format", source=path.name)
    return read_data_file(path, max_data_bytes), FolderSource(path.parent, **limits)


def open_images(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> ImageSource:
    """Images of a folder or archive, including those stored in a parquet or Hugging Face dataset inside it
    (or given directly)."""
    path, limits = Path(path), {"max_pixels": max_pixels, "max_bytes": max_bytes}
    if path.name.lower().endswith(".parquet") or (path.is_dir() and all((path / f).is_file() for f in HF_FILES)):
        data, base = _read_path(path, limits, max_data_bytes)
        return EmbeddedSource(data.name, data.embedded or {}, base, **limits)
    tree = open_image_source(path, **limits)
    try:
        kind, name = find_data_file(tree.names(), tree.name)
    except FormatError:
        return tree
    if kind == "hf-datasets" or name.lower().endswith(".parquet"):
        return EmbeddedSource(tree.name, read_tree(tree, max_data_bytes).embedded or {}, tree, **limits)
    return tree


# -- the dataset --------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """A dataset read and checked: canonical `records` (input order), the `samples` among them (records
    with an image), `text_only` record indices, each record's shape, every record problem, and the
    image `source` that resolves every sample's image."""

    name: str
    format: str
    parsed: ParsedRecords
    source: ImageSource

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.parsed.records

    @property
    def samples(self) -> list[Sample]:
        return self.parsed.samples

    @property
    def text_only(self) -> list[int]:
        return self.parsed.text_only

    @property
    def problems(self) -> list[DataError]:
        return self.parsed.problems

    def missing_images(self) -> list[DataError]:
        """One problem per sample whose image the source does not have (names only: nothing is decoded)."""
        out = []
        for s in self.samples:
            try:
                found = self.source.exists(s.image)
                problem = f"refers to {s.image!r}, which is not in {self.source.name}" + (
                    "" if found else self.source.where_hint())
            except DataError as err:
                found, problem = False, f"refers to {s.image!r}, which is unusable: {err}"
            if not found:
                out.append(_record_error(self.name, s.index, s.id, "image", problem))
        return out


def read_dataset(path: str | Path, images: str | Path | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> Dataset:
    """Read a dataset of any supported format (module docstring). A file-level problem raises FormatError;
    record problems are collected in `Dataset.problems`."""
    limits = {"max_pixels": max_pixels, "max_bytes": max_bytes}
    data, beside = _read_path(Path(path), limits, max_data_bytes)
    base = open_images(images, **limits, max_data_bytes=max_data_bytes) if images is not None else beside
    source = EmbeddedSource(base.name, data.embedded, base, **limits) if data.embedded else base
    return Dataset(data.name, data.format, parse_records(data.rows, data.name), source)


def open_dataset(path: str | Path, images: str | Path | None = None, **limits: int) -> Dataset:
    """`read_dataset`, then DataError listing the bad records (and samples whose image is missing), or
    when there is no record at all or no record with an image."""
    ds = read_dataset(path, images, **limits)
    if not ds.records:
        raise FormatError(f"{ds.name}: the dataset has no records", code="empty_dataset", source=ds.name)
    problems = ds.problems + ds.missing_images()
    raise_listed(problems, f"{len(problems)} of {len(ds.records)} records of {ds.name} are invalid")
    if not ds.samples:
        raise FormatError(f"{ds.name}: all {len(ds.records)} records are text-only; DiSP needs records with an "
                          "image", code="no_image_records", source=ds.name)
    return ds
