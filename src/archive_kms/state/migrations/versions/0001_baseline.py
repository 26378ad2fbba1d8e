"""Baseline: the state schema of the last release before Alembic (schema version 1).

A database that release created is stamped at this revision without running it
(``state.sql.migrate``: its ``schema_version`` row is 1 and the tables are these); a new
database is created by running it. The definitions are frozen copies of that release's
``state/schema.py`` (types spelled out, CHECK lists written out rather than read from the
enums, which may grow): ``metadata.create_all`` below issues exactly the DDL that
release's ``open_state`` issued, audit-log triggers included. Never edit it; change the
schema with a new revision.

Revision ID: 0001
Revises:
Create Date: 2026-03-01
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    insert,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.schema import DDL

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TENANT_ID = 128
RUN_ID = 64
JOB_ID = 255
STEP_NAME = 64
HASH_HEX = 64

_UTC = DateTime(timezone=True)  # state.schema.UtcDateTime's column type
_JSON = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

_SQLITE_TRIGGERS = [
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
]

_PG_TRIGGERS = [
    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege'; END $$",
    "CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
]


def _one_of(column: str, values: tuple[str, ...], name: str | None = None) -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name or column)


def _v1_tables() -> tuple[MetaData, Table]:
    meta = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )

    schema_version = Table(
        "schema_version",
        meta,
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("applied_at", _UTC, nullable=False),
    )

    Table(
        "tenants",
        meta,
        Column("tenant_id", String(TENANT_ID), primary_key=True),
        Column("key_mode", String(16), nullable=False),
        Column("key_ref", Text),
        Column("location", _JSON, nullable=False),
        Column("index_alias", String(255)),
        Column("index_generation", Integer, nullable=False, server_default="0"),
        Column("revoked", Boolean, nullable=False, server_default=text("false")),
        Column("version", Integer, nullable=False),
        Column("created_at", _UTC, nullable=False),
        Column("updated_at", _UTC, nullable=False),
        _one_of("key_mode", ("managed", "byok", "byokms", "byokv", "kmip")),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    # One row per tenant: the per-tenant mutex every gate operation locks first.
    Table(
        "archive_gates",
        meta,
        Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), primary_key=True),
        Column("state", String(16), nullable=False),
        Column("paused_by_run", String(RUN_ID)),
        Column("since", _UTC, nullable=False),
        Column("next_position", BigInteger, nullable=False, server_default="0"),  # FIFO counter for deferrals
        _one_of("state", ("open", "paused", "draining")),
    )

    # ``payload``: the job's clear metadata (no record content) and, until the job is replayed,
    # its sealed content as base64 under the key "sealed" (``_common.pack_payload``). Keeping
    # the seal in the document needs no new column, so databases made by version 1 open as
    # they are; rows queued before sealing existed hold the spec itself and still replay.
    Table(
        "deferred_jobs",
        meta,
        Column("job_id", String(JOB_ID), primary_key=True),
        Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
        Column("position", BigInteger, nullable=False),
        Column("payload", _JSON, nullable=False),
        Column("received_at", _UTC, nullable=False),
        Column("state", String(16), nullable=False),
        Column("claimed_at", _UTC),
        Column("replayed_at", _UTC),
        _one_of("state", ("deferred", "claimed", "replayed")),
        UniqueConstraint("tenant_id", "position"),
        Index(None, "tenant_id", "state", "position"),
    )

    Table(
        "archive_jobs",
        meta,
        Column("job_id", String(JOB_ID), primary_key=True),  # the idempotency id: a job archives once
        Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
        Column("state", String(16), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("started_at", _UTC, nullable=False),
        Column("finished_at", _UTC),
        Column("object_count", BigInteger),
        Column("error", Text),
        _one_of("state", ("running", "completed", "failed")),
        Index(None, "tenant_id", "state"),
    )

    Table(
        "runs",
        meta,
        Column("run_id", String(RUN_ID), primary_key=True),
        Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
        Column("flow", String(16), nullable=False),
        Column("mode", String(32), nullable=False),
        Column("state", String(16), nullable=False),
        Column("params", _JSON, nullable=False),
        Column("created_at", _UTC, nullable=False),
        Column("updated_at", _UTC, nullable=False),
        _one_of("flow", ("enable", "remove", "rotate", "revoke", "restore", "erase")),
        _one_of("state", ("running", "failed", "completed", "cancelled")),
        Index(None, "tenant_id", "created_at"),
        # One tenant, one running flow: the database refuses a second one.
        Index(
            "uq_runs_one_running_per_tenant",
            "tenant_id",
            unique=True,
            sqlite_where=text("state = 'running'"),
            postgresql_where=text("state = 'running'"),
        ),
    )

    Table(
        "run_steps",
        meta,
        Column("run_id", String(RUN_ID), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
        Column("name", String(STEP_NAME), nullable=False),
        Column("ordinal", Integer, nullable=False),
        Column("state", String(16), nullable=False),
        Column("attempt", Integer, nullable=False, server_default="0"),
        Column("started_at", _UTC),
        Column("finished_at", _UTC),
        Column("result", _JSON),
        Column("error", Text),
        PrimaryKeyConstraint("run_id", "name"),
        UniqueConstraint("run_id", "ordinal"),
        _one_of("state", ("pending", "running", "completed", "failed", "skipped")),
    )

    Table(
        "checkpoints",
        meta,
        Column("run_id", String(RUN_ID), nullable=False),
        Column("step", String(STEP_NAME), nullable=False),
        Column("shard", Integer, nullable=False),
        Column("cursor", _JSON, nullable=False),
        Column("updated_at", _UTC, nullable=False),
        PrimaryKeyConstraint("run_id", "step", "shard"),
        ForeignKeyConstraint(["run_id", "step"], ["run_steps.run_id", "run_steps.name"], ondelete="CASCADE"),
    )

    Table(
        "manifests",
        meta,
        Column("run_id", String(RUN_ID), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
        Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
        Column("source", _JSON, nullable=False),
        Column("created_at", _UTC, nullable=False),
    )

    Table(
        "manifest_entries",
        meta,
        Column("run_id", String(RUN_ID), ForeignKey("manifests.run_id", ondelete="CASCADE"), nullable=False),
        Column("name", LargeBinary, nullable=False),
        Column("shard", Integer, nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("etag", String(255)),
        Column("plaintext_sha256", String(HASH_HEX)),
        PrimaryKeyConstraint("run_id", "name"),
        Index(None, "run_id", "shard", "name"),
        CheckConstraint("size >= 0", name="size_not_negative"),
    )

    Table(
        "copy_ledger",
        meta,
        Column("run_id", String(RUN_ID), nullable=False),
        Column("name", LargeBinary, nullable=False),
        Column("status", String(16), nullable=False),
        Column("dest_etag", String(255)),
        Column("dest_size", BigInteger),
        Column("plaintext_sha256", String(HASH_HEX)),
        Column("error", Text),
        Column("updated_at", _UTC, nullable=False),
        PrimaryKeyConstraint("run_id", "name"),
        # Ledger ⊆ manifest: no copy of an object the run never listed.
        ForeignKeyConstraint(
            ["run_id", "name"], ["manifest_entries.run_id", "manifest_entries.name"], ondelete="CASCADE"
        ),
        _one_of("status", ("copied", "verified", "failed", "quarantined")),
        Index(None, "run_id", "status"),
    )

    Table(
        "tenant_leases",
        meta,
        Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), primary_key=True),
        Column("run_id", String(RUN_ID), nullable=False),
        Column("token", BigInteger, nullable=False),
        Column("acquired_at", _UTC, nullable=False),
        Column("expires_at", _UTC, nullable=False),
        Column("released_at", _UTC),
        CheckConstraint("token >= 1", name="token_positive"),
    )

    # No foreign keys: the audit log must outlive anything it mentions.
    audit_log = Table(
        "audit_log",
        meta,
        Column("seq", BigInteger, primary_key=True, autoincrement=False),
        Column("ts", _UTC, nullable=False),
        Column("actor", String(255), nullable=False),
        Column("action", String(128), nullable=False),
        Column("tenant_id", String(TENANT_ID)),
        Column("run_id", String(RUN_ID)),
        Column("details", Text, nullable=False),  # the canonical JSON text that was hashed
        Column("prev_hash", String(HASH_HEX), nullable=False),
        Column("tenant_seq", BigInteger),
        Column("tenant_prev_hash", String(HASH_HEX)),
        Column("hash", String(HASH_HEX), nullable=False),
        UniqueConstraint("tenant_id", "tenant_seq"),
    )

    Table(
        "audit_heads",
        meta,
        Column("chain", String(TENANT_ID + 16), primary_key=True),  # "global" or "tenant:<id>"
        Column("count", BigInteger, nullable=False),
        Column("head_hash", String(HASH_HEX), nullable=False),
        Column("seal", Text),
        Column("seal_alg", String(32)),
        Column("seal_key_id", String(128)),
        Column("updated_at", _UTC, nullable=False),
    )

    # The keychain (keys/keychain_store.py): signed JSON rows stored byte for byte. The id
    # columns are copied from the body at commit for indexing; the body is the truth, and
    # the keychain verifies its signature. No foreign key to tenants: the keychain is created
    # by its own flow step and must be readable whatever happens to the registry row.
    Table(
        "keychain_heads",
        meta,
        Column("tenant_id", String(TENANT_ID), primary_key=True),
        Column("version", BigInteger, nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("updated_at", _UTC, nullable=False),
    )

    Table(
        "keychain_records",
        meta,
        Column("tenant_id", String(TENANT_ID), nullable=False),
        Column("record_id", String(255), nullable=False),
        Column("level", String(8), nullable=False),
        Column("workspace_id", String(255)),
        Column("body", LargeBinary, nullable=False),
        Column("updated_at", _UTC, nullable=False),
        PrimaryKeyConstraint("tenant_id", "record_id"),
        Index(None, "tenant_id", "level", "workspace_id"),
    )

    for stmt in _SQLITE_TRIGGERS:
        event.listen(audit_log, "after_create", DDL(stmt).execute_if(dialect="sqlite"))
    for stmt in _PG_TRIGGERS:
        event.listen(audit_log, "after_create", DDL(stmt).execute_if(dialect="postgresql"))
    return meta, schema_version


def upgrade() -> None:
    meta, schema_version = _v1_tables()
    bind = op.get_bind()
    meta.create_all(bind, checkfirst=False)
    # The marker the releases before Alembic check: they open this database as their own.
    bind.execute(insert(schema_version).values(version=1, applied_at=datetime.now(UTC)))


def downgrade() -> None:
    raise NotImplementedError("archive_kms state migrations are forward-only: restore a backup")
