"""Full validation of uploads before any GPU time is spent: checksum, archive safety and limits, every
record and every image (read with `disp.formats`, decoded by `disp.datacheck`), and for checkpoints the
layout, every shard the index names, the tokenizer, and every tensor's shape against the model config.json
describes. Archive headers are checked before anything is inflated; checkpoint weights are never loaded
(their shapes come from the safetensors headers)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from api.archive import ArchiveError, copy_member
from api.db.models import BaseModelEntry, Checkpoint, Dataset, UploadStatus
from api.errors import public_message
from api.ingest import named_copy, precheck_checkpoint, precheck_dataset, problem_code
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
def validate_dataset(
    *, session: Session, storage: Storage, settings: WorkerSettings, dataset_id: str
) -> None:
    """Every record and every image, with `disp.datacheck` (the report `disp data check` prints), after the
    archive's limits; a compressed tar is inflated first so that images are read by offset."""
    from disp.datacheck import check_dataset

    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.status != UploadStatus.validating:
        return
    with tempfile.TemporaryDirectory(prefix="disp-validate-") as tmp:
        raw = Path(tmp) / "upload"
        if not _download_checked(dataset, storage, raw):
            return
        filename = Path(dataset.storage_key).name
        try:
            summary = precheck_dataset(raw, settings, filename)
            archive = local_archive(raw, summary.archive_format, Path(tmp), settings)
        except ArchiveError as exc:
            mark_invalid(dataset, exc.code, str(exc), (tmp,))
            return
        report = check_dataset(
            named_copy(archive, filename, summary.archive_format),
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
        )
        if not report.ok:
            first = report.problems[0]
            lines = [p.message for p in report.problems[:10]]
            if report.problems_total > len(lines):
                lines.append(f"... and {report.problems_total - len(lines)} more")
            many = f"{report.problems_total} problems:\n" + "\n".join(lines)
            message = first.message if report.problems_total == 1 else many
            mark_invalid(dataset, problem_code(first.code, first.field, first.message), message, (tmp,))
            return
    dataset.archive_format = summary.archive_format
    dataset.num_records = report.records
    dataset.num_images = report.images
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
            if checkpoint.kind == "projector":
                _check_projector(session, storage, settings, checkpoint, summary.shapes)
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


def _check_projector(session: Session, storage: Storage, settings: WorkerSettings, checkpoint, shapes) -> None:
    """Projector tensors only, shaped as the base model's projector."""
    from disp import models
    from worker.inputs import base_model_dir

    base = session.get(BaseModelEntry, checkpoint.base_model_id)
    models.check(base_model_dir(base, storage, settings), shapes, projector_only=True)
