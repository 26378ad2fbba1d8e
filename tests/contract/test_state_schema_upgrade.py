"""The state schema under Alembic (docs/state-store.md, "Schema migrations"; ADR 0011), on
SQLite and PostgreSQL.

The database of the previous release comes from ``state_v1_snapshot.json``: the DDL and
the rows that release's own code wrote (``make_state_v1_snapshot.py`` says how it was
made). A snapshot rather than today's code with an old version row: today's tables are
what a revision changes, so only a frozen copy of what the old release wrote can show an
upgrade from it, and it stays that release's however the schema moves on.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from archive_kms import cli
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.errors import ConfigurationError
from archive_kms.keys.keychain.records import RecordChecks
from archive_kms.state.audit import SignatureHeadVerifier
from archive_kms.state.port import AuditEvent, CopyStatus, DeferredState, KeyMode, StepState, TenantRecord
from archive_kms.state.schema import metadata
from archive_kms.state.sql import SqlDatabase, SqlStateStore, make_engine, migrate, open_state
from archive_kms.state.sql.keychain import SqlKeychainStore

SNAPSHOT = json.loads(Path(__file__).with_name("state_v1_snapshot.json").read_text())
DIALECTS = ["sqlite", "postgresql"]


def _new_schema(admin_url: str, admin: Engine) -> Iterator[str]:
    schema = f"akms_up_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(admin_url).update_query_dict({"options": f"-c search_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture(params=DIALECTS)
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def db_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture()
def other_db_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path / 'other.db'}"
        return
    yield from _new_schema(
        request.getfixturevalue("postgres_admin_url"), request.getfixturevalue("postgres_admin_engine")
    )


def _load_snapshot(url: str, dialect: str, *, ddl_only: bool = False) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for stmt in SNAPSHOT[dialect]:
                if ddl_only and stmt.startswith("INSERT"):
                    continue
                conn.exec_driver_sql(stmt)
    finally:
        engine.dispose()


def _db(url: str) -> SqlDatabase:
    return SqlDatabase(make_engine(url))


def _fingerprint(url: str) -> set[tuple[Any, ...]]:
    """Everything DDL made, as comparable text: tables, columns, constraints, indexes,
    triggers (and on PostgreSQL the trigger function); Alembic's own table left out."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                rows = conn.execute(
                    text(
                        "SELECT type, name, tbl_name, sql FROM sqlite_master "
                        "WHERE name NOT LIKE 'sqlite_%' AND tbl_name != 'alembic_version'"
                    )
                ).all()
                return {(t, n, tb, " ".join((sql or "").split())) for t, n, tb, sql in rows}
            schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            queries = [
                "SELECT 'column', table_name, column_name, data_type, is_nullable, column_default, "
                "character_maximum_length FROM information_schema.columns WHERE table_schema = current_schema()",
                "SELECT 'constraint', conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE connamespace = current_schema()::regnamespace",
                "SELECT 'index', tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()",
                "SELECT 'trigger', tgrelid::regclass::text, tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT tgisinternal "
                "AND c.relnamespace = current_schema()::regnamespace",
                "SELECT 'function', proname, prosrc FROM pg_proc WHERE pronamespace = current_schema()::regnamespace",
            ]
            out: set[tuple[Any, ...]] = set()
            for q in queries:
                for row in conn.execute(text(q)).all():
                    if "alembic_version" in row:
                        continue
                    out.add(tuple(re.sub(rf"\b{re.escape(schema)}\.", "", v) if isinstance(v, str) else v for v in row))
            return out
    finally:
        engine.dispose()


def _schema_drift(url: str) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match ``state.schema``."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    finally:
        engine.dispose()


def _cli(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args))


