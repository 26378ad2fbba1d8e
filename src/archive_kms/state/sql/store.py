"""``SqlStateStore``: the whole ``StateStore`` on one SQL database, composed of one
repository per aggregate (``tenants``, ``gate``, ``runs``, ``ledger``, ``leases``,
``audit_log``) over a shared :class:`SqlDatabase`; and ``open_state(url)``, which opens
it and brings the schema up to date."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, func, insert, select

from archive_kms import retry
from archive_kms.errors import ConfigurationError
from archive_kms.state import audit as chain
from archive_kms.state.schema import SCHEMA_VERSION, audit_heads, metadata, schema_version
from archive_kms.state.sql.audit_log import SqlAuditLog
from archive_kms.state.sql.database import (
    DEFAULT_BUSY_TIMEOUT_S,
    DEFAULT_JOB_STALE_AFTER,
    Clock,
    SqlDatabase,
    SqlRepository,
    make_engine,
)
from archive_kms.state.sql.gate import SqlGateRepo
from archive_kms.state.sql.keychain import SqlKeychainStore
from archive_kms.state.sql.leases import SqlLeaseRepo
from archive_kms.state.sql.ledger import SqlLedgerRepo
from archive_kms.state.sql.runs import SqlRunRepo
from archive_kms.state.sql.tenants import SqlTenantRepo

__all__ = ["SqlStateStore", "open_state"]

_SCHEMA_RETRY = retry.Backoff(max_attempts=5, base_delay=0.2, max_delay=1.6)
_SCHEMA_LOCK_KEY = 0x41_4B_4D_53  # "AKMS": serialises concurrent schema creation on PostgreSQL


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


class SqlStateStore(SqlTenantRepo, SqlGateRepo, SqlRunRepo, SqlLedgerRepo, SqlLeaseRepo, SqlAuditLog):
    """``StateStore`` over one SQLAlchemy Engine (thread-safe; share one per process).
    Each base class is one aggregate's repository and works on its own over the same
    :class:`SqlDatabase`; this class only puts them on one database."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock | None = None,
        sealer: chain.HeadSealer | None = None,
        job_stale_after: timedelta = DEFAULT_JOB_STALE_AFTER,
    ) -> None:
        db = SqlDatabase(engine, clock=clock)
        SqlRepository.__init__(self, db)
        SqlGateRepo.__init__(self, db, job_stale_after=job_stale_after)
        SqlAuditLog.__init__(self, db, sealer=sealer)
        self.dialect = db.dialect

    def __repr__(self) -> str:
        return f"SqlStateStore({self._db.display})"

    @property
    def engine(self) -> Engine:
        return self._db.engine

    @property
    def database(self) -> SqlDatabase:
        return self._db

    def close(self) -> None:
        self._db.engine.dispose()

    def keychain_store(self) -> SqlKeychainStore:
        """The ``KeychainStore`` on this database (``state.sql.keychain``)."""
        return SqlKeychainStore(self)

    def create_schema(self) -> None:
        """Create missing tables, record the schema version, seed the global audit head.

        Many processes may open a new SQLite file at once; SQLite can report "locked"
        at once (not after the busy timeout) while another connection switches the file
        to WAL, so the creation is retried a few times (``archive_kms.retry``: 5 attempts,
        backoff from 0.2 s) before the error stands."""
        retry.call(self._create_schema_once, backoff=_SCHEMA_RETRY, what=f"{self._db.display}: create schema")

    def _create_schema_once(self) -> None:
        now = self._now()
        with self._tx("create schema") as conn:
            if self._db.pg:
                conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
            metadata.create_all(conn, checkfirst=True)
            found = conn.execute(select(func.max(schema_version.c.version))).scalar()
            if found is None:
                conn.execute(insert(schema_version).values(version=SCHEMA_VERSION, applied_at=now))
            elif found != SCHEMA_VERSION:
                raise ConfigurationError(
                    f"state store {self._db.display} has schema version {found}, this code needs "
                    f"{SCHEMA_VERSION}: {'upgrade the code' if found > SCHEMA_VERSION else 'migrate the database'}",
                    resource=self._db.display,
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
