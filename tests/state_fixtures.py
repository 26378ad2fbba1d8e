"""State store fixtures: every backend of the StateStore port, for the contract suite.

``state_store`` is parametrised (``state_backend``) over ``memory``, ``sqlite`` and ``postgresql``. PostgreSQL is
the server named by ``ARCHIVE_KMS_TEST_POSTGRES_URL`` (a role that may CREATE SCHEMA)
or, when that is unset, a throwaway PostgreSQL 15 this module starts for the session
(``initdb``/``pg_ctl`` as user ``postgres``, unix socket in a temporary directory, fsync
off). If neither works the tests FAIL — they never skip. Each test gets its own
PostgreSQL schema (or SQLite file) and a ``FakeClock`` the store reads time from.

Imported by ``tests/contract/conftest.py``; other tiers may import it the same way.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from archive_kms.state import audit as chain
from archive_kms.state.memory import InMemoryStateStore
from archive_kms.state.schema import AUDIT_TRIGGERS
from archive_kms.state.sql import SqlStateStore, open_state

__all__ = [
    "BACKENDS",
    "SQL_BACKENDS",
    "AuditTamper",
    "FakeClock",
    "ThrowawayPostgres",
    "audit_tamper",
    "open_state_store",
    "postgres_admin_engine",
    "postgres_admin_url",
    "postgres_url",
    "state_backend",
    "state_clock",
    "state_store",
    "state_url",
]

PG_BIN = Path(os.environ.get("ARCHIVE_KMS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
BACKENDS = ["memory", "sqlite", "postgresql"]
SQL_BACKENDS = ["sqlite", "postgresql"]


class FakeClock:
    """A clock tests move by hand (thread-safe)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            # Strictly increasing so that records written in one test never share a timestamp.
            self._now += timedelta(microseconds=1)
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


# --- a throwaway PostgreSQL -------------------------------------------------------------


def _free_port(start: int = 5434) -> int:
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 5434..5633")


