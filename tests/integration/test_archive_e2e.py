"""Issue 5 end to end on the real services: tenants on S3 (LocalStack) and Azure
(Azurite), keychains under real KMS keys, Elasticsearch, and the state store on SQLite
and on PostgreSQL."""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

import pytest

from archive_kms import clients
from archive_kms.operations.archive import JobSpec, replay_deferred, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import Query

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the fixture modules
# A fresh schema per test (on a PostgreSQL server the session starts): the stack's own
# database may be at another schema revision than this checkout's code.
from state_fixtures import postgres_admin_engine, postgres_admin_url, postgres_url  # noqa: F401


@pytest.fixture(params=["sqlite", "postgres"])
def platform(request, localstack, azurite, elasticsearch, tmp_path):
    settings = localstack
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    return Platform.from_settings(settings.model_copy(update={"state_url": url}))


def _tenant(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("cloud", ["s3", "azure"])
def test_archive_search_read_on_both_clouds(platform, cloud):
    tenant = _tenant("t")
    create_tenant(platform, tenant, cloud=cloud, actor="test")
    spec = JobSpec(f"{tenant}-1", tenant, "synthetic", synthetic={"count": 25, "seed": 11})
    out = submit_job(platform.state, spec, platform.open_archive)
    assert out.decision == "run" and out.records == 25
    archive = platform.open_archive(tenant)
    items = list(spec.materialise())
    for record, atts in items[:5]:
        assert archive.read_record(record.workspace_id, record.object_type, record.record_id) == record
        for att in atts:
            got = b"".join(archive.read_attachment(record.workspace_id, att.ref.attachment_id))
            assert got == b"".join(att.open())
    record = items[0][0]
    word = record.fields["Description"].split()[-1]
    assert record.record_id in {h.record_id for h in archive.search(Query(text=word))}
    # the raw objects in the cloud are ciphertext: no record text in them
    raw = b"".join(b"".join(archive.store.open_read(o.name)) for o in archive.store.list(b"records/"))
    assert record.fields["Description"].encode() not in raw
    # same job again: nothing new
    again = submit_job(platform.state, spec, platform.open_archive)
    assert again.decision == "duplicate"
    assert platform.index.count(platform.index.current_index(tenant)) == 25


def test_paused_jobs_are_deferred_and_replayed_once(platform):
    tenant = _tenant("p")
    create_tenant(platform, tenant, cloud="s3", actor="test")
    platform.state.pause(tenant, "run-x")
    j1 = submit_job(
        platform.state,
        JobSpec(f"{tenant}-a", tenant, "synthetic", synthetic={"count": 4, "seed": 1}),
        platform.open_archive,
    )
    j2 = submit_job(
        platform.state,
        JobSpec(f"{tenant}-b", tenant, "synthetic", synthetic={"count": 4, "seed": 1, "offset": 4}),
        platform.open_archive,
    )
    assert (j1.decision, j2.decision) == ("deferred", "deferred")
    assert list(platform.open_archive(tenant).store.list()) == []
    done = replay_deferred(platform.state, tenant, "run-x", platform.open_archive)
    assert [o.decision for o in done] == ["run", "run"]
    assert replay_deferred(platform.state, tenant, "run-x", platform.open_archive) == []
    assert platform.index.count(platform.index.current_index(tenant)) == 8


def test_customer_key_tenant_index_holds_no_plaintext(platform, localstack):
    kms = clients.aws_client("kms", localstack)
    arn = kms.create_key(Description="byokms test")["KeyMetadata"]["Arn"]
    tenant = _tenant("k")
    create_tenant(platform, tenant, cloud="s3", key_ref=f"aws-kms://{arn}", actor="test")
    spec = JobSpec(f"{tenant}-1", tenant, "synthetic", synthetic={"count": 15, "seed": 5})
    submit_job(platform.state, spec, platform.open_archive)
    records = [r for r, _ in spec.materialise()]
    es = clients.elasticsearch_client(localstack)
    index = platform.index.current_index(tenant)
    raw = json.dumps(es.search(index=index, query={"match_all": {}}, size=100)["hits"]["hits"])
    # Whole alphanumeric tokens of the raw documents: a plaintext word would stand alone
    # (any case); substrings of base64 ciphertext and HMAC tokens are not evidence.
    raw_tokens = set(re.findall(r"[A-Za-z0-9]+", raw))
    raw_tokens |= {t.lower() for t in raw_tokens}
    leaked = set()
    for r in records:
        for value in [r.record_id, r.object_type, *[str(v) for v in r.fields.values() if v is not None]]:
            for word in re.findall(r"[A-Za-z0-9]+", value):
                if len(word) >= 4 and (word in raw_tokens or word.lower() in raw_tokens):
                    leaked.add(word)
    assert not leaked, f"plaintext in the index: {sorted(leaked)[:10]}"
    word = records[0].fields["Description"].split()[-1]
    assert records[0].record_id in {h.record_id for h in platform.open_archive(tenant).search(Query(text=word))}
    # the customer disables their key: after the cache is purged, reads are refused
    kms.disable_key(KeyId=arn)
    platform.keychain.cache.purge()
    from archive_kms.errors import KeyUnavailableError

    with pytest.raises(KeyUnavailableError):
        r = records[0]
        platform.open_archive(tenant).read_record(r.workspace_id, r.object_type, r.record_id)
    kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)


