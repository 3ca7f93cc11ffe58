"""Data migrations on a real PostgreSQL database: rows written under an old revision read correctly after
`upgrade` and come back after `downgrade`."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from api.migrate import alembic_config, upgrade
from tests.service_conftest import PG_ADMIN

pytestmark = pytest.mark.services


@pytest.fixture
def blank_db():
    name = f"disp_migr_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    from api.db.session import get_engine

    get_engine(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}").dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def kinds(url: str) -> list[str]:
    from api.db.session import get_engine

    with get_engine(url).connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT kind FROM checkpoints ORDER BY id"))]


def test_adapter_checkpoints_become_projector_and_back(blank_db):
    upgrade(blank_db, "0002")
    from api.db.session import get_engine

    with get_engine(blank_db).begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, webhook_secret, created_at) VALUES ('ten_1', 't', 's', now())"))
        for i, kind in enumerate(("adapter", "full")):
            conn.execute(
                text(
                    "INSERT INTO checkpoints (id, tenant_id, name, kind, status, archive_format, storage_key, bytes,"
                    " sha256, created_at) VALUES (:id, 'ten_1', 'c', :kind, 'ready', 'tar', 'k', 1, :sha, now())"
                ),
                {"id": f"ckpt_{i}", "kind": kind, "sha": "0" * 64},
            )
    upgrade(blank_db)
    assert kinds(blank_db) == ["projector", "full"]
    cfg = alembic_config()
    with get_engine(blank_db).connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
        conn.commit()
    assert kinds(blank_db) == ["adapter", "full"]
