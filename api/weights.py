"""Weight files, stdlib only: what kind of file an upload is, pickles detected by content, and safetensors
headers parsed with every tensor's dtype, shape and byte range checked. Nothing here unpickles anything or
reads a tensor's data."""

from __future__ import annotations

import json
import struct
import tarfile
import zipfile
from pathlib import Path

from api.archive import READ_ERRORS, ArchiveError, entry_name, refuse_pickle_name

MAX_SAFETENSORS_HEADER = 8 * 1024 * 1024  # ~80k tensors; the format allows 100 MB, parsing that costs ~1 GB


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
                    if not info.is_dir() and entry_name(info.filename) in names:
                        with zf.open(info) as fh:
                            heads[entry_name(info.filename)] = head(fh)
        else:
            with tarfile.open(path, "r:*") as tf:
                for member in tf:
                    if member.isfile() and entry_name(member.name) in names:
                        fh = tf.extractfile(member)
                        assert fh is not None
                        with fh:
                            heads[entry_name(member.name)] = head(fh)
    except READ_ERRORS as exc:
        raise ArchiveError("invalid_archive", f"cannot read the {fmt} archive: {exc}") from None
    return heads
