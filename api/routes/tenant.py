"""The calling tenant, with the secret that signs its webhooks."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import TenantDep
from api.errors import responses
from api.schemas import TenantOut

router = APIRouter(prefix="/tenant", tags=["tenant"])


@router.get("", response_model=TenantOut, responses=responses(401))
def get_tenant(tenant: TenantDep) -> TenantOut:
    return TenantOut(id=tenant.id, name=tenant.name, webhook_secret=tenant.webhook_secret)
