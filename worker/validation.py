"""Full validation of uploads before any GPU time is spent: checksum, archive safety, every record and
every image (decoded with `disp.data`), checkpoint layout and safetensors headers."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from api.archive import ArchiveError
from api.db.models import Checkpoint, Dataset, UploadStatus
from api.ingest import precheck_checkpoint, precheck_dataset
from api.storage import Storage, file_sha256
from worker.config import WorkerSettings

log = logging.getLogger(__name__)


def mark_invalid(row, code: str, message: str) -> None:
    if row is not None and row.status == UploadStatus.validating:
        row.status, row.error = UploadStatus.invalid, {"code": code, "message": message[:4000]}


_fail = mark_invalid


def _download_checked(row, storage: Storage, dest: Path) -> bool:
    storage.download(row.storage_key, dest)
    digest = file_sha256(dest)
    if digest != row.sha256:
        _fail(row, "checksum_mismatch", f"uploaded bytes have SHA-256 {digest}, declared {row.sha256}")
        return False
    return True


def validate_dataset(
    *, session: Session, storage: Storage, settings: WorkerSettings, dataset_id: str
) -> None:
    from disp.data import DataError, open_image_source, parse_samples, validate_dataset

    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.status != UploadStatus.validating:
        return
    with tempfile.TemporaryDirectory(prefix="disp-validate-") as tmp:
        raw = Path(tmp) / "upload"
        if not _download_checked(dataset, storage, raw):
            return
        try:
            summary = precheck_dataset(raw, settings)
        except ArchiveError as exc:
            _fail(dataset, exc.code, str(exc))
            return
        from api.archive import find_dataset_json, list_entries, read_member

        archive = raw.rename(
            Path(tmp) / ("archive.zip" if summary.archive_format == "zip" else "archive.tar")
        )
        entries = list_entries(archive, summary.archive_format, max_total_bytes=settings.max_expanded_bytes)
        name = find_dataset_json(entries)
        size = next(e.size for e in entries if e.name == name)
        records = json.loads(read_member(archive, summary.archive_format, name, limit=size + 1))
        try:
            samples = parse_samples(records, name)
            with open_image_source(
                archive, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes
            ) as source:
                validate_dataset(
                    samples, source, check_images=True, max_bytes=settings.max_image_bytes, source_name=name
                )
        except DataError as exc:
            code = "invalid_image" if getattr(exc, "field", None) == "image" else "invalid_record"
            if "refused" in str(exc) and "archive entry" in str(exc):
                code = "unsafe_archive_entry"
            _fail(dataset, code, str(exc))
            return
    dataset.archive_format = summary.archive_format
    dataset.num_records = len(samples)
    dataset.num_images = len({s.image for s in samples})
    dataset.status, dataset.error = UploadStatus.ready, None


def validate_checkpoint(*, session: Session, storage: Storage, checkpoint_id: str) -> None:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None or checkpoint.status != UploadStatus.validating:
        return
    with tempfile.TemporaryDirectory(prefix="disp-validate-") as tmp:
        raw = Path(tmp) / "upload"
        if not _download_checked(checkpoint, storage, raw):
            return
        try:
            summary = precheck_checkpoint(raw, Path(checkpoint.storage_key).name, checkpoint.kind)
            if checkpoint.kind == "adapter":
                _check_adapter(raw)
            else:
                _check_config(raw, summary.archive_format)
        except ArchiveError as exc:
            _fail(checkpoint, exc.code, str(exc))
            return
    checkpoint.archive_format = summary.archive_format
    checkpoint.status, checkpoint.error = UploadStatus.ready, None


def _check_adapter(path: Path) -> None:
    from api.archive import read_head, safetensors_tensors
    from disp.constants import IMAGE_NEWLINE_KEY, PROJECTOR_PREFIX

    names = safetensors_tensors(read_head(path), path.stat().st_size)
    foreign = [n for n in names if not n.startswith(PROJECTOR_PREFIX) and n != IMAGE_NEWLINE_KEY]
    if not any(n.startswith(PROJECTOR_PREFIX) for n in names) or foreign:
        raise ArchiveError(
            "invalid_checkpoint",
            f"an adapter holds only {PROJECTOR_PREFIX}* tensors (and {IMAGE_NEWLINE_KEY}); "
            f"found {foreign[:5] or 'none'}",
        )


def _check_config(path: Path, fmt: str) -> None:
    """The model family is known and its vision and image fields (anyres included) are readable (config.json
    only; no weights are loaded here)."""
    from api.archive import common_root, list_entries, read_member
    from disp.models import CheckpointError, check_config

    entries = list_entries(path, fmt, max_total_bytes=1 << 50)
    config = json.loads(read_member(path, fmt, common_root(entries) + "config.json", limit=10 * 1024**2))
    try:
        check_config(config)
    except CheckpointError as exc:
        raise ArchiveError("invalid_checkpoint", str(exc)) from None