@dataclass
class ThrowawayPostgres:
    """PostgreSQL started for one test session. Binaries refuse to run as root, so as
    root they run as user ``postgres`` (``runuser``); otherwise as the current user."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="akms-pg-")))
    port: int = field(default_factory=_free_port)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> str:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(
                f"PostgreSQL binaries not found in {PG_BIN} (set ARCHIVE_KMS_TEST_PG_BIN, "
                "or ARCHIVE_KMS_TEST_POSTGRES_URL to use a running server)"
            )
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        data = self.root / "data"
        out = self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr.strip()[-800:]}")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses='' -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        out = self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o", options, "start"
        )
        if out.returncode != 0:
            log = (
                (self.root / "server.log").read_text(errors="replace")[-1500:]
                if (self.root / "server.log").exists()
                else ""
            )
            raise RuntimeError(f"pg_ctl start failed: {out.stderr.strip()[-800:]}\n{log}")
        return f"postgresql+psycopg://postgres@/postgres?host={self.root}&port={self.port}"

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A URL to a PostgreSQL database in which the role may create schemas."""
    configured = os.environ.get("ARCHIVE_KMS_TEST_POSTGRES_URL")
    if configured:
        yield configured
        return
    server = ThrowawayPostgres()
    try:
        url = server.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start must fail loudly, not skip
        server.stop()
        pytest.fail(
            f"could not start a throwaway PostgreSQL for the state store tests: {exc}\n"
            "Set ARCHIVE_KMS_TEST_POSTGRES_URL to a server to use it instead.",
            pytrace=False,
        )
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_admin_engine(postgres_admin_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        engine.dispose()
        pytest.fail(
            f"PostgreSQL at {make_url(postgres_admin_url).render_as_string(hide_password=True)} does not answer: {exc}",
            pytrace=False,
        )
    yield engine
    engine.dispose()


@pytest.fixture()
def postgres_url(postgres_admin_url: str, postgres_admin_engine: Engine) -> Iterator[str]:
    """A URL whose connections see only a fresh, empty schema (``search_path``); the
    schema is dropped afterwards. Schemas, not databases: faster, and the role needs
    only CREATE on the database."""
    schema = f"akms_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin_engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(postgres_admin_url)
    try:
        yield url.update_query_dict({"options": f"-c search_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with postgres_admin_engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


# --- the store, per backend -------------------------------------------------------------


@pytest.fixture()
def state_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def state_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def state_url(state_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """This test's database URL (None for the memory backend)."""
    if state_backend == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if state_backend == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return None


@pytest.fixture()
def open_state_store(state_url: str | None, state_clock: FakeClock) -> Iterator[Callable[..., Any]]:
    """Open a store on this test's database (memory: a new empty store) with options
    such as ``sealer=``; every store opened is closed at teardown."""
    opened: list[Any] = []

    def _open(**kwargs: Any) -> Any:
        kwargs.setdefault("clock", state_clock)
        s = InMemoryStateStore(**kwargs) if state_url is None else open_state(state_url, **kwargs)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


@pytest.fixture()
def state_store(open_state_store: Callable[..., Any]) -> Any:
    return open_state_store()


@pytest.fixture()
def audit_tamper(state_store: Any) -> AuditTamper:
    """Plays an attacker with write access to the audit tables (and DDL rights on SQL)."""
    return SqlAuditTamper(state_store) if isinstance(state_store, SqlStateStore) else MemoryAuditTamper(state_store)


class AuditTamper:
    def edit_details(self, seq: int, details: dict[str, Any]) -> None: ...
    def delete(self, seq: int) -> None: ...
    def swap(self, seq_a: int, seq_b: int) -> None: ...
    def truncate(self, n: int) -> None: ...
    def set_head(self, chain_name: str, count: int, head_hash: str) -> None: ...

    def rehash_from(self, seq: int) -> None:
        """Recompute every hash and link from ``seq`` on and rewrite the heads (unsealed,
        the attacker has no key): what an attacker does after editing a record."""
        ...


class SqlAuditTamper(AuditTamper):
    def __init__(self, store: SqlStateStore) -> None:
        self.engine = store.engine
        with self.engine.begin() as conn:
            for stmt in AUDIT_TRIGGERS[self.engine.dialect.name]:
                conn.execute(text(stmt))

    def _exec(self, sql: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)

    def edit_details(self, seq: int, details: dict[str, Any]) -> None:
        self._exec("UPDATE audit_log SET details = :d WHERE seq = :s", d=chain.canonical_json(details), s=seq)

    def delete(self, seq: int) -> None:
        self._exec("DELETE FROM audit_log WHERE seq = :s", s=seq)

    def swap(self, seq_a: int, seq_b: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("UPDATE audit_log SET seq = -1 WHERE seq = :a"), {"a": seq_a})
            conn.execute(text("UPDATE audit_log SET seq = :a WHERE seq = :b"), {"a": seq_a, "b": seq_b})
            conn.execute(text("UPDATE audit_log SET seq = :b WHERE seq = -1"), {"b": seq_b})

    def truncate(self, n: int) -> None:
        self._exec("DELETE FROM audit_log WHERE seq > (SELECT MAX(seq) FROM audit_log) - :n", n=n)

    def set_head(self, chain_name: str, count: int, head_hash: str) -> None:
        self._exec(
            "UPDATE audit_heads SET count = :c, head_hash = :h WHERE chain = :n", c=count, h=head_hash, n=chain_name
        )

    def rehash_from(self, seq: int) -> None:
        from sqlalchemy import select

        from archive_kms.state.schema import audit_log
        from archive_kms.state.sql.audit_log import _audit

        with self.engine.begin() as conn:
            rows = [_audit(r) for r in conn.execute(select(audit_log).order_by(audit_log.c.seq))]
        recs = _rehash(rows, seq)
        with self.engine.begin() as conn:
            for r in recs:
                conn.execute(
                    text("UPDATE audit_log SET prev_hash=:p, tenant_prev_hash=:tp, hash=:h WHERE seq=:s"),
                    {"p": r.prev_hash, "tp": r.tenant_prev_hash, "h": r.hash, "s": r.seq},
                )
            for name, (count, head_hash) in _tips(recs).items():
                conn.execute(
                    text("UPDATE audit_heads SET count=:c, head_hash=:h, seal=NULL WHERE chain=:n"),
                    {"c": count, "h": head_hash, "n": name},
                )


class MemoryAuditTamper(AuditTamper):
    def __init__(self, store: InMemoryStateStore) -> None:
        self.store = store

    def _find(self, seq: int) -> int:
        return next(i for i, r in enumerate(self.store._audit) if r.seq == seq)

    def edit_details(self, seq: int, details: dict[str, Any]) -> None:
        from dataclasses import replace

        i = self._find(seq)
        self.store._audit[i] = replace(self.store._audit[i], details=details)

    def delete(self, seq: int) -> None:
        del self.store._audit[self._find(seq)]

    def swap(self, seq_a: int, seq_b: int) -> None:
        from dataclasses import replace

        i, j = self._find(seq_a), self._find(seq_b)
        a, b = self.store._audit[i], self.store._audit[j]
        self.store._audit[i], self.store._audit[j] = replace(b, seq=seq_a), replace(a, seq=seq_b)

    def truncate(self, n: int) -> None:
        del self.store._audit[-n:]

    def set_head(self, chain_name: str, count: int, head_hash: str) -> None:
        self.store._heads[chain_name] = chain.ChainHead(chain_name, count, head_hash)

    def rehash_from(self, seq: int) -> None:
        self.store._audit[:] = _rehash(list(self.store._audit), seq)
        for name, (count, head_hash) in _tips(self.store._audit).items():
            self.store._heads[name] = chain.ChainHead(name, count, head_hash)


def _rehash(records: list[Any], start: int) -> list[Any]:
    from dataclasses import replace

    out: list[Any] = []
    prev = chain.GENESIS
    tprev: dict[str, str] = {}
    for r in records:
        if r.seq >= start:
            r = replace(
                r,
                prev_hash=prev,
                tenant_prev_hash=None if r.tenant_id is None else tprev.get(r.tenant_id, chain.GENESIS),
            )
            r = replace(r, hash=chain.recompute_hash(r))
        out.append(r)
        prev = r.hash
        if r.tenant_id is not None:
            tprev[r.tenant_id] = r.hash
    return out


def _tips(records: list[Any]) -> dict[str, tuple[int, str]]:
    tips: dict[str, tuple[int, str]] = {}
    for r in records:
        tips[chain.GLOBAL_CHAIN] = (r.seq, r.hash)
        if r.tenant_id is not None:
            tips[chain.tenant_chain(r.tenant_id)] = (r.tenant_seq, r.hash)
    return tips
