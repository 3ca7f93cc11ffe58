"""Datasets: a data file (LLaVA/ShareGPT/OpenAI JSON, JSONL, CC-SBU-Align, parquet, Hugging Face) plus its
images as one zip or tar archive; `POST /datasets/check` reports on one without storing it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile
from sqlalchemy import select

from api.archive import ArchiveError
from api.db.models import Dataset, UploadStatus
from api.deps import CurrentDataset, IdempotencyKey, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import responses
from api.ingest import named_copy, precheck_dataset, problem_code
from api.queue import VALIDATE_DATASET
from api.routes.common import After, FormName, Limit, TempDir, send, spool, upload_filename
from api.schemas import DatasetList, DatasetOut
from api.services import files
from disp.datacheck import DatasetReport, Problem, check_dataset

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 409, 413, 422, 503),
)
def create_dataset(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="zip or tar(.gz) of a data file and its images")],
    name: FormName = None,
) -> Dataset:
    """Upload a small dataset in the request body; large ones go through `/v1/uploads`."""
    filename = upload_filename(file, "dataset")
    with TempDir() as tmp:
        path, sha256 = spool(file, tmp)
        row = files.create_dataset(
            session=session,
            settings=settings,
            storage=storage,
            tenant_id=tenant.id,
            path=path,
            filename=filename,
            name=name,
            sha256=sha256,
        )
        session.commit()
    send(settings, VALIDATE_DATASET, dataset_id=row.id)
    return row


@router.post(
    "/check",
    response_model=DatasetReport,
    dependencies=[IdempotencyKey],
    responses=responses(400, 401, 409, 413, 422),
)
def check_dataset_archive(
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="zip or tar(.gz) of a data file and its images")],
) -> DatasetReport:
    """Dry run: read and check an archive as an upload's validation would (every record and image), and
    return the report `disp data check` prints. Nothing is stored. For archives above the request size
    limit, run `disp data check` locally."""
    del tenant  # authenticated like every route; the check touches no tenant data
    name = file.filename or "dataset"
    with TempDir() as tmp:
        path, _ = spool(file, tmp)
        try:
            summary = precheck_dataset(path, settings, name)
        except ArchiveError as exc:
            return DatasetReport(path=name, problems=[Problem(str(exc), code=exc.code)], problems_total=1)
        report = check_dataset(
            named_copy(path, name, summary.archive_format),
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            name=name,
        )
    for problem in report.problems:
        problem.code = problem_code(problem.code, problem.field, problem.message)
    return report


@router.get("", response_model=DatasetList, responses=responses(401, 422))
def list_datasets(session: SessionDep, tenant: TenantDep, limit: Limit = 20, after: After = None) -> dict:
    query = (
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id, Dataset.status != UploadStatus.deleted)
        .order_by(Dataset.id.desc())
        .limit(limit + 1)
    )
    if after:
        query = query.where(Dataset.id < after)
    rows = list(session.scalars(query))
    data = [DatasetOut.model_validate(r, from_attributes=True) for r in rows[:limit]]
    return {
        "data": data,
        "has_more": len(rows) > limit,
        "next_cursor": data[-1].id if len(rows) > limit else None,
    }


@router.get("/{dataset_id}", response_model=DatasetOut, responses=responses(401, 404, 422))
def get_dataset(dataset: CurrentDataset) -> Dataset:
    return dataset


@router.delete(
    "/{dataset_id}", status_code=204, response_class=Response, responses=responses(401, 404, 409, 422, 503)
)
def delete_dataset(dataset: CurrentDataset, session: SessionDep, storage: StorageDep) -> Response:
    """Delete the dataset and its stored archive; refused (409) while an unfinished job uses it."""
    files.delete_input(session=session, storage=storage, row=dataset)
    session.commit()
    return Response(status_code=204)
