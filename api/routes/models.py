"""Base models the operator registered (`disp models register`); adapters are laid over them."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from api.db.models import BaseModelEntry
from api.deps import SessionDep, TenantDep
from api.errors import not_found
from api.schemas import ModelList, ModelOut
from api.services.files import find_base_model

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, _tenant: TenantDep) -> dict:
    rows = session.scalars(select(BaseModelEntry).order_by(BaseModelEntry.name))
    return {"data": [ModelOut.model_validate(r, from_attributes=True) for r in rows], "has_more": False}


@router.get("/{model}", response_model=ModelOut)
def get_model(model: str, session: SessionDep, _tenant: TenantDep) -> BaseModelEntry:
    entry = find_base_model(session=session, ref=model)
    if entry is None:
        raise not_found("model", model, "model")
    return entry