def test_audit_chain_records_tenant_creation_and_verifies(platform):
    tenant = _tenant("a")
    create_tenant(platform, tenant, cloud="s3", actor="test")
    verification = platform.state.verify_audit(tenant_id=tenant)
    assert verification.ok and verification.sealed, verification
    assert any(r["action"] == "tenant.create" for r in platform.state.export_audit(tenant))


def test_job_retried_after_a_crash_archives_once(platform, monkeypatch):
    import archive_kms.operations.archive as archive_mod

    tenant = _tenant("c")
    create_tenant(platform, tenant, cloud="s3", actor="test")
    spec = JobSpec(f"{tenant}-1", tenant, "synthetic", synthetic={"count": 10, "seed": 3})
    real, calls = archive_mod.TenantArchive.put_object, {"n": 0}

    def crash_on_fourth(self, name, ws, chunks, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ConnectionResetError("worker lost mid-job")
        return real(self, name, ws, chunks, **kw)

    monkeypatch.setattr(archive_mod.TenantArchive, "put_object", crash_on_fourth)
    # A rollback that cannot run (the worker is gone): the three objects stay, journaled.
    monkeypatch.setattr(archive_mod, "rollback_job_output", lambda *a, **k: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(ConnectionResetError):
        submit_job(platform.state, spec, platform.open_archive)
    assert len(list(platform.open_archive(tenant).store.list())) == 3
    monkeypatch.undo()
    retry = submit_job(platform.state, spec, platform.open_archive)
    assert retry.decision == "run" and retry.objects_already_there == 3
    names = [o.name for o in platform.open_archive(tenant).store.list()]
    assert len(names) == len(set(names)) == retry.objects_written + retry.objects_already_there
    assert platform.index.count(platform.index.current_index(tenant)) == 10


@pytest.mark.parametrize("cloud", ["s3", "azure"])
def test_cli_archive_then_search(localstack, azurite, elasticsearch, tmp_path, monkeypatch, cloud):
    from typer.testing import CliRunner

    from archive_kms.cli import app

    monkeypatch.setenv("ARCHIVE_KMS_STATE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    runner = CliRunner()
    tenant = _tenant("cli")
    made = runner.invoke(app, ["tenant", "create", tenant, "--cloud", cloud, "--json"])
    assert made.exit_code == 0, made.output
    run = runner.invoke(
        app, ["archive", tenant, "--generate", "12", "--seed", "4", "--job-id", f"{tenant}-j", "--json"]
    )
    assert run.exit_code == 0 and json.loads(run.stdout)["records"] == 12, run.output
    spec = JobSpec(f"{tenant}-j", tenant, "synthetic", synthetic={"count": 12, "seed": 4})
    record = next(r for r, _ in spec.materialise())
    word = record.fields["Description"].split()[-1]
    found = runner.invoke(app, ["search", tenant, word, "--json"])
    assert found.exit_code == 0, found.output
    assert record.record_id in {h["record_id"] for h in json.loads(found.stdout)["hits"]}
    read = runner.invoke(app, ["read", tenant, "--record", f"{record.object_type}/{record.record_id}", "--json"])
    assert read.exit_code == 0 and json.loads(read.stdout)["fields"] == dict(record.fields)
    bad = runner.invoke(app, ["tenant", "create", "Bad/Id"])
    assert bad.exit_code == 2 and "tenant" in bad.output.lower()
