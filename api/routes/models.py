"""Base models the operator registered (`disp models register`); projector checkpoints are laid over them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select

from api.db.models import BaseModelEntry
from api.deps import SessionDep, TenantDep
from api.errors import not_found, responses
from api.schemas import MODEL_REF_PATTERN, ModelList, ModelOut
from api.services.files import find_base_model

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList, responses=responses(401))
def list_models(session: SessionDep, _tenant: TenantDep) -> dict:
    rows = session.scalars(select(BaseModelEntry).order_by(BaseModelEntry.name))
    return {"data": [ModelOut.model_validate(r, from_attributes=True) for r in rows], "has_more": False}


@router.get("/{model}", response_model=ModelOut, responses=responses(401, 404, 422))
def get_model(
    model: Annotated[str, Path(pattern=MODEL_REF_PATTERN)], session: SessionDep, _tenant: TenantDep
) -> BaseModelEntry:
    entry = find_base_model(session=session, ref=model)
    if entry is None:
        raise not_found("model", model, "model")
    return entry
