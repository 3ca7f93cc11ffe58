"""Full validation of uploads before any GPU time is spent: checksum, archive safety, every record and
every image (read with `disp.formats`, decoded by `disp.datacheck`), checkpoint layout and safetensors headers."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from api.archive import ArchiveError
from api.db.models import Checkpoint, Dataset, UploadStatus
from api.ingest import named_copy, precheck_checkpoint, precheck_dataset, problem_code
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
    """Every record and every image, with `disp.datacheck` (the report `disp data check` prints)."""
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
        except ArchiveError as exc:
            _fail(dataset, exc.code, str(exc))
            return
        report = check_dataset(
            named_copy(raw, filename, summary.archive_format),
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
        )
    if not report.ok:
        first = report.problems[0]
        lines = [p.message for p in report.problems[:10]]
        if report.problems_total > len(lines):
            lines.append(f"... and {report.problems_total - len(lines)} more")
        message = first.message if report.problems_total == 1 else f"{report.problems_total} problems:\n" + "\n".join(lines)
        _fail(dataset, problem_code(first.code, first.field, first.message), message)
        return
    dataset.archive_format = summary.archive_format
    dataset.num_records = report.records
    dataset.num_images = report.images
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
