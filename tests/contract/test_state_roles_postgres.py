"""Two real PostgreSQL roles (issue 11 finding 3, docs/deployment.md "Database roles"): the
migration role owns the schema and runs `archive-kms db upgrade --runtime-role`; the
runtime role, which the workers connect as, can do everything the platform does but cannot
drop or disable the audit log's triggers, rewrite or delete audit records, rewrite the
search-generation registry or the schema markers, or change any table. What it can still
do, INSERT a forged audit row, gives the keychain no number it trusts.

PostgreSQL is the suite's server (``postgres_admin_url``: a throwaway one, or
ARCHIVE_KMS_TEST_POSTGRES_URL with a role that may create roles).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from archive_kms.cli import app
from archive_kms.crypto.signing import Signer
from archive_kms.domain.audit import record_hash
from archive_kms.domain.search_generations import SearchGeneration
from archive_kms.keys.cache import KeyCache
from archive_kms.keys.keychain import Keychain
from archive_kms.keys.memory import MemoryKms
from archive_kms.state.audit import SignerHeadSealer
from archive_kms.state.sql import open_state
from archive_kms.state.sql.keychain import SqlKeychainStore


@pytest.fixture
def roles(postgres_admin_url: str, postgres_admin_engine) -> Iterator[tuple[str, str, str]]:
    """(migration URL, runtime URL, runtime role) on a fresh schema owned by the migration role."""
    tag = uuid.uuid4().hex[:10]
    mig, rt, schema = f"akms_mig_{tag}", f"akms_rt_{tag}", f"akms_roles_{tag}"
    with postgres_admin_engine.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{mig}" LOGIN'))
        conn.execute(text(f'CREATE ROLE "{rt}" LOGIN'))
        conn.execute(text(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{mig}"'))
    base = make_url(postgres_admin_url)

    def url(user: str) -> str:
        return (
            base.set(username=user, password=None)
            .update_query_dict({"options": f"-c search_path={schema}"})
            .render_as_string(hide_password=False)
        )

    try:
        yield url(mig), url(rt), rt
    finally:
        with postgres_admin_engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            for role in (rt, mig):
                conn.execute(text(f'DROP OWNED BY "{role}"'))
                conn.execute(text(f'DROP ROLE "{role}"'))


def _refused(url: str, sql: str) -> str:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    except DBAPIError as exc:
        return str(exc.orig)
    finally:
        engine.dispose()
    raise AssertionError(f"the runtime role was allowed to run: {sql}")


def test_the_runtime_role_runs_the_platform_but_cannot_touch_the_audit_logs_protection(roles) -> None:
    mig_url, rt_url, rt = roles
    runner = CliRunner()
    upgraded = runner.invoke(app, ["db", "upgrade", "--url", mig_url, "--runtime-role", rt, "--json"])
    assert upgraded.exit_code == 0, upgraded.output
    assert json.loads(upgraded.stdout)["after"]["at_head"]

    # The workers' role: the whole platform path a tenant takes works.
    signer = Signer.generate()
    state = open_state(rt_url, sealer=SignerHeadSealer(signer))
    kms = MemoryKms()
    kc = Keychain(SqlKeychainStore(state), kms.provider, signer, cache=KeyCache(), audit=state)
    kc.create_tenant("acme", kms.provider(kms.create_key("acme-l1")))
    kc.dek_for_encrypt("acme", "org1")
    kc.revoke("acme")
    kc.restore("acme")
    now = datetime.now(UTC)
    gen = SearchGeneration("acme", 1, "archive-acme--1", "keyed", now, signer.key_id, signer.sign(b"x", purpose="t"))
    assert state.record_search_generation(gen) == gen
    assert state.verify_audit().ok

    # What it cannot do, whoever holds its password.
    for sql, why in [
        ("DROP TRIGGER audit_log_no_update_delete ON audit_log", "must be owner"),
        ("ALTER TABLE audit_log DISABLE TRIGGER ALL", "must be owner"),
        ("UPDATE audit_log SET actor = 'nobody'", "permission denied"),
        ("DELETE FROM audit_log", "permission denied"),
        ("TRUNCATE audit_log", "permission denied"),
        ("DELETE FROM audit_heads", "permission denied"),
        ("UPDATE search_generations SET body = body", "permission denied"),
        ("DELETE FROM search_generations", "permission denied"),
        ("UPDATE alembic_version SET version_num = '0001'", "permission denied"),
        ("DROP TABLE audit_log", "must be owner"),
        ("CREATE TABLE sneaky (x int)", "permission denied"),
    ]:
        assert why in _refused(rt_url, sql), sql
    # The migration role still can (it owns the tables): the triggers are there to be dropped only by it.
    engine = create_engine(mig_url)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'audit_log_no_%'")).scalar() == 2
    engine.dispose()

    # INSERT is the runtime role's right: a forged, correctly linked keychain record with a
    # huge head version. It is beyond the sealed head: a fresh process neither trusts nor fears it.
    last = list(state.iter_audit(tenant_id="acme"))[-1]
    fields = {
        "seq": last.seq + 1,
        "ts": last.ts,
        "actor": "keychain",
        "action": "keychain.rotate_l1",
        "tenant_id": "acme",
        "run_id": None,
        "details": {"head_version": 10_000},
        "prev_hash": last.hash,
        "tenant_seq": last.tenant_seq + 1,
        "tenant_prev_hash": last.hash,
    }
    digest = record_hash(**fields)
    engine = create_engine(rt_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_log (seq, ts, actor, action, tenant_id, run_id, details, prev_hash, tenant_seq, "
                "tenant_prev_hash, hash) VALUES (:seq, :ts, :actor, :action, :tenant_id, :run_id, :details, "
                ":prev_hash, :tenant_seq, :tenant_prev_hash, :hash)"
            ),
            {**fields, "details": json.dumps(fields["details"], separators=(",", ":")), "hash": digest},
        )
    engine.dispose()
    fresh = Keychain(SqlKeychainStore(state), kms.provider, signer, cache=KeyCache(), audit=state)
    assert fresh.lock_status("acme")["locked"] is False
    assert fresh.status("acme").head_version < 10_000
    assert not state.verify_audit().ok  # the full verification still reports the row: it is evidence
    state.close()
