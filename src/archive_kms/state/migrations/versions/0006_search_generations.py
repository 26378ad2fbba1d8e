"""The search-generation registry: one signed record per index generation the platform
created (``operations/search_guard.py``, ``docs/search-index.md``).

A new table only; releases before this one ignore it, so ``schema_version`` stays 1.
Definitions frozen here (never edit; change them with a new revision).

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-14
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import BigInteger, Column, DateTime, LargeBinary, MetaData, PrimaryKeyConstraint, String, Table

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None

_UTC = DateTime(timezone=True)  # state.schema.UtcDateTime's column type


def _tables() -> MetaData:
    meta = MetaData(naming_convention={"pk": "pk_%(table_name)s"})
    Table(
        "search_generations",
        meta,
        Column("tenant_id", String(128), nullable=False),
        Column("generation", BigInteger, nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("recorded_at", _UTC, nullable=False),
        PrimaryKeyConstraint("tenant_id", "generation"),
    )
    return meta


def upgrade() -> None:
    _tables().create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    raise NotImplementedError("archive_kms state migrations are forward-only: restore a backup")
