"""The SQL database under every state repository: the Engine (SQLite or PostgreSQL), one
transaction per call, and vendor errors translated into ours.

* SQLite: WAL, ``foreign_keys=ON``, busy timeout, ``synchronous=FULL``; SQLAlchemy emits
  ``BEGIN`` itself (``BEGIN IMMEDIATE`` for writes: one writer at a time, never the
  deadlock-prone read→write upgrade; a deferred ``BEGIN`` for reads, a WAL snapshot).
* PostgreSQL (psycopg 3): READ COMMITTED, ``lock_timeout`` = busy timeout, pre-ping;
  ``snapshot=True`` reads in REPEATABLE READ.
* Lock/busy timeouts and serialization failures → ``TransientError``; the database not
  answering → ``ServiceUnavailableError`` (both retryable, naming the database with its
  password hidden); a constraint refusing a write → :class:`Conflict`, which repositories
  turn into the domain error that says what it means.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from archive_kms.errors import ConfigurationError, FencedError, ServiceUnavailableError, StateError, TransientError
from archive_kms.state._common import check_token
from archive_kms.state.port import DEFAULT_JOB_LEASE_TTL, Fence
from archive_kms.state.schema import runs, tenant_leases

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_S",
    "DEFAULT_JOB_STALE_AFTER",
    "Clock",
    "Conflict",
    "SqlDatabase",
    "SqlRepository",
    "make_engine",
]

Clock = Callable[[], datetime]

DEFAULT_BUSY_TIMEOUT_S = 30.0
DEFAULT_JOB_STALE_AFTER = DEFAULT_JOB_LEASE_TTL  # the older name of the job lease TTL (ADR 0020)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Conflict(StateError):
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

    @contextmanager
    def tx(self, op: str, *, write: bool = True, snapshot: bool = False) -> Iterator[Connection]:
        """One transaction. ``write`` on SQLite: BEGIN IMMEDIATE. ``snapshot`` on
        PostgreSQL: REPEATABLE READ (one consistent view for multi-statement reads)."""
        with self._serial or nullcontext():
            try:
                with self.engine.connect() as conn:
                    if self.dialect == "sqlite" and write:
                        conn.execution_options(archive_kms_begin="IMMEDIATE")
                    if self.pg and snapshot:
                        conn.execution_options(isolation_level="REPEATABLE READ")
                    with conn.begin():
                        yield conn
            except sa_exc.IntegrityError as exc:
                raise Conflict(f"{op}: {first_line(exc.orig)}", resource=self.display) from exc
            except sa_exc.DBAPIError as exc:
                raise self.translate(exc, op) from exc

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
        if sqlstate in ("40001", "40P01", "55P03", "57014"):
            return TransientError(f"{op}: {where}: {detail} (retry)", resource=self.display)
        if isinstance(exc, sa_exc.OperationalError) and ("locked" in detail or "busy" in detail):
            return TransientError(f"{op}: {where} stayed locked past the busy timeout: {detail}", resource=self.display)
        if exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return ServiceUnavailableError(f"{op}: {where} is not answering: {detail}", resource=self.display)
        return StateError(f"{op}: {where}: {detail}", resource=self.display)

    def insert(self, table: Any) -> Any:
        """The dialect's INSERT (for ``on_conflict_do_*``)."""
        return pg_insert(table) if self.pg else sqlite_insert(table)


class SqlRepository:
    """Base of the SQL repositories: their shared database, and the checks every
    aggregate's writes make (fencing, a run's tenant)."""

    def __init__(self, db: SqlDatabase) -> None:
        self._db = db

    def _tx(self, op: str, *, write: bool = True, snapshot: bool = False) -> Any:
        return self._db.tx(op, write=write, snapshot=snapshot)

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
