"""``SqlStateStore``: the whole ``StateStore`` on one SQL database, composed of one
repository per aggregate (``tenants``, ``gate``, ``runs``, ``ledger``, ``leases``,
``audit_log``, ``lifecycle``, ``key_lifecycle``) over a shared :class:`SqlDatabase`; and ``open_state(url)``, which opens
it and brings the schema up to date. (``SqlJobLeaseRepo`` is the gate's repository with
the job leases of ADR 0020 added.)"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine

from archive_kms import retry
from archive_kms.state import audit as chain
from archive_kms.state.schema import audit_heads
from archive_kms.state.sql import migrate
from archive_kms.state.sql.audit_log import SqlAuditLog
from archive_kms.state.sql.database import (
    DEFAULT_BUSY_TIMEOUT_S,
    DEFAULT_JOB_STALE_AFTER,
    DEFAULT_POOL,
    Clock,
    PoolLimits,
    SqlDatabase,
    SqlRepository,
    make_engine,
)
from archive_kms.state.sql.gate import SqlGateRepo
from archive_kms.state.sql.job_leases import SqlJobLeaseRepo
from archive_kms.state.sql.key_lifecycle import SqlKeyWatchRepo, SqlWarningRepo
from archive_kms.state.sql.keychain import SqlKeychainStore
from archive_kms.state.sql.leases import SqlLeaseRepo
from archive_kms.state.sql.ledger import SqlLedgerRepo
from archive_kms.state.sql.lifecycle import SqlLifecycleRepo
from archive_kms.state.sql.runs import SqlRunRepo
from archive_kms.state.sql.search_generations import SqlSearchGenerationRepo
from archive_kms.state.sql.tenants import SqlTenantRepo

__all__ = ["SqlStateStore", "open_state"]

_SCHEMA_RETRY = retry.Backoff(max_attempts=5, base_delay=0.2, max_delay=1.6)


def open_state(
    url: str,
    *,
    clock: Clock | None = None,
    sealer: chain.HeadSealer | None = None,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    job_stale_after: timedelta = DEFAULT_JOB_STALE_AFTER,
    upgrade: bool = False,
    pool: PoolLimits = DEFAULT_POOL,
    echo: bool = False,
) -> SqlStateStore:
    """Open the state store at ``url``. An empty database gets the schema (safe to race
    from many processes); a database from before Alembic is stamped at the baseline; one
    whose schema is behind this code is refused (``ConfigurationError``: run
    ``archive-kms db upgrade``) unless ``upgrade``; one from a newer release is refused
    (``state.sql.migrate``). ``sealer`` seals audit chain heads (and is then required by
    ``verify_audit``). ``pool`` bounds a PostgreSQL connection pool
    (``Settings.state_pool_*`` through ``Platform.from_settings``)."""
    engine = make_engine(url, busy_timeout_s=busy_timeout_s, pool=pool, echo=echo)
    store = SqlStateStore(engine, clock=clock, sealer=sealer, job_stale_after=job_stale_after)
    try:
        store.prepare_schema(upgrade=upgrade)
    except BaseException:
        store.close()
        raise
    return store


class SqlStateStore(
    SqlTenantRepo,
    SqlJobLeaseRepo,
    SqlRunRepo,
    SqlLedgerRepo,
    SqlLeaseRepo,
    SqlAuditLog,
    SqlSearchGenerationRepo,
    SqlLifecycleRepo,
    SqlWarningRepo,
    SqlKeyWatchRepo,
):
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

    def prepare_schema(self, *, upgrade: bool = False) -> migrate.SchemaStatus:
        """Bring an empty or pre-Alembic database to the current schema (``upgrade``: also
        one behind it), refuse one this code cannot use (``migrate.prepare``), and seed the
        global audit chain head.

        Many processes may open a new SQLite file at once; SQLite can report "locked"
        at once (not after the busy timeout) while another connection switches the file
        to WAL, so this is retried a few times (``archive_kms.retry``: 5 attempts,
        backoff from 0.2 s) before the error stands."""

        def once() -> migrate.SchemaStatus:
            found = migrate.prepare(self._db, upgrade=upgrade)
            with self._tx("seed audit head") as conn:
                conn.execute(
                    self._insert(audit_heads)
                    .values(chain=chain.GLOBAL_CHAIN, count=0, head_hash=chain.GENESIS, updated_at=self._now())
                    .on_conflict_do_nothing(index_elements=["chain"])
                )
            return found

        return retry.call(once, backoff=_SCHEMA_RETRY, what=f"{self._db.display}: prepare schema")
