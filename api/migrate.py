"""Apply Alembic migrations programmatically (at API start-up, `disp serve`, and in tests). The migration
scripts ship inside the package (`api/migrations`), so an installed wheel migrates without a source tree."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from api.db.session import get_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 7_446_131  # pg advisory lock id: one migrator at a time when api replicas start together


def alembic_config() -> Config:
    """Alembic's configuration without an alembic.ini: the packaged scripts, the repository's file names."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("file_template", "%%(year)d-%%(month).2d-%%(day).2d_%%(rev)s_%%(slug)s")
    cfg.set_main_option("path_separator", "os")
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the database at `database_url` to `revision`, serialised by an advisory lock on Postgres."""
    cfg = alembic_config()
    engine = get_engine(database_url)
    with engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
        finally:
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
                conn.commit()
