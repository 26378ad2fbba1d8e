"""Key lifecycle: retention policies, key rotations with their confirmation challenge, and
the last known L1 key version per tenant (``state.sql.lifecycle``, ``docs/key-lifecycle.md``).

New tables only; releases before this one ignore them, so ``schema_version`` stays 1.
Definitions frozen here (never edit; change them with a new revision).

Revision ID: 0008
Revises: 0003
Create Date: 2026-12-09
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
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_UTC = DateTime(timezone=True)  # state.schema.UtcDateTime's column type
_JSON = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
_OPEN = "state IN ('detected', 'awaiting', 'confirmed')"


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
    # the referenced table, for the foreign keys only (it exists: revision 0001)
    Table("tenants", meta, Column("tenant_id", String(128), primary_key=True))
    Table(
        "retention_policies",
        meta,
        Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), primary_key=True),
        Column("retention_seconds", BigInteger, nullable=False),
        Column("updated_by", String(255), nullable=False),
        Column("updated_at", _UTC, nullable=False),
        CheckConstraint("retention_seconds >= 1", name="retention_positive"),
    )
    Table(
        "key_versions",
        meta,
        Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), primary_key=True),
        Column("key_ref", Text, nullable=False),
        Column("version", String(255)),
        Column("observed_at", _UTC, nullable=False),
    )
    Table(
        "key_rotations",
        meta,
        Column("rotation_id", String(64), primary_key=True),
        Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), nullable=False),
        Column("kind", String(16), nullable=False),
        Column("key_ref", Text, nullable=False),
        Column("previous_key_ref", Text, nullable=False),
        Column("previous_version", String(255)),
        Column("observed_version", String(255)),
        Column("state", String(16), nullable=False),
        Column("run_id", String(64)),
        Column("nonce", String(64)),
        Column("detected_at", _UTC, nullable=False),
        Column("updated_at", _UTC, nullable=False),
        Column("awaiting_since", _UTC),
        Column("confirmed_by", String(255)),
        Column("confirmed_at", _UTC),
        Column("completed_at", _UTC),
        Column("details", _JSON, nullable=False),
        CheckConstraint("state IN ('detected', 'awaiting', 'confirmed', 'completed', 'cancelled')", name="state"),
        CheckConstraint("kind IN ('customer', 'byok')", name="kind"),
        Index(None, "tenant_id", "detected_at"),
        Index(
            "uq_key_rotations_one_open_per_tenant",
            "tenant_id",
            unique=True,
            sqlite_where=text(_OPEN),
            postgresql_where=text(_OPEN),
        ),
    )
    return meta


def upgrade() -> None:
    meta = _tables()
    bind = op.get_bind()
    for name in ("retention_policies", "key_versions", "key_rotations"):
        meta.tables[name].create(bind, checkfirst=False)


def downgrade() -> None:
    raise NotImplementedError("archive_kms state migrations are forward-only: restore a backup")