def test_a_database_of_the_release_before_alembic_is_upgraded_and_keeps_everything(db_url: str, dialect: str):
    _load_snapshot(db_url, dialect)
    before = migrate.status(_db(db_url))
    assert (before.revision, before.legacy_version, before.empty) == (None, 1, False)

    out = _cli("db", "current", "--url", db_url)
    assert out.exit_code == 1 and "from before Alembic (schema version 1" in out.output, out.output
    out = _cli("db", "upgrade", "--url", db_url, "--json")
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)
    assert answer["before"]["revision"] is None and answer["after"] == answer["after"] | {
        "revision": migrate.head(),
        "at_head": True,
        "schema_version": 1,
    }
    out = _cli("db", "current", "--url", db_url)
    assert out.exit_code == 0 and f"revision {migrate.head()} (head)" in out.output
    assert _cli("db", "upgrade", "--url", db_url).exit_code == 0  # again: nothing to do
    assert _schema_drift(db_url) == []

    # The old release's rows, read by today's code.
    pem = SNAPSHOT["signer_public_pem"].encode()
    sealed = SqlStateStore(make_engine(db_url), sealer=SignatureHeadVerifier(Verifier.from_public_pem(pem)))
    try:
        check = sealed.verify_audit()  # every record and the heads the old release sealed
        assert check.ok and check.sealed and check.records == SNAPSHOT["audit_records"], check
    finally:
        sealed.close()
    store = open_state(db_url)
    try:
        acme = store.get_tenant("acme")
        assert acme is not None and acme.key_mode is KeyMode.MANAGED and acme.location["bucket"] == "archive-kms-shared"
        run = store.get_run("run-1")
        assert run is not None and run.step("preflight").state is StepState.COMPLETED
        assert run.step("preflight").result == {"ok": True}
        assert store.load_checkpoints("run-1", "copy") == {0: {"after": "b"}}
        (queued,) = store.list_deferred("acme")
        assert queued.job_id == "job-2" and queued.state is DeferredState.DEFERRED
        assert queued.sealed == b"\x00sealed-bytes\xff"
        assert [e.name for e in store.iter_manifest("run-1")] == [b"a", b"b\xff"]
        assert store.copy_counts("run-1") == {CopyStatus.COPIED: 1}
        assert store.get_lease("acme").run_id == "run-1"

        keychain = SqlKeychainStore(store)
        checks = RecordChecks(keychain, Signer.generate(), Verifier.from_public_pem(pem))
        head = keychain.get_head("acme")
        checks.verify_head(head, "keychain:acme/head")  # byte for byte as the old release signed it
        records = keychain.list_records("acme")
        assert SNAPSHOT["dek_id"] in {r.record_id for r in records}
        for rec in records:
            checks.check_signed("acme", rec.record_id, rec)

        # And today's code writes to it.
        store.append_audit(AuditEvent("test", "after.upgrade", "acme"))
        assert store.verify_audit().records == SNAPSHOT["audit_records"] + 1
        store.create_tenant(TenantRecord("globex", KeyMode.MANAGED, {"cloud": "s3"}))
        store.acquire_lease("globex", "run-2", timedelta(minutes=1))
        with pytest.raises(Exception, match="append-only"):  # the old release's triggers still hold
            with store.engine.begin() as conn:
                conn.execute(text("UPDATE audit_log SET actor = 'x'"))
    finally:
        store.close()


def test_the_baseline_revision_is_the_schema_the_release_before_alembic_made(
    db_url: str, other_db_url: str, dialect: str
):
    _load_snapshot(db_url, dialect, ddl_only=True)
    migrate.upgrade(_db(other_db_url), migrate.BASELINE)  # an empty database, created by the baseline revision
    assert _fingerprint(other_db_url) == _fingerprint(db_url)
    migrate.upgrade(_db(other_db_url))  # and the later revisions
    assert _schema_drift(other_db_url) == []  # state/schema.py says the same as head (else: add a revision)


def test_open_state_creates_stamps_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    open_state(url).close()  # empty: created at head
    assert migrate.status(_db(url)).at_head

    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    _load_snapshot(legacy, "sqlite")
    # before Alembic, and revisions follow the baseline: refused until upgraded, then at head
    with pytest.raises(ConfigurationError, match=r"run `archive-kms db upgrade`"):
        open_state(legacy)
    open_state(legacy, upgrade=True).close()
    assert migrate.status(_db(legacy)).at_head

    head = migrate.head()
    monkeypatch.setattr(migrate, "head", lambda: "ffff0")  # as if this code had one revision more
    with pytest.raises(ConfigurationError, match=rf"revision {head} \(head is ffff0\): run `archive-kms db upgrade`"):
        open_state(url)
    monkeypatch.undo()

    with make_engine(url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))  # a newer release's revision
    with pytest.raises(ConfigurationError, match="revision ffff, which this code does not know.*upgrade the code"):
        open_state(url)
    out = _cli("db", "upgrade", "--url", url)
    assert out.exit_code == 2 and "upgrade the code" in out.output and "Traceback" not in out.output

    stranger = f"sqlite:///{tmp_path / 'stranger.db'}"
    with make_engine(stranger).begin() as conn:
        conn.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))
    with pytest.raises(ConfigurationError, match="not an archive_kms state database"):
        open_state(stranger)
