"""Full validation of uploads before any GPU time is spent: checksum, archive safety and limits, every
record and every image (decoded with `disp.data`), and for checkpoints the layout, every shard the index
names, the tokenizer, and every tensor's shape against the model config.json describes.

Memory stays bounded whatever the upload: archive headers are checked before anything is inflated, the
records file is read as a stream (one record at a time; ids and image names are kept as 8-byte digests),
and checkpoint weights are never loaded (their shapes come from the safetensors headers).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from api.archive import ArchiveError, copy_member, open_member, too_large
from api.db.models import BaseModelEntry, Checkpoint, Dataset, UploadStatus
from api.errors import public_message
from api.ingest import dataset_entries, precheck_checkpoint
from api.jsonstream import JsonStreamError, iter_array
from api.storage import Storage, file_sha256
from worker.config import WorkerSettings
from worker.inputs import local_archive

log = logging.getLogger(__name__)

# Small files of a checkpoint that the config/tokenizer check reads (weights are never extracted here).
METADATA_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def mark_invalid(row, code: str, message: str, roots: tuple = ()) -> None:
    """Refuse an upload with an error the tenant may read (server paths cut to file names)."""
    if row is not None and row.status == UploadStatus.validating:
        text = public_message(message, roots)
        row.status, row.error = UploadStatus.invalid, {"code": code, "message": text[:4000]}


def _download_checked(row, storage: Storage, dest: Path) -> bool:
    storage.download(row.storage_key, dest)
    digest = file_sha256(dest)
    if digest != row.sha256:
        mark_invalid(row, "checksum_mismatch", f"uploaded bytes have SHA-256 {digest}, declared {row.sha256}")
        return False
    return True


# -- datasets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordStats:
    records: int
    images: int


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _first_duplicate(digests: array) -> tuple[int, int] | None:
    """(later, earlier) record indices of the first repeated digest in record order, or None."""
    import numpy as np

    values = np.frombuffer(digests, dtype=np.uint64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    repeats = np.nonzero(ordered[1:] == ordered[:-1])[0]
    if not len(repeats):
        return None
    later = int(order[repeats + 1].min())
    earlier = int(order[np.searchsorted(ordered, values[later])])
    return later, earlier


def check_records(stream, name: str, source, settings: WorkerSettings) -> RecordStats:
    """Stream the records once: each parsed by `disp.data`, its image present, within the size limit and
    decodable; ids unique. DataError or ArchiveError names the first problem."""
    from disp.data import DataError, parse_record, validate_dataset

    ids, images = array("Q"), array("Q")

    def samples():
        for index, record in enumerate(
            iter_array(stream, name=name, max_element_chars=settings.max_record_bytes)
        ):
            if index >= settings.max_records:
                raise too_large(
                    "too_many_records", f"{name} holds more records", settings.max_records, "max_records"
                )
            sample = parse_record(record, name, index)
            ids.append(_digest(sample.id))
            images.append(_digest(sample.image))
            yield sample

    validate_dataset(
        samples(), source, check_images=True, max_bytes=settings.max_image_bytes, source_name=name
    )
    if not ids:
        raise ArchiveError("empty_dataset", f"{name}: the dataset has no records")
    duplicate = _first_duplicate(ids)
    if duplicate is not None:
        later, earlier = duplicate
        raise DataError(
            f"{name}: record {later}: field 'id' duplicates the id of record {earlier}",
            source=name,
            index=later,
            field="id",
        )
    return RecordStats(len(ids), len(set(images)))


def validate_dataset(
    *, session: Session, storage: Storage, settings: WorkerSettings, dataset_id: str
) -> None:
    from disp.data import DataError, open_image_source

    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.status != UploadStatus.validating:
        return
    with tempfile.TemporaryDirectory(prefix="disp-validate-") as tmp:
        raw = Path(tmp) / "upload"
        if not _download_checked(dataset, storage, raw):
            return
        try:
            fmt, _, name = dataset_entries(raw, settings)
            archive = local_archive(raw, fmt, Path(tmp), settings)
            limits = {"max_pixels": settings.max_image_pixels, "max_bytes": settings.max_image_bytes}
            with (
                open_member(
                    archive,
                    fmt,
                    name,
                    limit=settings.max_dataset_json_bytes,
                    setting="max_dataset_json_bytes",
                ) as stream,
                open_image_source(archive, **limits) as source,
            ):
                stats = check_records(stream, name, source, settings)
        except ArchiveError as exc:
            mark_invalid(dataset, exc.code, str(exc), (tmp,))
            return
        except JsonStreamError as exc:
            mark_invalid(dataset, exc.code, str(exc), (tmp,))
            return
        except DataError as exc:
            code = "invalid_image" if getattr(exc, "field", None) == "image" else "invalid_record"
            if "refused" in str(exc) and "archive entry" in str(exc):
                code = "unsafe_archive_entry"
            mark_invalid(dataset, code, str(exc), (tmp,))
            return
    dataset.archive_format = fmt
    dataset.num_records, dataset.num_images = stats.records, stats.images
    dataset.status, dataset.error = UploadStatus.ready, None


# -- checkpoints -----------------------------------------------------------------------------------
def validate_checkpoint(
    *, session: Session, storage: Storage, settings: WorkerSettings, checkpoint_id: str
) -> None:
    from disp.models import CheckpointError

    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None or checkpoint.status != UploadStatus.validating:
        return
    roots = (settings.work_dir,)
    with tempfile.TemporaryDirectory(prefix="disp-validate-") as tmp:
        raw = Path(tmp) / "upload"
        if not _download_checked(checkpoint, storage, raw):
            return
        try:
            summary = precheck_checkpoint(raw, Path(checkpoint.storage_key).name, checkpoint.kind, settings)
            if checkpoint.kind == "adapter":
                _check_adapter(session, storage, settings, checkpoint, summary.shapes)
            else:
                _check_model(raw, summary, Path(tmp) / "meta", settings)
        except ArchiveError as exc:
            mark_invalid(checkpoint, exc.code, str(exc), (*roots, tmp))
            return
        except CheckpointError as exc:
            mark_invalid(checkpoint, "invalid_checkpoint", str(exc), (*roots, tmp))
            return
    checkpoint.archive_format = summary.archive_format
    checkpoint.status, checkpoint.error = UploadStatus.ready, None


def _check_model(archive: Path, summary, dest: Path, settings: WorkerSettings) -> None:
    """config.json and the tokenizer files copied out (bounded), then `disp.models.check` against the
    shapes of every tensor the checkpoint loads."""
    from disp import models

    dest.mkdir()
    fmt, root = summary.archive_format, summary.root
    for name in METADATA_FILES:
        limit = (
            settings.max_tokenizer_bytes if name == "tokenizer.json" else settings.max_checkpoint_json_bytes
        )
        setting = "max_tokenizer_bytes" if name == "tokenizer.json" else "max_checkpoint_json_bytes"
        try:
            copy_member(archive, fmt, root + name, dest / name, limit=limit, setting=setting)
        except ArchiveError as exc:
            if "has no entry" not in str(exc):  # optional files may be absent
                raise
    models.check(dest, summary.shapes)


def _check_adapter(session: Session, storage: Storage, settings: WorkerSettings, checkpoint, shapes) -> None:
    """Projector tensors only, shaped as the base model's projector."""
    from disp import models
    from worker.inputs import base_model_dir

    base = session.get(BaseModelEntry, checkpoint.base_model_id)
    models.check(base_model_dir(base, storage, settings), shapes, projector_only=True)
