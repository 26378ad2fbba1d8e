"""The state store's tables: one SQLAlchemy Core schema for SQLite and PostgreSQL.

Enumerations are plain strings with CHECK constraints (portable, readable in psql and
sqlite3). Timestamps are ``UtcDateTime``: timezone-aware UTC in Python on both engines.
JSON documents use JSONB on PostgreSQL. Object names are raw bytes (``LargeBinary``).
The audit log is protected against UPDATE/DELETE (and TRUNCATE on PostgreSQL) by
triggers: that stops bugs and careless hands, not an attacker who can run DDL — the hash
chain is what detects him (``docs/state-store.md``).

Changes to these tables come with an Alembic revision (``state/migrations/versions/``,
``docs/state-store.md`` "Schema migrations"); ``tests/contract/test_state_schema_upgrade.py``
fails while the two disagree. ``SCHEMA_VERSION`` is the ``schema_version`` marker the
releases before Alembic read: raise it (in the revision too) only when a change must keep
those releases out.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

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
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import DDL
from sqlalchemy.types import TypeDecorator

from archive_kms.state.port import (
    CopyStatus,
    DeferredState,
    Flow,
    GateState,
    JobState,
    KeyMode,
    RotationState,
    RunState,
    StepState,
)

SCHEMA_VERSION = 1

TENANT_ID = 128
RUN_ID = 64
JOB_ID = 255
STEP_NAME = 64
HASH_HEX = 64


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; naive UTC text on SQLite, timestamptz on PostgreSQL.
    SQLite compares the stored text, which sorts correctly because its format is fixed."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _one_of(column: str, values: type[enum.Enum], name: str | None = None) -> CheckConstraint:
    allowed = ", ".join(f"'{v.value}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name or column)


schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", UtcDateTime, nullable=False),
)

tenants = Table(
    "tenants",
    metadata,
    Column("tenant_id", String(TENANT_ID), primary_key=True),
    Column("key_mode", String(16), nullable=False),
    Column("key_ref", Text),
    Column("location", Json, nullable=False),
    Column("index_alias", String(255)),
    Column("index_generation", Integer, nullable=False, server_default="0"),
    Column("revoked", Boolean, nullable=False, server_default=text("false")),
    Column("version", Integer, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    _one_of("key_mode", KeyMode),
    CheckConstraint("version >= 1", name="version_positive"),
)

# One row per tenant: the per-tenant mutex every gate operation locks first.
archive_gates = Table(
    "archive_gates",
    metadata,
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("paused_by_run", String(RUN_ID)),
    Column("since", UtcDateTime, nullable=False),
    Column("next_position", BigInteger, nullable=False, server_default="0"),  # FIFO counter for deferrals
    _one_of("state", GateState),
)

# ``payload``: the job's clear metadata (no record content) and, until the job is replayed,
# its sealed content as base64 under the key "sealed" (``_common.pack_payload``). Keeping
# the seal in the document needs no new column, so databases made by version 1 open as
# they are; rows queued before sealing existed hold the spec itself and still replay.
deferred_jobs = Table(
    "deferred_jobs",
    metadata,
    Column("job_id", String(JOB_ID), primary_key=True),
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("payload", Json, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("claimed_at", UtcDateTime),
    Column("replayed_at", UtcDateTime),
    _one_of("state", DeferredState),
    UniqueConstraint("tenant_id", "position"),
    Index(None, "tenant_id", "state", "position"),
)

archive_jobs = Table(
    "archive_jobs",
    metadata,
    Column("job_id", String(JOB_ID), primary_key=True),  # the idempotency id: a job archives once
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column("object_count", BigInteger),
    Column("error", Text),
    _one_of("state", JobState),
    Index(None, "tenant_id", "state"),
)

# Archive-job leases and write journals (ADR 0020; revision 0002). Tables of their own,
# apart from the ledger (a job running without a lease row counts from its
# ``started_at``). ``expires_at``: until when the job's running attempt holds it (its
# writer's heartbeat renews it). The journal lists the object names an attempt may
# create, so whoever fences it can roll them back.
archive_job_leases = Table(
    "archive_job_leases",
    metadata,
    Column("job_id", String(JOB_ID), ForeignKey("archive_jobs.job_id"), primary_key=True),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("renewed_at", UtcDateTime, nullable=False),
)

archive_job_writes = Table(
    "archive_job_writes",
    metadata,
    Column("job_id", String(JOB_ID), ForeignKey("archive_jobs.job_id"), nullable=False),
    Column("name", LargeBinary, nullable=False),
    PrimaryKeyConstraint("job_id", "name"),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(RUN_ID), primary_key=True),
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("flow", String(16), nullable=False),
    Column("mode", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("params", Json, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    _one_of("flow", Flow),
    _one_of("state", RunState),
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

run_steps = Table(
    "run_steps",
    metadata,
    Column("run_id", String(RUN_ID), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("name", String(STEP_NAME), nullable=False),
    Column("ordinal", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("result", Json),
    Column("error", Text),
    PrimaryKeyConstraint("run_id", "name"),
    UniqueConstraint("run_id", "ordinal"),
    _one_of("state", StepState),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("run_id", String(RUN_ID), nullable=False),
    Column("step", String(STEP_NAME), nullable=False),
    Column("shard", Integer, nullable=False),
    Column("cursor", Json, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("run_id", "step", "shard"),
    ForeignKeyConstraint(["run_id", "step"], ["run_steps.run_id", "run_steps.name"], ondelete="CASCADE"),
)

manifests = Table(
    "manifests",
    metadata,
    Column("run_id", String(RUN_ID), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("source", Json, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

manifest_entries = Table(
    "manifest_entries",
    metadata,
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

copy_ledger = Table(
    "copy_ledger",
    metadata,
    Column("run_id", String(RUN_ID), nullable=False),
    Column("name", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    Column("dest_etag", String(255)),
    Column("dest_size", BigInteger),
    Column("plaintext_sha256", String(HASH_HEX)),
    Column("error", Text),
    Column("updated_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("run_id", "name"),
    # Ledger ⊆ manifest: no copy of an object the run never listed.
    ForeignKeyConstraint(["run_id", "name"], ["manifest_entries.run_id", "manifest_entries.name"], ondelete="CASCADE"),
    _one_of("status", CopyStatus),
    Index(None, "run_id", "status"),
)

tenant_leases = Table(
    "tenant_leases",
    metadata,
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("run_id", String(RUN_ID), nullable=False),
    Column("token", BigInteger, nullable=False),
    Column("acquired_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("released_at", UtcDateTime),
    CheckConstraint("token >= 1", name="token_positive"),
)

# No foreign keys: the audit log must outlive anything it mentions.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", UtcDateTime, nullable=False),
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

audit_heads = Table(
    "audit_heads",
    metadata,
    Column("chain", String(TENANT_ID + 16), primary_key=True),  # "global" or "tenant:<id>"
    Column("count", BigInteger, nullable=False),
    Column("head_hash", String(HASH_HEX), nullable=False),
    Column("seal", Text),
    Column("seal_alg", String(32)),
    Column("seal_key_id", String(128)),
    Column("updated_at", UtcDateTime, nullable=False),
)


# The keychain (keys/keychain_store.py): signed JSON rows stored byte for byte. The id
# columns are copied from the body at commit for indexing; the body is the truth, and
# the keychain verifies its signature. No foreign key to tenants: the keychain is created
# by its own flow step and must be readable whatever happens to the registry row.
keychain_heads = Table(
    "keychain_heads",
    metadata,
    Column("tenant_id", String(TENANT_ID), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

keychain_records = Table(
    "keychain_records",
    metadata,
    Column("tenant_id", String(TENANT_ID), nullable=False),
    Column("record_id", String(255), nullable=False),
    Column("level", String(8), nullable=False),
    Column("workspace_id", String(255)),
    Column("body", LargeBinary, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("tenant_id", "record_id"),
    Index(None, "tenant_id", "level", "workspace_id"),
)


# --- append-only protection for audit_log ----------------------------------------------

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

for _stmt in _SQLITE_TRIGGERS:
    event.listen(audit_log, "after_create", DDL(_stmt).execute_if(dialect="sqlite"))
for _stmt in _PG_TRIGGERS:
    event.listen(audit_log, "after_create", DDL(_stmt).execute_if(dialect="postgresql"))

# Names the tests (playing an attacker with DDL rights) drop to tamper with the log.
AUDIT_TRIGGERS: dict[str, list[str]] = {
    "sqlite": ["DROP TRIGGER IF EXISTS audit_log_no_update", "DROP TRIGGER IF EXISTS audit_log_no_delete"],
    "postgresql": [
        "DROP TRIGGER IF EXISTS audit_log_no_update_delete ON audit_log",
        "DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log",
    ],
}


# --- the Archive Console (state/console.py; Alembic revision 0002) ------------------------
# Dual-control approval requests with their votes, and bad-token counters per client.

console_approval_requests = Table(
    "console_approval_requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant_id", String(TENANT_ID), nullable=False),
    Column("action", String(64), nullable=False),
    Column("params", Json, nullable=False),
    Column("requested_by", String(255), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("run_id", String(RUN_ID)),
    Column("decided_at", UtcDateTime),
    Column("error", Text),
    Index(None, "tenant_id", "state"),
)

console_approval_votes = Table(
    "console_approval_votes",
    metadata,
    Column("request_id", String(64), ForeignKey("console_approval_requests.request_id"), nullable=False),
    Column("voter", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("request_id", "voter"),
)

console_auth_failures = Table(
    "console_auth_failures",
    metadata,
    Column("client", String(255), primary_key=True),
    Column("window_start", UtcDateTime, nullable=False),
    Column("count", BigInteger, nullable=False),
)


# --- Azurite accounts standing in for tenant storage accounts (state/account_pool.py; revision 0004)
# The local stack's pool: which Azurite account stands in for which tenant's own account.

tenant_account_pool = Table(
    "tenant_account_pool",
    metadata,
    Column("pool_account", String(24), primary_key=True),  # the Azurite account
    Column("account", String(24), nullable=False, unique=True),  # the tenant account it stands in for
    Column("tenant_id", String(TENANT_ID), nullable=False),
    Column("allocated_at", UtcDateTime, nullable=False),
)


# --- search generations (operations/search_guard.py; Alembic revision 0006) ----------------
# One signed record per index generation the platform created: which index, which mode.
# The body is the record's canonical JSON, byte for byte (the signature covers it); the
# id columns are copied from it for the key. No foreign key to tenants: a tenant's first
# generation is recorded before its registry row exists.

search_generations = Table(
    "search_generations",
    metadata,
    Column("tenant_id", String(TENANT_ID), nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("tenant_id", "generation"),
)


# --- key lifecycle (state/sql/lifecycle.py; Alembic revision 0008) ------------------------
# Retention policies, key rotations (with their confirmation challenge) and the last known
# L1 key version per tenant (docs/key-lifecycle.md).

retention_policies = Table(
    "retention_policies",
    metadata,
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("retention_seconds", BigInteger, nullable=False),
    Column("updated_by", String(255), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    CheckConstraint("retention_seconds >= 1", name="retention_positive"),
)

key_versions = Table(
    "key_versions",
    metadata,
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("key_ref", Text, nullable=False),
    Column("version", String(255)),
    Column("observed_at", UtcDateTime, nullable=False),
)

key_rotations = Table(
    "key_rotations",
    metadata,
    Column("rotation_id", String(64), primary_key=True),
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("key_ref", Text, nullable=False),
    Column("previous_key_ref", Text, nullable=False),
    Column("previous_version", String(255)),
    Column("observed_version", String(255)),
    Column("state", String(16), nullable=False),
    Column("run_id", String(RUN_ID)),
    Column("nonce", String(64)),
    Column("detected_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("awaiting_since", UtcDateTime),
    Column("confirmed_by", String(255)),
    Column("confirmed_at", UtcDateTime),
    Column("completed_at", UtcDateTime),
    Column("details", Json, nullable=False),
    _one_of("state", RotationState),
    CheckConstraint("kind IN ('customer', 'byok')", name="kind"),
    Index(None, "tenant_id", "detected_at"),
    # One open rotation per tenant.
    Index(
        "uq_key_rotations_one_open_per_tenant",
        "tenant_id",
        unique=True,
        sqlite_where=text("state IN ('detected', 'awaiting', 'confirmed')"),
        postgresql_where=text("state IN ('detected', 'awaiting', 'confirmed')"),
    ),
)


# Key lifecycle (revision 0009): stored warnings, the monitor's last observation of each
# tenant's master key, and per-tenant grace policies (docs/key-lifecycle.md).
key_warnings = Table(
    "key_warnings",
    metadata,
    Column("warning_id", String(300), primary_key=True),  # "<kind>:<tenant>[:<subject>]"
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("details", Json, nullable=False),
    Column("raised_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("cleared_at", UtcDateTime),
    Column("acknowledged_by", String(255)),
    Column("acknowledged_at", UtcDateTime),
    CheckConstraint("severity IN ('critical', 'warning', 'info')", name="severity"),
    Index(None, "tenant_id", "cleared_at"),
)

key_observations = Table(
    "key_observations",
    metadata,
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("key_ref", Text, nullable=False),
    Column("state", String(32), nullable=False),
    Column("key_version", String(255)),
    Column("accepted_version", String(255)),
    Column("outcome", String(16), nullable=False),
    Column("observed_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime),
    Column("unreachable_since", UtcDateTime),
    Column("details", Json, nullable=False),
)

key_grace_policies = Table(
    "key_grace_policies",
    metadata,
    Column("tenant_id", String(TENANT_ID), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("policy", String(64), nullable=False),
    Column("updated_by", String(255), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)


def table_names() -> list[str]:
    return [t.name for t in metadata.sorted_tables]
