"""Checkpoint kind 'adapter' is called 'projector' (one name across library, CLI, API and worker).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 12:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE checkpoints SET kind = 'projector' WHERE kind = 'adapter'")


def downgrade() -> None:
    op.execute("UPDATE checkpoints SET kind = 'adapter' WHERE kind = 'projector'")
