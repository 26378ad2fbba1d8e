"""The SQL state store's engine setup and error translation, on embedded SQLite (no
services needed). The behaviour contract is tests/contract/test_state_store_contract.py."""

from __future__ import annotations

import sqlite3
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from archive_kms.errors import ConfigurationError, ServiceUnavailableError, TransientError
from archive_kms.state.port import AuditEvent, KeyMode, TenantRecord
from archive_kms.state.sql import SqlStateStore, make_engine, open_state

LOC = {"tenant": "acme", "kind": "shared", "cloud": "s3", "bucket": "archive-kms-shared", "prefix": "tenants/acme/"}


def test_a_sqlite_state_store_in_a_missing_folder_is_refused(tmp_path: Path) -> None:
    """A typo in ARCHIVE_KMS_STATE_URL must not start an empty state store silently."""
    from archive_kms.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="nested does not exist; fix ARCHIVE_KMS_STATE_URL"):
        open_state(f"sqlite:///{tmp_path / 'nested' / 'state.db'}")
    assert not (tmp_path / "nested").exists()


def test_sqlite_connections_are_configured(tmp_path: Path) -> None:
    (tmp_path / "nested").mkdir()
    store = open_state(f"sqlite:///{tmp_path / 'nested' / 'state.db'}", busy_timeout_s=7)
    try:
        with store.engine.connect() as conn:
            pragmas = {
                p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
            }
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 7000, "synchronous": 2}
    finally:
        store.close()


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "not a url", "sqlite+aiosqlite:///x.db", "postgresql+asyncpg://u@h/db"]
)
def test_unsupported_urls_fail_before_connecting(url: str) -> None:
    with pytest.raises(ConfigurationError, match="sqlite:///|postgresql"):
        make_engine(url)


def test_plain_postgresql_url_uses_psycopg_and_hides_the_password() -> None:
    engine = make_engine("postgresql://archive:s3cret@db.internal/state?options=-c%20search_path%3Dx")
    try:
        assert engine.url.drivername == "postgresql+psycopg"
        assert "s3cret" not in repr(SqlStateStore(engine))
    finally:
        engine.dispose()


def test_unreachable_postgresql_is_retryable_and_names_no_password() -> None:
    with pytest.raises(ServiceUnavailableError) as info:
        open_state("postgresql+psycopg://archive:s3cret@127.0.0.1:1/state", busy_timeout_s=1)
    assert info.value.retryable
    assert "s3cret" not in str(info.value) and "127.0.0.1" in str(info.value)


def test_locked_database_is_a_transient_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = open_state(f"sqlite:///{path}", busy_timeout_s=0.2)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(TransientError, match="locked") as info:
            store.create_tenant(TenantRecord("acme", KeyMode.MANAGED, LOC))
        assert info.value.retryable
        assert store.get_tenant("acme") is None  # readers are not blocked (WAL)
        blocker.execute("ROLLBACK")
        store.create_tenant(TenantRecord("acme", KeyMode.MANAGED, LOC))
    finally:
        blocker.close()
        store.close()


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    open_state(url).close()
    store = open_state(url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 99"))
    store.close()
    with pytest.raises(ConfigurationError, match="schema version 99.*upgrade the code"):
        open_state(url)


def test_in_memory_sqlite_serialises_its_one_connection() -> None:
    store = open_state("sqlite://")
    try:
        store.create_tenant(TenantRecord("acme", KeyMode.MANAGED, LOC))
        errors: list[BaseException] = []

        def append(i: int) -> None:
            try:
                for k in range(20):
                    store.append_audit(AuditEvent(f"w{i}", "x", "acme", details={"k": k}))
                store.acquire_lease("acme", f"run-{i}", timedelta(seconds=1))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=append, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 3  # three lost the lease race; nothing else failed
        v = store.verify_audit()
        assert v.ok and v.records == 80
    finally:
        store.close()


def test_concurrent_schema_creation_is_safe(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    results: list[object] = []

    def opener() -> None:
        try:
            open_state(url).close()
            results.append("ok")
        except Exception as exc:  # noqa: BLE001
            results.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok"] * 6
