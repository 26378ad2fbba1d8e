"""Key lifecycle: stored warnings (``key_warnings``), the key-state monitor's last
observation of each tenant's master key (``key_observations``) and per-tenant grace
policies (``key_grace_policies``); ``state.sql.key_lifecycle``, docs/key-lifecycle.md.

New tables only; releases before this one ignore them, so ``schema_version`` stays 1.
Definitions frozen here (never edit; change them with a new revision).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-14
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_UTC = DateTime(timezone=True)  # state.schema.UtcDateTime's column type
_JSON = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


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
    # Stand-in for the existing table, so the foreign keys resolve (never created here).
    Table("tenants", meta, Column("tenant_id", String(128), primary_key=True))
    Table(
        "key_warnings",
        meta,
        Column("warning_id", String(300), primary_key=True),
        Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("severity", String(16), nullable=False),
        Column("message", Text, nullable=False),
        Column("details", _JSON, nullable=False),
        Column("raised_at", _UTC, nullable=False),
        Column("updated_at", _UTC, nullable=False),
        Column("count", BigInteger, nullable=False),
        Column("cleared_at", _UTC),
        Column("acknowledged_by", String(255)),
        Column("acknowledged_at", _UTC),
        CheckConstraint("severity IN ('critical', 'warning', 'info')", name="severity"),
        Index(None, "tenant_id", "cleared_at"),
    )
    Table(
        "key_observations",
        meta,
        Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), primary_key=True),
        Column("key_ref", Text, nullable=False),
        Column("state", String(32), nullable=False),
        Column("key_version", String(255)),
        Column("accepted_version", String(255)),
        Column("outcome", String(16), nullable=False),
        Column("observed_at", _UTC, nullable=False),
        Column("expires_at", _UTC),
        Column("unreachable_since", _UTC),
        Column("details", _JSON, nullable=False),
    )
    Table(
        "key_grace_policies",
        meta,
        Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), primary_key=True),
        Column("policy", String(64), nullable=False),
        Column("updated_by", String(255), nullable=False),
        Column("updated_at", _UTC, nullable=False),
    )
    return meta


def upgrade() -> None:
    meta = _tables()
    bind = op.get_bind()
    for name in ("key_warnings", "key_observations", "key_grace_policies"):
        meta.tables[name].create(bind, checkfirst=False)


def downgrade() -> None:
    raise NotImplementedError("archive_kms state migrations are forward-only: restore a backup")
