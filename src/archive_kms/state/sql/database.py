"""The SQL database under every state repository: the Engine (SQLite or PostgreSQL), one
transaction per call, and vendor errors translated into ours.

* SQLite: WAL, ``foreign_keys=ON``, busy timeout, ``synchronous=FULL``; SQLAlchemy emits
  ``BEGIN`` itself (``BEGIN IMMEDIATE`` for writes: one writer at a time, never the
  deadlock-prone read→write upgrade; a deferred ``BEGIN`` for reads, a WAL snapshot).
* PostgreSQL (psycopg 3): READ COMMITTED, ``lock_timeout`` = busy timeout, pre-ping;
  ``snapshot=True`` reads in REPEATABLE READ.
* A transaction PostgreSQL aborted to settle a conflict with a concurrent one
  (serialization failure, deadlock) → :class:`TransactionAbortedError`; nothing of it was
  committed, and every public repository method is one transaction, so the method is run
  again, whole, through ``archive_kms.retry`` (:func:`retry_aborted`). Callers see it only
  when the retries ran out.
* Lock/busy timeouts → ``TransientError``; the connection pool exhausted → ``TransientError``
  naming the pool settings; the database not answering → ``ServiceUnavailableError`` (all
  retryable, naming the database with its password hidden); a constraint refusing a write →
  :class:`Conflict`, which repositories turn into the domain error that says what it means.
* The connection pool (PostgreSQL) is bounded: ``pool_size`` connections kept, at most
  ``max_overflow`` more, and a caller waits ``pool_timeout`` seconds for one
  (``Settings.state_pool_*``; docs/state-store.md "Connection pool").
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from archive_kms import retry
from archive_kms.config import setting_default
from archive_kms.errors import ConfigurationError, FencedError, ServiceUnavailableError, StateError, TransientError
from archive_kms.state._common import check_token
from archive_kms.state.port import DEFAULT_JOB_LEASE_TTL, Fence
from archive_kms.state.schema import runs, tenant_leases

__all__ = [
    "ABORTED_TX_RETRY",
    "DEFAULT_BUSY_TIMEOUT_S",
    "DEFAULT_JOB_STALE_AFTER",
    "DEFAULT_POOL",
    "Clock",
    "Conflict",
    "PoolLimits",
    "SqlDatabase",
    "SqlRepository",
    "TransactionAbortedError",
    "make_engine",
    "retry_aborted",
    "retry_aborted_transactions",
]

Clock = Callable[[], datetime]
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
_retrying = threading.local()  # .active: an outer method of this thread retries already

DEFAULT_BUSY_TIMEOUT_S = 30.0
DEFAULT_JOB_STALE_AFTER = DEFAULT_JOB_LEASE_TTL  # the older name of the job lease TTL (ADR 0020)

#: SQLSTATEs of a transaction PostgreSQL rolled back to settle a conflict: running it again
#: is safe and usually succeeds (serialization_failure, deadlock_detected).
ABORTED_SQLSTATES = ("40001", "40P01")
#: How often and how fast an aborted transaction is run again: 8 attempts, 20 ms doubling
#: to at most 1 s, equal jitter (so two transactions that deadlocked do not collide again).
ABORTED_TX_RETRY = retry.Backoff(max_attempts=8, base_delay=0.02, max_delay=1.0)


@dataclass(frozen=True)
class PoolLimits:
    """The PostgreSQL connection pool of one process: ``size`` connections kept open, at
    most ``max_overflow`` more under load, and a caller waits ``timeout`` seconds for one
    before a retryable ``TransientError``. A process never holds more than
    ``size + max_overflow`` connections (docs/state-store.md "Connection pool")."""

    size: int = setting_default("state_pool_size")
    max_overflow: int = setting_default("state_pool_max_overflow")
    timeout: float = setting_default("state_pool_timeout_seconds")

    def __post_init__(self) -> None:
        if self.size < 1 or self.max_overflow < 0 or self.timeout <= 0:
            raise ConfigurationError(
                f"state store pool: size must be >= 1, max_overflow >= 0 and timeout > 0 (got {self})",
                resource="state_pool_size",
            )

    @property
    def max_connections(self) -> int:
        return self.size + self.max_overflow


DEFAULT_POOL = PoolLimits()


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Conflict(StateError):
    """A constraint refused a write (unique, foreign key, check); methods that expect one
    catch this and raise the domain error that says what it means."""


class TransactionAbortedError(TransientError):
    """The database rolled the transaction back to settle a conflict with a concurrent one
    (PostgreSQL serialization failure or deadlock). Nothing of it was committed: the store
    runs it again (:func:`retry_aborted`); it reaches a caller only when those retries ran
    out, and is still retryable then."""


# --- engine ------------------------------------------------------------------------------


def make_engine(
    url: str,
    *,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    pool: PoolLimits = DEFAULT_POOL,
    echo: bool = False,
) -> Engine:
    """An Engine configured for the state store. SQLite: WAL, foreign keys on, busy
    timeout, synchronous=FULL, SQLAlchemy-controlled BEGIN (IMMEDIATE for writes).
    PostgreSQL: psycopg 3, pre-ping, ``lock_timeout`` = busy timeout, a connection pool
    bounded by ``pool``."""
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
            _sqlite_directory(Path(u.database).expanduser())
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
            pool_size=pool.size,
            max_overflow=pool.max_overflow,
            pool_timeout=pool.timeout,
            connect_args={"connect_timeout": max(1, int(busy_timeout_s)), "options": options},
        )
    raise ConfigurationError(
        f"unsupported state store database {backend!r}: use sqlite:/// or postgresql+psycopg://", resource="state_url"
    )


def _sqlite_directory(path: Path) -> None:
    """The SQLite file's folder must exist: a typo in the state URL would otherwise start
    an empty state store (and create real resources recorded only there). The local
    stack's own folder is the exception: it is made on first use."""
    from archive_kms.config import stack_dir

    folder = path.parent
    if folder.is_dir():
        return
    stack = stack_dir().resolve()
    if folder.resolve() == stack or folder.resolve().is_relative_to(stack):
        folder.mkdir(parents=True, exist_ok=True)
        return
    raise ConfigurationError(
        f"state store sqlite:///{path}: the folder {folder} does not exist; fix ARCHIVE_KMS_STATE_URL (or create "
        "the folder for a new state store)",
        resource="state_url",
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


class SqlDatabase:
    """One Engine with the store's clock: transactions and error translation for the
    repositories (thread-safe; share one per process)."""

    def __init__(self, engine: Engine, *, clock: Clock | None = None) -> None:
        self.engine = engine
        self.now: Clock = clock or _utcnow
        self.dialect = engine.dialect.name
        self.pg = self.dialect == "postgresql"
        self.display = engine.url.render_as_string(hide_password=True)
        # An in-memory SQLite database is one shared connection: serialise its users.
        in_memory = self.dialect == "sqlite" and engine.url.database in (None, "", ":memory:")
        self._serial: threading.RLock | None = threading.RLock() if in_memory else None
        self._stats_lock = threading.Lock()
        self._aborted_retries = 0

    @property
    def aborted_retries(self) -> int:
        """Transactions of this process the database aborted (serialization failure,
        deadlock) and the store ran again: a measure of contention, never an error."""
        return self._aborted_retries

    def _count_aborted_retry(self) -> None:
        with self._stats_lock:
            self._aborted_retries += 1

    def retried(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()`` (one transaction), run again while the database aborts it
        (``TransactionAbortedError``), through ``archive_kms.retry``."""

        def once() -> _T:
            try:
                return fn()
            except TransactionAbortedError:
                self._count_aborted_retry()
                raise

        return retry.call(once, backoff=ABORTED_TX_RETRY, what=what, retry_on=(TransactionAbortedError,))

    @contextmanager
    def tx(
        self, op: str, *, write: bool = True, snapshot: bool = False, isolation: str | None = None
    ) -> Iterator[Connection]:
        """One transaction. ``write`` on SQLite: BEGIN IMMEDIATE. ``snapshot`` on
        PostgreSQL: REPEATABLE READ (one consistent view for multi-statement reads);
        ``isolation`` on PostgreSQL: that level instead of the server's default."""
        with self._serial or nullcontext():
            try:
                with self.engine.connect() as conn:
                    if self.dialect == "sqlite" and write:
                        conn.execution_options(archive_kms_begin="IMMEDIATE")
                    if self.pg and (snapshot or isolation):
                        conn.execution_options(isolation_level="REPEATABLE READ" if snapshot else isolation)
                    with conn.begin():
                        yield conn
            except sa_exc.IntegrityError as exc:
                raise Conflict(f"{op}: {first_line(exc.orig)}", resource=self.display) from exc
            except sa_exc.DBAPIError as exc:
                raise self.translate(exc, op) from exc
            except sa_exc.TimeoutError as exc:  # QueuePool: every connection of the pool busy
                size, overflow = self.engine.pool.size(), getattr(self.engine.pool, "_max_overflow", 0)  # type: ignore[attr-defined]
                raise TransientError(
                    f"{op}: state store {self.display}: all {size + overflow} connections of this process "
                    f"are busy (state_pool_size={size}, state_pool_max_overflow={overflow}); raise them or "
                    "lower the run's parallelism",
                    resource=self.display,
                ) from exc

    def translate(self, exc: sa_exc.DBAPIError, op: str) -> Exception:
        detail = first_line(exc.orig)
        where = f"state store {self.display}"
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if (
            (sqlstate or "").startswith(("28", "3D"))
            or "authentication failed" in detail
            or ("database" in detail and "does not exist" in detail)
        ):
            # Wrong credentials or database name: retrying cannot help, a human must fix the URL.
            return ConfigurationError(f"{op}: {where}: {detail}", resource=self.display)
        if sqlstate in ABORTED_SQLSTATES:
            return TransactionAbortedError(f"{op}: {where}: {detail} (retry)", resource=self.display)
        if sqlstate in ("55P03", "57014"):
            return TransientError(f"{op}: {where}: {detail} (retry)", resource=self.display)
        if isinstance(exc, sa_exc.OperationalError) and ("locked" in detail or "busy" in detail):
            return TransientError(f"{op}: {where} stayed locked past the busy timeout: {detail}", resource=self.display)
        if exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return ServiceUnavailableError(f"{op}: {where} is not answering: {detail}", resource=self.display)
        return StateError(f"{op}: {where}: {detail}", resource=self.display)

    def insert(self, table: Any) -> Any:
        """The dialect's INSERT (for ``on_conflict_do_*``)."""
        return pg_insert(table) if self.pg else sqlite_insert(table)


def retry_aborted(method: _F) -> _F:
    """Run ``method`` (a public repository method: one transaction) again while the
    database aborts it. Only the outermost such method of a thread retries, so one that
    delegates to another (``record_copy`` -> ``record_copies``) does not multiply the
    attempts. The instance must have ``_db`` (a :class:`SqlDatabase`)."""
    if getattr(method, "__retries_aborted__", False):
        return method

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_retrying, "active", False):
            return method(self, *args, **kwargs)
        _retrying.active = True
        try:
            return self._db.retried(f"state store: {method.__name__}", lambda: method(self, *args, **kwargs))
        finally:
            _retrying.active = False

    wrapper.__retries_aborted__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def retry_aborted_transactions(cls: type[_T]) -> type[_T]:
    """Apply :func:`retry_aborted` to every public method ``cls`` defines. Generator
    methods (paged reads) are left out: they retry each page themselves."""
    for name, attr in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(attr) or inspect.isgeneratorfunction(attr):
            continue
        setattr(cls, name, retry_aborted(attr))
    return cls


class SqlRepository:
    """Base of the SQL repositories: their shared database, and the checks every
    aggregate's writes make (fencing, a run's tenant). Every public method a subclass
    defines is one transaction, run again if the database aborts it
    (:func:`retry_aborted_transactions`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        retry_aborted_transactions(cls)

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db

    def _tx(self, op: str, *, write: bool = True, snapshot: bool = False) -> Any:
        return self._db.tx(op, write=write, snapshot=snapshot)

    def _read(self, op: str, fn: Callable[[Connection], _T], *, snapshot: bool = False) -> _T:
        """``fn(conn)`` in one read transaction, run again if the database aborts it (a
        page of a paged read: the generator around it cannot be retried whole)."""

        def once() -> _T:
            with self._tx(op, write=False, snapshot=snapshot) as conn:
                return fn(conn)

        return self._db.retried(f"state store: {op}", once)

    def _now(self) -> datetime:
        return self._db.now()

    def _insert(self, table: Any) -> Any:
        return self._db.insert(table)

    def _fenced(self, conn: Connection, fence: Fence | None, tenant_id: str) -> None:
        """``FencedError`` unless ``fence`` is the tenant's current lease token, checked in
        the caller's transaction."""
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

    def _run_tenant(self, conn: Connection, run_id: str) -> str:
        """The tenant of a run (what its writes are fenced on); ``StateError`` if none."""
        tenant_id = conn.execute(select(runs.c.tenant_id).where(runs.c.run_id == run_id)).scalar()
        if tenant_id is None:
            raise StateError(f"no run {run_id!r}", resource=f"run:{run_id}")
        return str(tenant_id)


def first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
