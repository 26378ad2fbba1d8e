"""Write ``state_v1_snapshot.json``: a state database as the last release before Alembic
(commit d05c93c, schema version 1) left it, for SQLite and PostgreSQL.

It holds, per dialect, the statements that rebuild such a database: the DDL that
release's ``open_state`` ran (``metadata.create_all`` with the audit-log triggers), then
the rows its own code wrote for one tenant (registry, gate, a deferred sealed job, the
job ledger, a run with steps and a checkpoint, a manifest and copy ledger, a lease, the
audit chain with a sealed head, a keychain with a DEK) and the ``schema_version`` row.
``test_state_schema_upgrade.py`` loads it and upgrades it with today's code. The rows are
made by that release's code, not written by hand, so the test meets what it really wrote.

Run it with that release's code first on the path, from this repository's root::

    git worktree add /tmp/akms-v1 d05c93c   # or: git archive d05c93c | tar -x -C /tmp/akms-v1
    PYTHONPATH=/tmp/akms-v1/src python tests/contract/make_state_v1_snapshot.py

It refuses to run against code that already has Alembic revisions.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_mock_engine, select

OUT = Path(__file__).with_name("state_v1_snapshot.json")
T0 = datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)


def _ddl(dialect_url: str) -> list[str]:
    from archive_kms.state.schema import metadata

    statements: list[str] = []

    def executor(sql: Any, *multiparams: Any, **params: Any) -> None:
        statements.append(str(sql.compile(dialect=engine.dialect)).strip())

    engine = create_mock_engine(dialect_url, executor)
    metadata.create_all(engine, checkfirst=False)
    return statements


def _literal(value: Any, dialect: str) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        utc = value.astimezone(UTC)
        if dialect == "sqlite":  # how SQLAlchemy stores DateTime on SQLite: naive UTC text
            return "'" + utc.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f") + "'"
        return "'" + utc.isoformat() + "'"
    if isinstance(value, (bytes, bytearray, memoryview)):
        hexed = bytes(value).hex()
        return f"X'{hexed}'" if dialect == "sqlite" else f"decode('{hexed}', 'hex')"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no literal for {type(value).__name__}")


def _rows(engine: Any) -> dict[str, list[dict[str, Any]]]:
    from archive_kms.state.schema import metadata

    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:  # parents before children
            out[table.name] = [dict(r._mapping) for r in conn.execute(select(table)).all()]
    return out


def _inserts(rows: dict[str, list[dict[str, Any]]], dialect: str) -> list[str]:
    out = []
    for table, items in rows.items():
        for row in items:
            cols = ", ".join(row)
            vals = ", ".join(_literal(v, dialect) for v in row.values())
            out.append(f"INSERT INTO {table} ({cols}) VALUES ({vals})")
    return out


def main() -> None:
    if importlib.util.find_spec("archive_kms.state.migrations") is not None:
        sys.exit("this is code with Alembic revisions: run with the d05c93c release first on PYTHONPATH")
    from archive_kms.crypto.signing import Signer
    from archive_kms.keys.cache import KeyCache
    from archive_kms.keys.keychain import Keychain
    from archive_kms.keys.memory import MemoryKms
    from archive_kms.state.audit import SignerHeadSealer
    from archive_kms.state.port import (
        AuditEvent,
        CopyRecord,
        CopyStatus,
        Flow,
        KeyMode,
        ManifestEntry,
        StepState,
        TenantRecord,
    )
    from archive_kms.state.sql import open_state
    from archive_kms.state.sql.keychain import SqlKeychainStore

    ticks = [T0]

    def clock() -> datetime:
        ticks[0] += timedelta(milliseconds=7)
        return ticks[0]

    signer = Signer.generate()
    state = open_state("sqlite://", clock=clock, sealer=SignerHeadSealer(signer))
    tenant = "acme"
    state.create_tenant(
        TenantRecord(
            tenant,
            KeyMode.MANAGED,
            {"cloud": "s3", "kind": "shared", "bucket": "archive-kms-shared", "prefix": "acme/"},
            key_ref="managed://platform",
            index_alias="archive-acme",
            index_generation=1,
        )
    )
    state.admit_job(tenant, "job-1", {"kind": "synthetic", "count": 3}).decision  # runs (gate open)
    run, _ = state.start_run(tenant, Flow.ENABLE, mode="byokms", steps=["preflight", "pause", "copy"], run_id="run-1")
    lease = state.acquire_lease(tenant, run.run_id, timedelta(minutes=5))
    state.pause(tenant, run.run_id, fence=lease.fence)
    state.admit_job(tenant, "job-2", {"kind": "synthetic", "count": 2}, sealed=b"\x00sealed-bytes\xff")  # deferred
    state.update_step(run.run_id, "preflight", StepState.RUNNING, fence=lease.fence)
    state.update_step(run.run_id, "preflight", StepState.COMPLETED, result={"ok": True}, fence=lease.fence)
    state.save_checkpoint(run.run_id, "copy", 0, {"after": "b"}, fence=lease.fence)
    state.create_manifest(run.run_id, {"uri": "s3://archive-kms-shared/acme/"}, fence=lease.fence)
    entries = [ManifestEntry(name=n, size=10 * i, shard=0, etag=f"e{i}") for i, n in enumerate([b"a", b"b\xff"], 1)]
    state.add_manifest_entries(run.run_id, entries, fence=lease.fence)
    state.record_copy(run.run_id, CopyRecord(b"a", CopyStatus.COPIED, dest_etag="d1", dest_size=10), fence=lease.fence)
    state.append_audit(AuditEvent("cli", "tenant.create", tenant, None, {"index": "archive-acme"}))
    state.append_audit(AuditEvent("flow", "run.start", tenant, run.run_id, {"flow": "enable"}))

    kms = MemoryKms()
    ref = kms.create_key("acme-l1")
    kc = Keychain(
        SqlKeychainStore(state), kms.provider, signer, lambda: T0.timestamp(), KeyCache(ttl_seconds=60), audit=state
    )
    kc.create_tenant(tenant, kms.provider(ref))
    dek = kc.dek_for_encrypt(tenant, "org-1")
    assert state.verify_audit().ok

    rows = _rows(state.engine)
    snapshot = {
        "release": "d05c93c",
        "schema_version": 1,
        "signer_public_pem": signer.public_key_pem().decode("ascii"),
        "dek_id": dek.dek_id,
        "audit_records": len(rows["audit_log"]),
        "sqlite": _ddl("sqlite://") + _inserts(rows, "sqlite"),
        "postgresql": _ddl("postgresql+psycopg://") + _inserts(rows, "postgresql"),
    }
    OUT.write_text(json.dumps(snapshot, indent=1) + "\n")
    print(f"wrote {OUT}: {len(snapshot['sqlite'])} statements for SQLite, {len(snapshot['postgresql'])} for PostgreSQL")


if __name__ == "__main__":
    main()
