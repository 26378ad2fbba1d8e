"""The StateStore on SQL: SQLite (default, ``sqlite:///path``) or PostgreSQL
(``postgresql+psycopg://…``), one schema (``state.schema``), SQLAlchemy Core.

Concurrency model (details and reasoning in ``docs/state-store.md``):

* Every public method is one short transaction. On SQLite, write transactions start with
  ``BEGIN IMMEDIATE`` (one writer at a time, waiting up to the busy timeout, never the
  deadlock-prone read→write upgrade); reads use a deferred ``BEGIN`` and see a WAL
  snapshot. On PostgreSQL (READ COMMITTED) the few read-modify-write paths lock the row
  that serialises them: the tenant's gate row (``FOR UPDATE``), the tenant's lease row
  (``FOR SHARE`` under a fenced write), the global audit head (``FOR UPDATE``). Locks are
  always taken in the order lease → gate → anything else, so these paths cannot deadlock.
* Exactly-one-winner races are settled by constraints, not by reads: the lease row's
  primary key plus a conditional ``UPDATE … RETURNING``; the partial unique index "one
  running run per tenant"; the archive-job ledger's primary key.
* Vendor errors are translated here: lock/busy timeouts and serialization failures →
  ``TransientError``; the database not answering → ``ServiceUnavailableError``; both
  retryable and naming the database with its password hidden.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from archive_kms.domain.tenants import TenantId
from archive_kms.errors import (
    ConfigurationError,
    FencedError,
    LeaseHeldError,
    ServiceUnavailableError,
    StateError,
    TransientError,
    ValidationError,
    VersionConflictError,
)
from archive_kms.state import audit as chain
from archive_kms.state._common import (
    RUN_MOVES,
    check_entry,
    check_id,
    check_steps,
    check_token,
    job_payload,
    json_object,
    member,
    pack_payload,
    step_transition,
    unpack_payload,
)
from archive_kms.state.port import (
    PARKED_MEMBER,
    Admission,
    ArchiveJob,
    AuditEvent,
    AuditRecord,
    AuditVerification,
    CopyRecord,
    CopyStatus,
    Decision,
    DeferredJob,
    DeferredState,
    Fence,
    Flow,
    GateState,
    GateStatus,
    JobState,
    KeyMode,
    Lease,
    ManifestEntry,
    ManifestSummary,
    MigrationRun,
    RunState,
    StepRecord,
    StepState,
    TenantRecord,
    check_parkable,
    parking_record,
    submitted_payload,
)
from archive_kms.state.schema import (
    JOB_ID,
    RUN_ID,
    SCHEMA_VERSION,
    archive_gates,
    archive_jobs,
    audit_heads,
    audit_log,
    checkpoints,
    copy_ledger,
    deferred_jobs,
    manifest_entries,
    manifests,
    metadata,
    run_steps,
    runs,
    schema_version,
    tenant_leases,
    tenants,
)

if TYPE_CHECKING:
    from archive_kms.state.sql_keychain import SqlKeychainStore

__all__ = ["SqlStateStore", "make_engine", "open_state"]

Clock = Callable[[], datetime]

DEFAULT_BUSY_TIMEOUT_S = 30.0
DEFAULT_JOB_STALE_AFTER = timedelta(minutes=15)
_SCHEMA_LOCK_KEY = 0x41_4B_4D_53  # "AKMS": serialises concurrent schema creation on PostgreSQL


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Conflict(StateError):
    """A constraint refused a write (unique, foreign key, check); methods that expect one
    catch this and raise the domain error that says what it means."""


# --- engine ------------------------------------------------------------------------------


def make_engine(url: str, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, echo: bool = False) -> Engine:
    """An Engine configured for the state store. SQLite: WAL, foreign keys on, busy
    timeout, synchronous=FULL, SQLAlchemy-controlled BEGIN (IMMEDIATE for writes).
    PostgreSQL: psycopg 3, pre-ping, ``lock_timeout`` = busy timeout."""
    try:
        u = make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigurationError(
            "state_url is not a database URL: use sqlite:///path/to/state.db or postgresql+psycopg://user@host/db",
            resource="state_url",
        ) from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        if u.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise ConfigurationError(
                f"unsupported SQLite driver {u.drivername!r}: use sqlite:///path", resource="state_url"
            )
        in_memory = u.database in (None, "", ":memory:")
        kwargs: dict[str, Any] = {"connect_args": {"timeout": busy_timeout_s, "check_same_thread": False}}
        if in_memory:
            kwargs["poolclass"] = StaticPool  # one shared connection; the store serialises use of it
        else:
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, echo=echo, **kwargs)
        _configure_sqlite(engine, busy_timeout_s, wal=not in_memory)
        return engine
    if backend == "postgresql":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")  # psycopg2 is not a dependency
        if u.drivername != "postgresql+psycopg":
            raise ConfigurationError(
                f"unsupported PostgreSQL driver {u.drivername!r}: use postgresql+psycopg://", resource="state_url"
            )
        # Keep any libpq options given in the URL (e.g. search_path) and add ours.
        options = " ".join(
            filter(None, [str(u.query.get("options") or ""), f"-c lock_timeout={int(busy_timeout_s * 1000)}"])
        )
        return create_engine(
            u.difference_update_query(["options"]),
            echo=echo,
            pool_pre_ping=True,
            connect_args={"connect_timeout": max(1, int(busy_timeout_s)), "options": options},
        )
    raise ConfigurationError(
        f"unsupported state store database {backend!r}: use sqlite:/// or postgresql+psycopg://", resource="state_url"
    )


def _configure_sqlite(engine: Engine, busy_timeout_s: float, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (it would skip it for SELECTs and could
        # not do IMMEDIATE); SQLAlchemy's "begin" event below emits it instead.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            if wal:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged deferral or audit record survives power loss
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("archive_kms_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def open_state(
    url: str,
    *,
    clock: Clock | None = None,
    sealer: chain.HeadSealer | None = None,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    job_stale_after: timedelta = DEFAULT_JOB_STALE_AFTER,
    echo: bool = False,
) -> SqlStateStore:
    """Open (and if needed create) the state store at ``url``. Creating the schema is
    idempotent and safe to race from many processes. ``sealer`` seals audit chain heads
    (and is then required by ``verify_audit``)."""
    engine = make_engine(url, busy_timeout_s=busy_timeout_s, echo=echo)
    store = SqlStateStore(engine, clock=clock, sealer=sealer, job_stale_after=job_stale_after)
    try:
        store.create_schema()
    except BaseException:
        store.close()
        raise
    return store


# --- the store ---------------------------------------------------------------------------


class SqlStateStore:
    """``StateStore`` over one SQLAlchemy Engine (thread-safe; share one per process)."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock | None = None,
        sealer: chain.HeadSealer | None = None,
        job_stale_after: timedelta = DEFAULT_JOB_STALE_AFTER,
    ) -> None:
        self._engine = engine
        self._now: Clock = clock or _utcnow
        self._sealer = sealer
        self._job_stale_after = job_stale_after
        self.dialect = engine.dialect.name
        self._pg = self.dialect == "postgresql"
        self._display = engine.url.render_as_string(hide_password=True)
        # An in-memory SQLite database is one shared connection: serialise its users.
        in_memory = self.dialect == "sqlite" and engine.url.database in (None, "", ":memory:")
        self._serial: threading.RLock | None = threading.RLock() if in_memory else None

    def __repr__(self) -> str:
        return f"SqlStateStore({self._display})"

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def keychain_store(self) -> SqlKeychainStore:
        """The ``KeychainStore`` on this database (``state.sql_keychain``)."""
        from archive_kms.state.sql_keychain import SqlKeychainStore

        return SqlKeychainStore(self)

    # --- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _tx(self, op: str, *, write: bool = True, snapshot: bool = False) -> Iterator[Connection]:
        """One transaction. ``write`` on SQLite: BEGIN IMMEDIATE. ``snapshot`` on
        PostgreSQL: REPEATABLE READ (one consistent view for multi-statement reads)."""
        with self._serial or nullcontext():
            try:
                with self._engine.connect() as conn:
                    if self.dialect == "sqlite" and write:
                        conn.execution_options(archive_kms_begin="IMMEDIATE")
                    if self._pg and snapshot:
                        conn.execution_options(isolation_level="REPEATABLE READ")
                    with conn.begin():
                        yield conn
            except sa_exc.IntegrityError as exc:
                raise _Conflict(f"{op}: {_first_line(exc.orig)}", resource=self._display) from exc
            except sa_exc.DBAPIError as exc:
                raise self._translate(exc, op) from exc

    def _translate(self, exc: sa_exc.DBAPIError, op: str) -> Exception:
        detail = _first_line(exc.orig)
        where = f"state store {self._display}"
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if (
            (sqlstate or "").startswith(("28", "3D"))
            or "authentication failed" in detail
            or ("database" in detail and "does not exist" in detail)
        ):
            # Wrong credentials or database name: retrying cannot help, a human must fix the URL.
            return ConfigurationError(f"{op}: {where}: {detail}", resource=self._display)
        if sqlstate in ("40001", "40P01", "55P03", "57014"):
            return TransientError(f"{op}: {where}: {detail} (retry)", resource=self._display)
        if isinstance(exc, sa_exc.OperationalError) and ("locked" in detail or "busy" in detail):
            return TransientError(
                f"{op}: {where} stayed locked past the busy timeout: {detail}", resource=self._display
            )
        if exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return ServiceUnavailableError(f"{op}: {where} is not answering: {detail}", resource=self._display)
        return StateError(f"{op}: {where}: {detail}", resource=self._display)

    def _insert(self, table: Any) -> Any:
        return pg_insert(table) if self._pg else sqlite_insert(table)

    def create_schema(self) -> None:
        """Create missing tables, record the schema version, seed the global audit head.

        Many processes may open a new SQLite file at once; SQLite can report "locked"
        at once (not after the busy timeout) while another connection switches the file
        to WAL, so the creation is retried a few times before the error stands."""
        for attempt in range(5):
            try:
                return self._create_schema_once()
            except TransientError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _create_schema_once(self) -> None:
        now = self._now()
        with self._tx("create schema") as conn:
            if self._pg:
                conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
            metadata.create_all(conn, checkfirst=True)
            found = conn.execute(select(func.max(schema_version.c.version))).scalar()
            if found is None:
                conn.execute(insert(schema_version).values(version=SCHEMA_VERSION, applied_at=now))
            elif found != SCHEMA_VERSION:
                raise ConfigurationError(
                    f"state store {self._display} has schema version {found}, this code needs "
                    f"{SCHEMA_VERSION}: {'upgrade the code' if found > SCHEMA_VERSION else 'migrate the database'}",
                    resource=self._display,
                )
            conn.execute(
                self._insert(audit_heads)
                .values(
                    chain=chain.GLOBAL_CHAIN,
                    count=0,
                    head_hash=chain.GENESIS,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["chain"])
            )

    # --- fencing -------------------------------------------------------------------------

    def _fenced(self, conn: Connection, fence: Fence | None, tenant_id: str) -> None:
        if fence is None:
            return
        if fence.tenant_id != tenant_id:
            raise FencedError(
                f"fence of tenant {fence.tenant_id!r} used for a write to tenant {tenant_id!r}",
                resource=f"lease:{tenant_id}",
            )
        # FOR SHARE: a takeover (UPDATE of this row) waits until this write commits.
        row = conn.execute(
            select(tenant_leases).where(tenant_leases.c.tenant_id == tenant_id).with_for_update(read=True)
        ).one_or_none()
        check_token(row, tenant_id, fence.token)

    # --- tenants -------------------------------------------------------------------------

    def create_tenant(self, tenant: TenantRecord) -> TenantRecord:
        TenantId(tenant.tenant_id)
        now = self._now()
        values = _tenant_values(tenant) | {"version": 1, "created_at": now, "updated_at": now}
        try:
            with self._tx("create tenant") as conn:
                conn.execute(insert(tenants).values(**values))
                conn.execute(
                    insert(archive_gates).values(
                        tenant_id=tenant.tenant_id, state=GateState.OPEN.value, since=now, next_position=0
                    )
                )
                row = conn.execute(select(tenants).where(tenants.c.tenant_id == tenant.tenant_id)).one()
        except _Conflict:
            raise StateError(
                f"tenant {tenant.tenant_id!r} already exists", resource=f"tenant:{tenant.tenant_id}"
            ) from None
        return _tenant(row)

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._tx("get tenant", write=False) as conn:
            row = conn.execute(select(tenants).where(tenants.c.tenant_id == tenant_id)).one_or_none()
        return None if row is None else _tenant(row)

    def list_tenants(self) -> list[TenantRecord]:
        with self._tx("list tenants", write=False) as conn:
            rows = conn.execute(select(tenants).order_by(tenants.c.tenant_id)).all()
        return [_tenant(r) for r in rows]

    def update_tenant(self, tenant: TenantRecord, *, fence: Fence | None = None) -> TenantRecord:
        tid = tenant.tenant_id
        with self._tx("update tenant") as conn:
            self._fenced(conn, fence, tid)
            row = conn.execute(
                update(tenants)
                .where(tenants.c.tenant_id == tid, tenants.c.version == tenant.version)
                .values(**_tenant_values(tenant), version=tenant.version + 1, updated_at=self._now())
                .returning(*tenants.c)
            ).one_or_none()
            if row is None:
                current = conn.execute(select(tenants.c.version).where(tenants.c.tenant_id == tid)).scalar()
                if current is None:
                    raise StateError(f"no tenant {tid!r}", resource=f"tenant:{tid}")
                raise VersionConflictError(
                    f"tenant {tid!r} is at version {current}; this update was based on version {tenant.version}: "
                    "re-read and retry",
                    resource=f"tenant:{tid}",
                )
        return _tenant(row)

    # --- gate ----------------------------------------------------------------------------

    def _lock_gate(self, conn: Connection, tenant_id: str) -> Row[Any]:
        row = conn.execute(
            select(archive_gates).where(archive_gates.c.tenant_id == tenant_id).with_for_update()
        ).one_or_none()
        if row is None:
            raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
        return row

    def _pending(self, conn: Connection, tenant_id: str) -> int:
        return int(
            conn.execute(
                select(func.count())
                .select_from(deferred_jobs)
                .where(deferred_jobs.c.tenant_id == tenant_id, deferred_jobs.c.state != DeferredState.REPLAYED.value)
            ).scalar_one()
        )

    def _gate_status(self, conn: Connection, row: Row[Any]) -> GateStatus:
        return GateStatus(
            row.tenant_id, GateState(row.state), row.paused_by_run, row.since, self._pending(conn, row.tenant_id)
        )

    def _set_gate(self, conn: Connection, tenant_id: str, state: GateState, run_id: str | None) -> Row[Any]:
        return conn.execute(
            update(archive_gates)
            .where(archive_gates.c.tenant_id == tenant_id)
            .values(state=state.value, paused_by_run=run_id, since=self._now())
            .returning(*archive_gates.c)
        ).one()

    def _open_if_drained(self, conn: Connection, gate: Row[Any]) -> Row[Any]:
        if gate.state == GateState.DRAINING.value and self._pending(conn, gate.tenant_id) == 0:
            return self._set_gate(conn, gate.tenant_id, GateState.OPEN, None)
        return gate

    def gate(self, tenant_id: str) -> GateStatus:
        with self._tx("read gate", write=False) as conn:
            row = conn.execute(select(archive_gates).where(archive_gates.c.tenant_id == tenant_id)).one_or_none()
            if row is None:
                raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
            return self._gate_status(conn, row)

    def pause(self, tenant_id: str, run_id: str, *, fence: Fence | None = None) -> GateStatus:
        check_id("run id", run_id, RUN_ID)
        with self._tx("pause archive jobs") as conn:
            self._fenced(conn, fence, tenant_id)
            gate = self._lock_gate(conn, tenant_id)
            if gate.state == GateState.PAUSED.value:
                if gate.paused_by_run != run_id:
                    raise StateError(
                        f"archive jobs of tenant {tenant_id!r} are already paused by run {gate.paused_by_run!r}",
                        resource=f"gate:{tenant_id}",
                    )
            else:
                gate = self._set_gate(conn, tenant_id, GateState.PAUSED, run_id)
            return self._gate_status(conn, gate)

    def _resume(self, conn: Connection, tenant_id: str, run_id: str, fence: Fence | None) -> Row[Any]:
        self._fenced(conn, fence, tenant_id)
        gate = self._lock_gate(conn, tenant_id)
        if gate.state != GateState.PAUSED.value:
            return gate  # already resumed (idempotent)
        if gate.paused_by_run != run_id:
            raise StateError(
                f"archive jobs of tenant {tenant_id!r} were paused by run {gate.paused_by_run!r}, not {run_id!r}",
                resource=f"gate:{tenant_id}",
            )
        gate = self._set_gate(conn, tenant_id, GateState.DRAINING, run_id)
        return self._open_if_drained(conn, gate)

    def resume(self, tenant_id: str, run_id: str, *, fence: Fence | None = None) -> GateStatus:
        with self._tx("resume archive jobs") as conn:
            return self._gate_status(conn, self._resume(conn, tenant_id, run_id, fence))

    def _queue(
        self, conn: Connection, gate: Row[Any], job_id: str, payload: Mapping[str, Any], sealed: bytes | None
    ) -> None:
        position = gate.next_position + 1
        conn.execute(
            update(archive_gates).where(archive_gates.c.tenant_id == gate.tenant_id).values(next_position=position)
        )
        conn.execute(
            insert(deferred_jobs).values(
                job_id=job_id,
                tenant_id=gate.tenant_id,
                position=position,
                payload=pack_payload(payload, sealed),
                received_at=self._now(),
                state=DeferredState.DEFERRED.value,
            )
        )

    def _known_deferred(
        self, conn: Connection, tenant_id: str, job_id: str, payload: Mapping[str, Any]
    ) -> Row[Any] | None:
        row = conn.execute(select(deferred_jobs).where(deferred_jobs.c.job_id == job_id)).one_or_none()
        stored = None if row is None else submitted_payload(unpack_payload(row.payload)[0])
        if row is not None and (row.tenant_id != tenant_id or stored != dict(payload)):
            raise StateError(
                f"job id {job_id!r} was already used for another tenant or payload", resource=f"job:{job_id}"
            )
        return row

    def _try_start(self, conn: Connection, tenant_id: str, job_id: str) -> Admission:
        """The ledger decision (caller holds the gate lock)."""
        now = self._now()
        row = conn.execute(select(archive_jobs).where(archive_jobs.c.job_id == job_id)).one_or_none()
        if row is None:
            conn.execute(
                insert(archive_jobs).values(
                    job_id=job_id, tenant_id=tenant_id, state=JobState.RUNNING.value, attempt=1, started_at=now
                )
            )
            return Admission(job_id, Decision.RUN, 1)
        if row.tenant_id != tenant_id:
            raise StateError(f"job id {job_id!r} belongs to another tenant", resource=f"job:{job_id}")
        if row.state == JobState.COMPLETED.value:
            self._mark_replayed(conn, job_id)
            return Admission(job_id, Decision.DUPLICATE, row.attempt)
        if row.state == JobState.RUNNING.value and row.started_at > now - self._job_stale_after:
            return Admission(job_id, Decision.DUPLICATE, row.attempt)
        attempt = row.attempt + 1  # failed, or running but stale (its worker died): take over
        conn.execute(
            update(archive_jobs)
            .where(archive_jobs.c.job_id == job_id)
            .values(state=JobState.RUNNING.value, attempt=attempt, started_at=now, finished_at=None, error=None)
        )
        return Admission(job_id, Decision.RUN, attempt)

    def _job_is_settled(self, conn: Connection, job_id: str) -> bool:
        row = conn.execute(
            select(archive_jobs.c.state, archive_jobs.c.started_at).where(archive_jobs.c.job_id == job_id)
        ).one_or_none()
        if row is None:
            return False
        return row.state == JobState.COMPLETED.value or (
            row.state == JobState.RUNNING.value and row.started_at > self._now() - self._job_stale_after
        )

    def admit_job(
        self, tenant_id: str, job_id: str, payload: Mapping[str, Any], *, sealed: bytes | None = None
    ) -> Admission:
        check_id("job id", job_id, JOB_ID)
        payload, sealed = job_payload(payload, sealed)
        with self._tx("admit archive job") as conn:
            gate = self._lock_gate(conn, tenant_id)
            if self._known_deferred(conn, tenant_id, job_id, payload) is not None:
                return Admission(job_id, Decision.DUPLICATE)
            if self._job_is_settled(conn, job_id):
                return self._try_start(conn, tenant_id, job_id)  # DUPLICATE (checks the tenant too)
            if gate.state != GateState.OPEN.value:
                self._queue(conn, gate, job_id, payload, sealed)
                return Admission(job_id, Decision.DEFERRED)
            return self._try_start(conn, tenant_id, job_id)

    def defer(self, job: DeferredJob) -> bool:
        check_id("job id", job.job_id, JOB_ID)
        payload, sealed = job_payload(job.payload, job.sealed)
        with self._tx("defer archive job") as conn:
            gate = self._lock_gate(conn, job.tenant_id)
            if self._known_deferred(conn, job.tenant_id, job.job_id, payload) is not None:
                return False
            self._queue(conn, gate, job.job_id, payload, sealed)
            return True

    def _claim(self, conn: Connection, tenant_id: str, limit: int, reclaim_after: timedelta) -> list[DeferredJob]:
        now = self._now()
        d = deferred_jobs.c
        rows = conn.execute(
            select(deferred_jobs)
            .where(
                d.tenant_id == tenant_id,
                or_(
                    d.state == DeferredState.DEFERRED.value,
                    and_(d.state == DeferredState.CLAIMED.value, d.claimed_at <= now - reclaim_after),
                ),
            )
            .order_by(d.position)
            .limit(limit)
        ).all()
        if rows:
            conn.execute(
                update(deferred_jobs)
                .where(d.job_id.in_([r.job_id for r in rows]))
                .values(state=DeferredState.CLAIMED.value, claimed_at=now)
            )
        return [_deferred(r, state=DeferredState.CLAIMED, claimed_at=now) for r in rows]

    def claim_deferred(
        self, tenant_id: str, limit: int = 100, *, reclaim_after: timedelta = timedelta(minutes=5)
    ) -> list[DeferredJob]:
        if limit < 1:
            raise ValidationError("claim limit must be at least 1")
        with self._tx("claim deferred jobs") as conn:
            gate = self._lock_gate(conn, tenant_id)
            if gate.state == GateState.PAUSED.value:
                return []
            jobs = self._claim(conn, tenant_id, limit, reclaim_after)
            if not jobs:
                self._open_if_drained(conn, gate)
            return jobs

    def resume_and_drain(
        self, tenant_id: str, run_id: str, *, limit: int = 1000, fence: Fence | None = None
    ) -> list[DeferredJob]:
        with self._tx("resume and drain archive jobs") as conn:
            gate = self._resume(conn, tenant_id, run_id, fence)
            jobs = self._claim(conn, tenant_id, limit, timedelta(minutes=5))
            if not jobs:
                self._open_if_drained(conn, gate)
            return jobs

    def _mark_replayed(self, conn: Connection, job_id: str) -> bool:
        """Mark the queued copy replayed and purge its sealed content (the document is
        rewritten without it); the clear payload stays for resent ids."""
        d = deferred_jobs.c
        document = conn.execute(
            select(d.payload).where(d.job_id == job_id, d.state != DeferredState.REPLAYED.value)
        ).scalar_one_or_none()
        if document is None:
            return False
        res = conn.execute(
            update(deferred_jobs)
            .where(d.job_id == job_id, d.state != DeferredState.REPLAYED.value)
            .values(state=DeferredState.REPLAYED.value, replayed_at=self._now(), payload=unpack_payload(document)[0])
        )
        return res.rowcount > 0

    def mark_replayed(self, job_id: str) -> None:
        with self._tx("mark job replayed") as conn:
            tenant_id = conn.execute(select(deferred_jobs.c.tenant_id).where(deferred_jobs.c.job_id == job_id)).scalar()
            if tenant_id is None:
                raise StateError(f"no deferred job {job_id!r}", resource=f"job:{job_id}")
            gate = self._lock_gate(conn, tenant_id)
            if self._mark_replayed(conn, job_id):
                self._open_if_drained(conn, gate)

    def park_deferred(self, tenant_id: str, job_id: str, *, reason: str, actor: str) -> DeferredJob:
        now = self._now()
        parking = parking_record(reason, actor, now)
        with self._tx("park deferred job") as conn:
            gate = self._lock_gate(conn, tenant_id)
            d = deferred_jobs.c
            row = conn.execute(select(deferred_jobs).where(d.job_id == job_id)).one_or_none()
            check_parkable(tenant_id, job_id, None if row is None else _deferred(row))
            # Replayed without running. The stored document is kept as it is, seal included
            # (verbatim, even an edited one: it is the evidence), plus the parking record.
            parked = conn.execute(
                update(deferred_jobs)
                .where(d.job_id == job_id)
                .values(
                    state=DeferredState.REPLAYED.value, replayed_at=now, payload={**row.payload, PARKED_MEMBER: parking}
                )
                .returning(*deferred_jobs.c)
            ).one()
            self._open_if_drained(conn, gate)
            return _deferred(parked)

    def start_job(self, tenant_id: str, job_id: str) -> Admission:
        check_id("job id", job_id, JOB_ID)
        with self._tx("start archive job") as conn:
            gate = self._lock_gate(conn, tenant_id)
            if gate.state == GateState.PAUSED.value:
                raise StateError(
                    f"archive jobs of tenant {tenant_id!r} are paused by run {gate.paused_by_run!r}: "
                    "stop replaying; the job stays queued",
                    resource=f"gate:{tenant_id}",
                )
            return self._try_start(conn, tenant_id, job_id)

    def finish_job(
        self, job_id: str, attempt: int, *, object_count: int | None = None, error: str | None = None
    ) -> ArchiveJob:
        state = JobState.FAILED if error is not None else JobState.COMPLETED
        with self._tx("finish archive job") as conn:
            tenant_id = conn.execute(select(archive_jobs.c.tenant_id).where(archive_jobs.c.job_id == job_id)).scalar()
            if tenant_id is None:
                raise StateError(f"no archive job {job_id!r}", resource=f"job:{job_id}")
            gate = self._lock_gate(conn, tenant_id)
            row = conn.execute(select(archive_jobs).where(archive_jobs.c.job_id == job_id)).one()
            if row.attempt == attempt and row.state == state.value:
                return _job(row)  # a retried finish: same outcome already recorded
            if row.attempt != attempt or row.state != JobState.RUNNING.value:
                raise FencedError(
                    f"archive job {job_id!r} attempt {attempt} is no longer current "
                    f"(attempt {row.attempt} is {row.state})",
                    resource=f"job:{job_id}",
                )
            row = conn.execute(
                update(archive_jobs)
                .where(archive_jobs.c.job_id == job_id)
                .values(state=state.value, finished_at=self._now(), object_count=object_count, error=error)
                .returning(*archive_jobs.c)
            ).one()
            if state is JobState.COMPLETED and self._mark_replayed(conn, job_id):
                self._open_if_drained(conn, gate)
            return _job(row)

    def get_job(self, job_id: str) -> ArchiveJob | None:
        with self._tx("get archive job", write=False) as conn:
            row = conn.execute(select(archive_jobs).where(archive_jobs.c.job_id == job_id)).one_or_none()
        return None if row is None else _job(row)

    def running_jobs(self, tenant_id: str) -> list[ArchiveJob]:
        with self._tx("list running jobs", write=False) as conn:
            rows = conn.execute(
                select(archive_jobs)
                .where(archive_jobs.c.tenant_id == tenant_id, archive_jobs.c.state == JobState.RUNNING.value)
                .order_by(archive_jobs.c.started_at, archive_jobs.c.job_id)
            ).all()
        return [_job(r) for r in rows]

    def list_deferred(self, tenant_id: str, *, include_replayed: bool = False) -> list[DeferredJob]:
        q = select(deferred_jobs).where(deferred_jobs.c.tenant_id == tenant_id)
        if not include_replayed:
            q = q.where(deferred_jobs.c.state != DeferredState.REPLAYED.value)
        with self._tx("list deferred jobs", write=False) as conn:
            rows = conn.execute(q.order_by(deferred_jobs.c.position)).all()
        return [_deferred(r) for r in rows]

    # --- runs ----------------------------------------------------------------------------

    def _load_run(self, conn: Connection, run_id: str) -> MigrationRun | None:
        row = conn.execute(select(runs).where(runs.c.run_id == run_id)).one_or_none()
        if row is None:
            return None
        steps = conn.execute(select(run_steps).where(run_steps.c.run_id == run_id).order_by(run_steps.c.ordinal)).all()
        return _run(row, steps)

    def _require_run(self, conn: Connection, run_id: str) -> MigrationRun:
        run = self._load_run(conn, run_id)
        if run is None:
            raise StateError(f"no run {run_id!r}", resource=f"run:{run_id}")
        return run

    def _running_run_id(self, conn: Connection, tenant_id: str) -> str | None:
        return conn.execute(
            select(runs.c.run_id).where(runs.c.tenant_id == tenant_id, runs.c.state == RunState.RUNNING.value)
        ).scalar()

    def start_run(
        self,
        tenant_id: str,
        flow: Flow,
        *,
        mode: str,
        steps: Sequence[str],
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> tuple[MigrationRun, bool]:
        flow = member(Flow, flow, "flow")
        run_id = run_id or uuid.uuid4().hex
        check_id("run id", run_id, RUN_ID)
        check_id("mode", mode, 32)
        check_steps(steps)
        params = json_object(params or {}, "run params")
        for _ in range(3):  # a lost race on the unique index is re-read, not reported
            try:
                with self._tx("start run") as conn:
                    if (
                        conn.execute(select(tenants.c.tenant_id).where(tenants.c.tenant_id == tenant_id)).scalar()
                        is None
                    ):
                        raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
                    existing = self._load_run(conn, run_id)
                    if existing is not None:
                        if existing.tenant_id != tenant_id or existing.flow is not flow:
                            raise StateError(
                                f"run id {run_id!r} is already used by another run", resource=f"run:{run_id}"
                            )
                        return existing, False
                    active = self._running_run_id(conn, tenant_id)
                    if active is not None:
                        return self._require_run(conn, active), False
                    now = self._now()
                    conn.execute(
                        insert(runs).values(
                            run_id=run_id,
                            tenant_id=tenant_id,
                            flow=flow.value,
                            mode=mode,
                            state=RunState.RUNNING.value,
                            params=params,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                    conn.execute(
                        insert(run_steps),
                        [
                            {
                                "run_id": run_id,
                                "name": name,
                                "ordinal": i,
                                "state": StepState.PENDING.value,
                                "attempt": 0,
                            }
                            for i, name in enumerate(steps)
                        ],
                    )
                    return self._require_run(conn, run_id), True
            except _Conflict:
                continue
        raise TransientError(
            f"start run for tenant {tenant_id!r}: lost three races in a row; retry", resource=f"tenant:{tenant_id}"
        )

    def find_active_run(self, tenant_id: str) -> MigrationRun | None:
        with self._tx("find active run", write=False) as conn:
            run_id = self._running_run_id(conn, tenant_id)
            return None if run_id is None else self._load_run(conn, run_id)

    def get_run(self, run_id: str) -> MigrationRun | None:
        with self._tx("get run", write=False) as conn:
            return self._load_run(conn, run_id)

    def list_runs(
        self, tenant_id: str | None = None, *, states: Iterable[RunState] | None = None, limit: int = 100
    ) -> list[MigrationRun]:
        q = select(runs.c.run_id)
        if tenant_id is not None:
            q = q.where(runs.c.tenant_id == tenant_id)
        if states is not None:
            q = q.where(runs.c.state.in_([member(RunState, s, "run state").value for s in states]))
        q = q.order_by(runs.c.created_at.desc(), runs.c.run_id.desc()).limit(limit)
        with self._tx("list runs", write=False) as conn:
            ids = conn.execute(q).scalars().all()
            return [self._require_run(conn, i) for i in ids]

    def set_run_state(self, run_id: str, state: RunState, *, fence: Fence | None = None) -> MigrationRun:
        state = member(RunState, state, "run state")
        try:
            with self._tx("set run state") as conn:
                tenant_id = self._run_tenant(conn, run_id)
                self._fenced(conn, fence, tenant_id)
                run = self._require_run(conn, run_id)
                if run.state is state:
                    return run
                if state not in RUN_MOVES[run.state]:
                    raise StateError(
                        f"run {run_id!r} cannot move from {run.state.value} to {state.value}", resource=f"run:{run_id}"
                    )
                conn.execute(
                    update(runs).where(runs.c.run_id == run_id).values(state=state.value, updated_at=self._now())
                )
                return self._require_run(conn, run_id)
        except _Conflict:
            raise StateError(
                f"run {run_id!r} cannot resume: its tenant has another running run", resource=f"run:{run_id}"
            ) from None

    def _run_tenant(self, conn: Connection, run_id: str) -> str:
        tenant_id = conn.execute(select(runs.c.tenant_id).where(runs.c.run_id == run_id)).scalar()
        if tenant_id is None:
            raise StateError(f"no run {run_id!r}", resource=f"run:{run_id}")
        return str(tenant_id)

    def update_step(
        self,
        run_id: str,
        step: str,
        state: StepState,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        fence: Fence | None = None,
    ) -> StepRecord:
        state = member(StepState, state, "step state")
        result = None if result is None else json_object(result, "step result")
        with self._tx("update step") as conn:
            tenant_id = self._run_tenant(conn, run_id)
            self._fenced(conn, fence, tenant_id)
            run_state = conn.execute(select(runs.c.state).where(runs.c.run_id == run_id)).scalar_one()
            if run_state != RunState.RUNNING.value:
                raise StateError(
                    f"run {run_id!r} is {run_state}; steps change only while it is running", resource=f"run:{run_id}"
                )
            row = conn.execute(
                select(run_steps).where(run_steps.c.run_id == run_id, run_steps.c.name == step)
            ).one_or_none()
            if row is None:
                raise StateError(f"run {run_id!r} has no step {step!r}", resource=f"run:{run_id}")
            values = step_transition(row.state, state, row.attempt, result, error, self._now(), run_id, step)
            if values is None:
                return _step(row)
            row = conn.execute(
                update(run_steps)
                .where(run_steps.c.run_id == run_id, run_steps.c.name == step)
                .values(**values)
                .returning(*run_steps.c)
            ).one()
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(updated_at=self._now()))
            return _step(row)

    def reset_steps(self, run_id: str, from_step: str, *, fence: Fence | None = None) -> MigrationRun:
        with self._tx("reset steps") as conn:
            tenant_id = self._run_tenant(conn, run_id)
            self._fenced(conn, fence, tenant_id)
            ordinal = conn.execute(
                select(run_steps.c.ordinal).where(run_steps.c.run_id == run_id, run_steps.c.name == from_step)
            ).scalar()
            if ordinal is None:
                raise StateError(f"run {run_id!r} has no step {from_step!r}", resource=f"run:{run_id}")
            names = (
                conn.execute(
                    select(run_steps.c.name).where(run_steps.c.run_id == run_id, run_steps.c.ordinal >= ordinal)
                )
                .scalars()
                .all()
            )
            conn.execute(delete(checkpoints).where(checkpoints.c.run_id == run_id, checkpoints.c.step.in_(names)))
            conn.execute(
                update(run_steps)
                .where(run_steps.c.run_id == run_id, run_steps.c.ordinal >= ordinal)
                .values(state=StepState.PENDING.value, started_at=None, finished_at=None, result=None, error=None)
            )
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(updated_at=self._now()))
            return self._require_run(conn, run_id)

    def save_checkpoint(
        self, run_id: str, step: str, shard: int, cursor: Mapping[str, Any], *, fence: Fence | None = None
    ) -> None:
        cursor = json_object(cursor, "checkpoint cursor")
        try:
            with self._tx("save checkpoint") as conn:
                tenant_id = self._run_tenant(conn, run_id)
                self._fenced(conn, fence, tenant_id)
                now = self._now()
                stmt = self._insert(checkpoints).values(
                    run_id=run_id, step=step, shard=shard, cursor=cursor, updated_at=now
                )
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["run_id", "step", "shard"], set_={"cursor": cursor, "updated_at": now}
                    )
                )
        except _Conflict:
            raise StateError(f"run {run_id!r} has no step {step!r}", resource=f"run:{run_id}") from None

    def load_checkpoints(self, run_id: str, step: str) -> dict[int, dict[str, Any]]:
        with self._tx("load checkpoints", write=False) as conn:
            rows = conn.execute(
                select(checkpoints.c.shard, checkpoints.c.cursor).where(
                    checkpoints.c.run_id == run_id, checkpoints.c.step == step
                )
            ).all()
        return {int(r.shard): dict(r.cursor) for r in rows}

    # --- manifests and copy ledger -------------------------------------------------------

    def create_manifest(self, run_id: str, source: Mapping[str, Any], *, fence: Fence | None = None) -> None:
        source = json_object(source, "manifest source")
        with self._tx("create manifest") as conn:
            tenant_id = self._run_tenant(conn, run_id)
            self._fenced(conn, fence, tenant_id)
            existing = conn.execute(select(manifests.c.source).where(manifests.c.run_id == run_id)).scalar()
            if existing is not None:
                if dict(existing) != source:
                    raise StateError(
                        f"run {run_id!r} already has a manifest of another source", resource=f"run:{run_id}"
                    )
                return
            conn.execute(
                insert(manifests).values(run_id=run_id, tenant_id=tenant_id, source=source, created_at=self._now())
            )

    def add_manifest_entries(self, run_id: str, entries: Iterable[ManifestEntry], *, fence: Fence | None = None) -> int:
        batch: dict[bytes, ManifestEntry] = {}
        for e in entries:
            check_entry(e)
            prior = batch.get(e.name)
            if prior is not None and prior != e:
                raise StateError(
                    f"manifest of run {run_id!r} lists object {e.name!r} twice with different attributes",
                    resource=f"run:{run_id}",
                )
            batch[e.name] = e
        if not batch:
            return 0
        try:
            with self._tx("add manifest entries") as conn:
                tenant_id = conn.execute(select(manifests.c.tenant_id).where(manifests.c.run_id == run_id)).scalar()
                if tenant_id is None:
                    raise StateError(
                        f"run {run_id!r} has no manifest (create_manifest first)", resource=f"run:{run_id}"
                    )
                self._fenced(conn, fence, tenant_id)
                names = list(batch)
                existing: dict[bytes, ManifestEntry] = {}
                for i in range(0, len(names), 500):
                    for r in conn.execute(
                        select(manifest_entries).where(
                            manifest_entries.c.run_id == run_id, manifest_entries.c.name.in_(names[i : i + 500])
                        )
                    ).all():
                        existing[bytes(r.name)] = _entry(r)
                for name, prior in existing.items():
                    if prior != batch[name]:
                        raise StateError(
                            f"object {name!r} is already in the manifest of run {run_id!r} with other "
                            "attributes (size/etag/shard/digest)",
                            resource=f"run:{run_id}",
                        )
                new = [e for n, e in batch.items() if n not in existing]
                if new:
                    conn.execute(
                        insert(manifest_entries),
                        [
                            {
                                "run_id": run_id,
                                "name": e.name,
                                "shard": e.shard,
                                "size": e.size,
                                "etag": e.etag,
                                "plaintext_sha256": e.plaintext_sha256,
                            }
                            for e in new
                        ],
                    )
                return len(new)
        except _Conflict:
            raise TransientError(
                f"manifest of run {run_id!r} was extended concurrently; retry", resource=f"run:{run_id}"
            ) from None

    def manifest_summary(self, run_id: str) -> ManifestSummary | None:
        with self._tx("manifest summary", write=False) as conn:
            m = conn.execute(select(manifests).where(manifests.c.run_id == run_id)).one_or_none()
            if m is None:
                return None
            e = manifest_entries.c
            agg = conn.execute(
                select(func.count(), func.coalesce(func.sum(e.size), 0), func.count(func.distinct(e.shard))).where(
                    e.run_id == run_id
                )
            ).one()
        return ManifestSummary(run_id, m.tenant_id, dict(m.source), m.created_at, int(agg[0]), int(agg[1]), int(agg[2]))

    def _pages(
        self, op: str, make_query: Callable[[bytes | None], Any], page_size: int, convert: Callable[[Row[Any]], Any]
    ) -> Iterator[Any]:
        """Keyset pagination on object name: no transaction is held between pages."""
        last: bytes | None = None
        while True:
            with self._tx(op, write=False) as conn:
                rows = conn.execute(make_query(last).limit(page_size)).all()
            for r in rows:
                yield convert(r)
            if len(rows) < page_size:
                return
            last = bytes(rows[-1].name)

    def iter_manifest(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        e = manifest_entries.c

        def query(after: bytes | None) -> Any:
            q = select(manifest_entries).where(e.run_id == run_id)
            if shard is not None:
                q = q.where(e.shard == shard)
            if after is not None:
                q = q.where(e.name > after)
            return q.order_by(e.name)

        return self._pages("read manifest", query, page_size, _entry)

    def record_copy(self, run_id: str, record: CopyRecord, *, fence: Fence | None = None) -> None:
        self.record_copies(run_id, [record], fence=fence)

    def record_copies(self, run_id: str, records: Sequence[CopyRecord], *, fence: Fence | None = None) -> None:
        if not records:
            return
        now = self._now()
        rows = []
        for record in records:
            status = member(CopyStatus, record.status, "copy status")
            rows.append(
                {
                    "status": status.value,
                    "dest_etag": record.dest_etag,
                    "dest_size": record.dest_size,
                    "plaintext_sha256": record.plaintext_sha256,
                    "error": record.error,
                    "updated_at": now,
                }
            )
        try:
            with self._tx("record copy") as conn:
                tenant_id = self._run_tenant(conn, run_id)
                self._fenced(conn, fence, tenant_id)
                for record, values in zip(records, rows, strict=True):
                    stmt = self._insert(copy_ledger).values(run_id=run_id, name=bytes(record.name), **values)
                    conn.execute(stmt.on_conflict_do_update(index_elements=["run_id", "name"], set_=values))
        except _Conflict:
            names = ", ".join(repr(r.name[:80]) for r in records[:3])
            raise StateError(
                f"object(s) {names}{' ...' if len(records) > 3 else ''} not all in the manifest of "
                f"run {run_id!r}; nothing recorded",
                resource=f"run:{run_id}",
            ) from None

    def get_copy(self, run_id: str, name: bytes) -> CopyRecord | None:
        with self._tx("get copy", write=False) as conn:
            row = conn.execute(
                select(copy_ledger).where(copy_ledger.c.run_id == run_id, copy_ledger.c.name == bytes(name))
            ).one_or_none()
        return None if row is None else _copy(row)

    def iter_copies(
        self, run_id: str, *, status: CopyStatus | None = None, shard: int | None = None, page_size: int = 1000
    ) -> Iterator[CopyRecord]:
        c, e = copy_ledger.c, manifest_entries.c

        def query(after: bytes | None) -> Any:
            q = select(copy_ledger).where(c.run_id == run_id)
            if shard is not None:
                q = q.join(manifest_entries, (e.run_id == c.run_id) & (e.name == c.name)).where(e.shard == shard)
            if status is not None:
                q = q.where(c.status == member(CopyStatus, status, "copy status").value)
            if after is not None:
                q = q.where(c.name > after)
            return q.order_by(c.name)

        return self._pages("read copy ledger", query, page_size, _copy)

    def copy_counts(self, run_id: str) -> dict[CopyStatus, int]:
        with self._tx("count copies", write=False) as conn:
            rows = conn.execute(
                select(copy_ledger.c.status, func.count())
                .where(copy_ledger.c.run_id == run_id)
                .group_by(copy_ledger.c.status)
            ).all()
        return {CopyStatus(s): int(n) for s, n in rows}

    def iter_uncopied(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        e, c = manifest_entries.c, copy_ledger.c
        done = [CopyStatus.COPIED.value, CopyStatus.VERIFIED.value]

        def query(after: bytes | None) -> Any:
            q = (
                select(manifest_entries)
                .select_from(manifest_entries.outerjoin(copy_ledger, and_(c.run_id == e.run_id, c.name == e.name)))
                .where(e.run_id == run_id, or_(c.status.is_(None), c.status.not_in(done)))
            )
            if shard is not None:
                q = q.where(e.shard == shard)
            if after is not None:
                q = q.where(e.name > after)
            return q.order_by(e.name)

        return self._pages("read uncopied objects", query, page_size, _entry)

    # --- leases --------------------------------------------------------------------------

    def acquire_lease(self, tenant_id: str, run_id: str, ttl: timedelta) -> Lease:
        check_id("run id", run_id, RUN_ID)
        if ttl <= timedelta(0):
            raise ValidationError("lease ttl must be positive")
        L = tenant_leases.c  # noqa: N806 - the table's columns, as in SQLAlchemy docs
        try:
            with self._tx("acquire lease") as conn:
                now = self._now()
                row = conn.execute(
                    self._insert(tenant_leases)
                    .values(tenant_id=tenant_id, run_id=run_id, token=1, acquired_at=now, expires_at=now + ttl)
                    .on_conflict_do_nothing(index_elements=["tenant_id"])
                    .returning(*tenant_leases.c)
                ).one_or_none()
                if row is None:
                    # Conditional takeover: PostgreSQL re-checks the WHERE on the newest row
                    # version after waiting for a concurrent taker, so exactly one wins.
                    row = conn.execute(
                        update(tenant_leases)
                        .where(
                            L.tenant_id == tenant_id,
                            or_(L.expires_at <= now, L.released_at.is_not(None), L.run_id == run_id),
                        )
                        .values(
                            run_id=run_id, token=L.token + 1, acquired_at=now, expires_at=now + ttl, released_at=None
                        )
                        .returning(*tenant_leases.c)
                    ).one_or_none()
                if row is None:
                    holder = conn.execute(select(tenant_leases).where(L.tenant_id == tenant_id)).one()
                    raise LeaseHeldError(
                        f"tenant {tenant_id!r} is held by run {holder.run_id!r} until {holder.expires_at.isoformat()}",
                        resource=f"lease:{tenant_id}",
                    )
                return _lease(row)
        except _Conflict:
            raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}") from None

    def renew_lease(self, lease: Lease, ttl: timedelta) -> Lease:
        if ttl <= timedelta(0):
            raise ValidationError("lease ttl must be positive")
        L = tenant_leases.c  # noqa: N806 - the table's columns, as in SQLAlchemy docs
        with self._tx("renew lease") as conn:
            row = conn.execute(
                update(tenant_leases)
                .where(L.tenant_id == lease.tenant_id, L.token == lease.token, L.released_at.is_(None))
                .values(expires_at=self._now() + ttl)
                .returning(*tenant_leases.c)
            ).one_or_none()
            if row is None:
                current = conn.execute(select(tenant_leases).where(L.tenant_id == lease.tenant_id)).one_or_none()
                check_token(current, lease.tenant_id, lease.token)  # raises: the UPDATE matched nothing
                raise FencedError(
                    f"lease of tenant {lease.tenant_id!r} token {lease.token} is gone",
                    resource=f"lease:{lease.tenant_id}",
                )
            return _lease(row)

    def release_lease(self, lease: Lease) -> bool:
        L = tenant_leases.c  # noqa: N806 - the table's columns, as in SQLAlchemy docs
        with self._tx("release lease") as conn:
            res = conn.execute(
                update(tenant_leases)
                .where(L.tenant_id == lease.tenant_id, L.token == lease.token, L.released_at.is_(None))
                .values(released_at=self._now())
            )
            return res.rowcount > 0

    def get_lease(self, tenant_id: str) -> Lease | None:
        with self._tx("read lease", write=False) as conn:
            row = conn.execute(
                select(tenant_leases).where(
                    tenant_leases.c.tenant_id == tenant_id, tenant_leases.c.released_at.is_(None)
                )
            ).one_or_none()
        return None if row is None else _lease(row)

    def check_fence(self, tenant_id: str, token: int) -> None:
        with self._tx("check fence", write=False) as conn:
            row = conn.execute(select(tenant_leases).where(tenant_leases.c.tenant_id == tenant_id)).one_or_none()
            check_token(row, tenant_id, token)

    # --- audit ---------------------------------------------------------------------------

    def _head(self, conn: Connection, name: str, *, lock: bool) -> Row[Any] | None:
        q = select(audit_heads).where(audit_heads.c.chain == name)
        return conn.execute(q.with_for_update() if lock else q).one_or_none()

    def _write_head(self, conn: Connection, name: str, count: int, head_hash: str, now: datetime, exists: bool) -> None:
        h = chain.seal_head(self._sealer, name, count, head_hash)
        values = {
            "count": count,
            "head_hash": head_hash,
            "seal": h.seal,
            "seal_alg": h.seal_alg,
            "seal_key_id": h.seal_key_id,
            "updated_at": now,
        }
        if exists:
            conn.execute(update(audit_heads).where(audit_heads.c.chain == name).values(**values))
        else:
            conn.execute(insert(audit_heads).values(chain=name, **values))

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        check_id("audit actor", event.actor, 255)
        check_id("audit action", event.action, 128)
        if event.tenant_id is not None:
            check_id("tenant id", event.tenant_id, 128)
        if event.run_id is not None:
            check_id("run id", event.run_id, RUN_ID)
        details_text = chain.canonical_json(dict(event.details))
        details = json.loads(details_text)  # what a reader will get back, so the hash covers exactly that
        with self._tx("append audit record") as conn:
            head = self._head(conn, chain.GLOBAL_CHAIN, lock=True)  # serialises appends: one chain
            if head is None:
                raise StateError(
                    "the audit chain head is missing: run `archive-kms audit verify`", resource="audit:global"
                )
            t_head = None
            if event.tenant_id is not None:
                t_head = self._head(conn, chain.tenant_chain(event.tenant_id), lock=True)
            now = self._now()
            fields: dict[str, Any] = {
                "seq": head.count + 1,
                "ts": now,
                "actor": event.actor,
                "action": event.action,
                "tenant_id": event.tenant_id,
                "run_id": event.run_id,
                "details": details,
                "prev_hash": head.head_hash,
                "tenant_seq": None if event.tenant_id is None else (t_head.count + 1 if t_head else 1),
                "tenant_prev_hash": None
                if event.tenant_id is None
                else (t_head.head_hash if t_head else chain.GENESIS),
            }
            digest = chain.record_hash(**fields)
            conn.execute(insert(audit_log).values(**(fields | {"details": details_text, "hash": digest})))
            self._write_head(conn, chain.GLOBAL_CHAIN, fields["seq"], digest, now, exists=True)
            if event.tenant_id is not None:
                self._write_head(
                    conn,
                    chain.tenant_chain(event.tenant_id),
                    fields["tenant_seq"],
                    digest,
                    now,
                    exists=t_head is not None,
                )
        return AuditRecord(**fields, hash=digest)

    def iter_audit(
        self, *, tenant_id: str | None = None, after_seq: int = 0, page_size: int = 1000
    ) -> Iterator[AuditRecord]:
        a = audit_log.c
        last = after_seq
        while True:
            q = select(audit_log).where(a.seq > last)
            if tenant_id is not None:
                q = q.where(a.tenant_id == tenant_id)
            with self._tx("read audit log", write=False) as conn:
                rows = conn.execute(q.order_by(a.seq).limit(page_size)).all()
            for r in rows:
                yield _audit(r)
            if len(rows) < page_size:
                return
            last = rows[-1].seq

    def _heads(self, conn: Connection, tenant_id: str | None) -> dict[str, chain.ChainHead]:
        q = select(audit_heads)
        if tenant_id is not None:
            q = q.where(audit_heads.c.chain == chain.tenant_chain(tenant_id))
        return {
            r.chain: chain.ChainHead(r.chain, r.count, r.head_hash, r.seal, r.seal_alg, r.seal_key_id)
            for r in conn.execute(q).all()
        }

    def verify_audit(self, *, tenant_id: str | None = None) -> AuditVerification:
        verifier = chain.ChainVerifier(tenant_id=tenant_id)
        # One snapshot for heads and records, so concurrent appends cannot look like tampering.
        with self._tx("verify audit log", write=False, snapshot=True) as conn:
            heads = self._heads(conn, tenant_id)
            q = select(audit_log)
            if tenant_id is not None:
                q = q.where(audit_log.c.tenant_id == tenant_id)
            result = conn.execute(q.order_by(audit_log.c.seq).execution_options(yield_per=1000))
            try:
                for row in result:
                    try:
                        rec = _audit(row)
                    except (ValueError, TypeError) as exc:
                        return verifier.fail(row.seq, f"record {row.seq} is malformed: {type(exc).__name__}")
                    if verifier.feed(rec) is not None:
                        break
            finally:
                result.close()
        return verifier.finish(heads, self._sealer)

    def reseal_audit_heads(self) -> AuditVerification:
        if self._sealer is None:
            raise ConfigurationError("reseal needs a head sealer: open the store with sealer=...")
        verifier = chain.ChainVerifier()
        with self._tx("reseal audit heads") as conn:
            self._head(conn, chain.GLOBAL_CHAIN, lock=True)  # appends wait until the reseal commits
            heads = self._heads(conn, None)
            result = conn.execute(select(audit_log).order_by(audit_log.c.seq).execution_options(yield_per=1000))
            try:
                for row in result:
                    if verifier.feed(_audit(row)) is not None:
                        break
            finally:
                result.close()
            outcome = verifier.finish(heads, None)
            if not outcome.ok:
                return outcome
            now = self._now()
            for h in heads.values():
                self._write_head(conn, h.chain, h.count, h.head_hash, now, exists=True)
        return replace(outcome, sealed=True)

    def export_audit(self, tenant_id: str | None = None) -> Iterator[dict[str, Any]]:
        with self._tx("read audit heads", write=False) as conn:
            heads = self._heads(conn, tenant_id)
        name = chain.GLOBAL_CHAIN if tenant_id is None else chain.tenant_chain(tenant_id)
        limit = heads[name].count if name in heads else 0
        # Records are immutable, so paging up to the heads read above is consistent.
        for rec in self.iter_audit(tenant_id=tenant_id):
            position = rec.seq if tenant_id is None else rec.tenant_seq
            if position is not None and position > limit:
                break
            yield chain.record_to_json(rec)
        if name not in heads:
            heads[name] = chain.ChainHead(name, 0, chain.GENESIS)
        for h in sorted(heads, key=lambda c: (c == chain.GLOBAL_CHAIN, c)):  # global last
            yield heads[h].to_json()


# --- row ↔ record ------------------------------------------------------------------------


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _tenant_values(t: TenantRecord) -> dict[str, Any]:
    return {
        "tenant_id": t.tenant_id,
        "key_mode": member(KeyMode, t.key_mode, "key mode").value,
        "key_ref": t.key_ref,
        "location": json_object(t.location, "tenant location"),
        "index_alias": t.index_alias,
        "index_generation": t.index_generation,
        "revoked": bool(t.revoked),
    }


def _tenant(r: Row[Any]) -> TenantRecord:
    return TenantRecord(
        tenant_id=r.tenant_id,
        key_mode=KeyMode(r.key_mode),
        location=dict(r.location),
        key_ref=r.key_ref,
        index_alias=r.index_alias,
        index_generation=r.index_generation,
        revoked=bool(r.revoked),
        version=r.version,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def _deferred(r: Row[Any], **override: Any) -> DeferredJob:
    payload, sealed = unpack_payload(r.payload)
    values = {
        "job_id": r.job_id,
        "tenant_id": r.tenant_id,
        "payload": payload,
        "sealed": sealed,
        "received_at": r.received_at,
        "state": DeferredState(r.state),
        "position": int(r.position),
        "claimed_at": r.claimed_at,
        "replayed_at": r.replayed_at,
    }
    return DeferredJob(**(values | override))


def _job(r: Row[Any]) -> ArchiveJob:
    return ArchiveJob(
        job_id=r.job_id,
        tenant_id=r.tenant_id,
        state=JobState(r.state),
        attempt=r.attempt,
        started_at=r.started_at,
        finished_at=r.finished_at,
        object_count=None if r.object_count is None else int(r.object_count),
        error=r.error,
    )


def _step(r: Row[Any]) -> StepRecord:
    return StepRecord(
        run_id=r.run_id,
        name=r.name,
        ordinal=r.ordinal,
        state=StepState(r.state),
        attempt=r.attempt,
        started_at=r.started_at,
        finished_at=r.finished_at,
        result=None if r.result is None else dict(r.result),
        error=r.error,
    )


def _run(r: Row[Any], steps: Sequence[Row[Any]]) -> MigrationRun:
    return MigrationRun(
        run_id=r.run_id,
        tenant_id=r.tenant_id,
        flow=Flow(r.flow),
        mode=r.mode,
        state=RunState(r.state),
        params=dict(r.params),
        created_at=r.created_at,
        updated_at=r.updated_at,
        steps=tuple(_step(s) for s in steps),
    )


def _entry(r: Row[Any]) -> ManifestEntry:
    return ManifestEntry(
        name=bytes(r.name), size=int(r.size), shard=r.shard, etag=r.etag, plaintext_sha256=r.plaintext_sha256
    )


def _copy(r: Row[Any]) -> CopyRecord:
    return CopyRecord(
        name=bytes(r.name),
        status=CopyStatus(r.status),
        dest_etag=r.dest_etag,
        dest_size=None if r.dest_size is None else int(r.dest_size),
        plaintext_sha256=r.plaintext_sha256,
        error=r.error,
        updated_at=r.updated_at,
    )


def _lease(r: Row[Any]) -> Lease:
    return Lease(
        tenant_id=r.tenant_id, run_id=r.run_id, token=int(r.token), acquired_at=r.acquired_at, expires_at=r.expires_at
    )


def _audit(r: Row[Any]) -> AuditRecord:
    return AuditRecord(
        seq=int(r.seq),
        ts=r.ts,
        actor=r.actor,
        action=r.action,
        tenant_id=r.tenant_id,
        run_id=r.run_id,
        details=json.loads(r.details),
        prev_hash=r.prev_hash,
        tenant_seq=None if r.tenant_seq is None else int(r.tenant_seq),
        tenant_prev_hash=r.tenant_prev_hash,
        hash=r.hash,
    )
