"""The Archive Console's tables: dual-control approval requests and their votes, and
bad-token counters per client (``state.console``, ``docs/console-api.md``).

New tables only; releases before this one ignore them, so ``schema_version`` stays 1.
Definitions frozen here (never edit; change them with a new revision).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
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
    Table(
        "console_approval_requests",
        meta,
        Column("request_id", String(64), primary_key=True),
        Column("tenant_id", String(128), nullable=False),
        Column("action", String(64), nullable=False),
        Column("params", _JSON, nullable=False),
        Column("requested_by", String(255), nullable=False),
        Column("reason", Text, nullable=False),
        Column("created_at", _UTC, nullable=False),
        Column("expires_at", _UTC, nullable=False),
        Column("state", String(16), nullable=False),
        Column("run_id", String(64)),
        Column("decided_at", _UTC),
        Column("error", Text),
        Index(None, "tenant_id", "state"),
    )
    Table(
        "console_approval_votes",
        meta,
        Column("request_id", String(64), ForeignKey("console_approval_requests.request_id"), nullable=False),
        Column("voter", String(255), nullable=False),
        Column("role", String(32), nullable=False),
        Column("at", _UTC, nullable=False),
        PrimaryKeyConstraint("request_id", "voter"),
    )
    Table(
        "console_auth_failures",
        meta,
        Column("client", String(255), primary_key=True),
        Column("window_start", _UTC, nullable=False),
        Column("count", BigInteger, nullable=False),
    )
    return meta


def upgrade() -> None:
    _tables().create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    raise NotImplementedError("archive_kms state migrations are forward-only: restore a backup")
