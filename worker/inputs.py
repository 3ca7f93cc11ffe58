"""Local copies of a job's inputs, cached per worker machine: the dataset archive with its JSON pulled
out, and the checkpoint directory (extracted safely, pickles refused) plus the projector laid over it, if any."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from api.archive import (
    ArchiveError,
    common_root,
    safe_extract,
    too_large,
)
from api.db.models import BaseModelEntry, Checkpoint, Dataset
from api.storage import Storage
from api.weights import check_weights_file
from worker.config import WorkerSettings


@dataclass(frozen=True)
class DatasetFiles:
    data_json: Path
    images: Path  # the archive itself; disp.formats reads images from it without extracting


@dataclass(frozen=True)
class CheckpointFiles:
    model_dir: Path
    projector: Path | None  # a kind=projector checkpoint laid over the base model


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp dir into place; another worker may have won the race."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def _tmp(parent: Path) -> Path:
    path = parent / f".tmp-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


def archive_suffix(fmt: str) -> str:
    return ".zip" if fmt == "zip" else ".tar"


def local_archive(raw: Path, fmt: str, folder: Path, settings: WorkerSettings) -> Path:
    """The downloaded archive as `archive.zip` or an uncompressed `archive.tar` in `folder`: a compressed
    tar is inflated once, so that images are read by offset instead of re-inflating the stream from its
    start for every backward seek."""
    dest = folder / f"archive{archive_suffix(fmt)}"
    with open(raw, "rb") as fh:
        magic = fh.read(6)
    openers = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
    opener = next((fn for head, fn in openers.items() if magic.startswith(head)), None)
    if fmt != "tar" or opener is None:
        return raw.rename(dest)
    limit = settings.max_expanded_bytes + settings.max_archive_entries * 1024 + 1024**2  # headers and padding
    written = 0
    try:
        with opener(raw, "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(1024 * 1024):
                written += len(chunk)
                if written > limit:
                    raise too_large(
                        "archive_too_large", "the tar stream inflates beyond", limit, "max_expanded_bytes"
                    )
                out.write(chunk)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ArchiveError("invalid_archive", f"cannot inflate the tar archive: {exc}") from None
    raw.unlink()
    return dest


def dataset_files(dataset: Dataset, storage: Storage, settings: WorkerSettings) -> DatasetFiles:
    """The archive and its records in canonical LLaVA form (`disp.formats` reads every supported format)."""
    from disp.data import write_json
    from disp.formats import read_dataset

    base = settings.work_dir / "cache" / "datasets"
    final = base / dataset.id
    if not (final / "data.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(base)
        raw = storage.download(dataset.storage_key, tmp / "download")
        archive = local_archive(raw, dataset.archive_format, tmp, settings)
        write_json(tmp / "data.json", read_dataset(archive).records)
        _publish(tmp, final)
    return DatasetFiles(final / "data.json", final / f"archive{archive_suffix(dataset.archive_format)}")


def _extract_checkpoint(key: str, fmt: str, dest: Path, storage: Storage, settings: WorkerSettings) -> Path:
    """Download and extract a checkpoint archive once; returns the directory holding config.json."""
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(dest.parent)
        archive = storage.download(key, tmp / f"archive{archive_suffix(fmt)}")
        entries = safe_extract(archive, fmt, tmp / "dir", max_total_bytes=settings.max_expanded_bytes)
        for entry in entries:  # refuse pickles by name and by content before disp sees the directory
            if entry.name.endswith(".safetensors"):
                check_weights_file(tmp / "dir" / entry.name, entry.name)
        archive.unlink()
        root = common_root(entries)
        (tmp / "root").write_text(root)
        _publish(tmp, dest)
    root = (dest / "root").read_text()
    return dest / "dir" / root if root else dest / "dir"


def base_model_dir(base: BaseModelEntry, storage: Storage, settings: WorkerSettings) -> Path:
    """The operator's base model, extracted once per worker machine."""
    return _extract_checkpoint(
        base.storage_key, "tar", settings.work_dir / "cache" / "models" / base.id, storage, settings
    )


def checkpoint_files(
    checkpoint: Checkpoint, storage: Storage, settings: WorkerSettings, session
) -> CheckpointFiles:
    cache = settings.work_dir / "cache"
    if checkpoint.kind == "projector":
        model_dir = base_model_dir(session.get(BaseModelEntry, checkpoint.base_model_id), storage, settings)
        projector = cache / "projectors" / checkpoint.id / "projector.safetensors"
        if not projector.is_file():
            storage.download(checkpoint.storage_key, projector)
            check_weights_file(projector, projector.name)
        return CheckpointFiles(model_dir, projector)
    model_dir = _extract_checkpoint(
        checkpoint.storage_key,
        checkpoint.archive_format,
        cache / "checkpoints" / checkpoint.id,
        storage,
        settings,
    )
    return CheckpointFiles(model_dir, None)
