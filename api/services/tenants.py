"""Tenants and API keys (admin command and tests)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ApiKey, Tenant, utcnow
from api.security import hash_api_key, new_api_key, new_webhook_secret


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    tenant = session.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()
    if tenant is None:
        tenant = Tenant(name=name, webhook_secret=new_webhook_secret())
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(*, session: Session, tenant_id: str) -> tuple[ApiKey, str]:
    """A new key for the tenant; the plaintext is returned once and only its hash is stored."""
    plaintext = new_api_key()
    key = ApiKey(tenant_id=tenant_id, key_hash=hash_api_key(plaintext), prefix=plaintext[:12])
    session.add(key)
    session.flush()
    return key, plaintext


def revoke_api_key(*, session: Session, key_id: str) -> ApiKey | None:
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def list_api_keys(*, session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, Tenant]]:
    query = select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.id)
    if tenant_name:
        query = query.where(Tenant.name == tenant_name)
    return [(k, t) for k, t in session.execute(query).all()]
