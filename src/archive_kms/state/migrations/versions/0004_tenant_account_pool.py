"""The local stack's pool of Azurite accounts that stand in for tenants' own storage
accounts: which pool account is allocated to which tenant account (``state.account_pool``,
``docs/storage-layout.md`` "A tenant's own storage account").

A new table only; releases before this one ignore it, so ``schema_version`` stays 1.
Definitions frozen here (never edit; change them with a new revision).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import Column, DateTime, MetaData, String, Table

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_UTC = DateTime(timezone=True)  # state.schema.UtcDateTime's column type


def _tables() -> MetaData:
    meta = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    Table(
        "tenant_account_pool",
        meta,
        Column("pool_account", String(24), primary_key=True),
        Column("account", String(24), nullable=False, unique=True),
        Column("tenant_id", String(128), nullable=False),
        Column("allocated_at", _UTC, nullable=False),
    )
    return meta


def upgrade() -> None:
    _tables().create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    raise NotImplementedError("archive_kms state migrations are forward-only: restore a backup")
