"""Whoever operates Elasticsearch or the state database does not decide whether a BYOK
tenant's search is keyed (security review, issue 11 findings 1 and 4; docs/threat-model.md).

On the real services: LocalStack KMS (the tenant's customer key, the platform key),
LocalStack S3 (the archive), Elasticsearch behind a recording proxy (every request body
that went over the wire is kept), the state store in a SQLite file the attacker edits with
plain sqlite3. Before the fix, a search fell back to plaintext whenever the index's own
``_meta`` said so, the alias could point anywhere, and ``tenants.key_mode`` decided how
new records were indexed.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import uuid
from pathlib import Path

import pytest

from archive_kms import clients
from archive_kms.errors import IndexModeMismatchError, SearchBindingError
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.search import IndexMode, Query, build_document
from archive_kms.search import documents as D
from archive_kms.search.naming import index_name
from archive_kms.search.tokens import normalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from fault_proxy import Proxy

SECRET_WORD = "Xylographerqz"  # a word no other test archives
SECRET_STATUS = "Pending-Quokka-Review"


@pytest.fixture
def wired(localstack, elasticsearch, tmp_path):
    """(platform factory, raw ES client, wire log, tenant id, customer key ref)."""
    host, port = elasticsearch.elasticsearch_url.removeprefix("http://").split(":")
    proxy = Proxy((host, int(port.rstrip("/"))), classify=lambda req: req.method, keep_bodies=True)
    settings = localstack.model_copy(
        update={"state_url": f"sqlite:///{tmp_path / 'state.db'}", "elasticsearch_url": proxy.url}
    )
    es = clients.elasticsearch_client(elasticsearch)
    kms = clients.kms_client(settings)
    arn = kms.create_key(Description="search binding test (BYOKMS)")["KeyMetadata"]["Arn"]
    tenant = f"sb{uuid.uuid4().hex[:10]}"
    opened: list[Platform] = []

    def platform() -> Platform:  # a fresh process: nothing cached
        p = Platform.from_settings(settings)
        opened.append(p)
        return p

    yield platform, es, proxy, tenant, f"aws-kms://{arn}", tmp_path / "state.db"
    for p in opened:
        p.state.close()
    proxy.close()
    names = list(es.indices.get(index=f"archive-{tenant}--*", allow_no_indices=True).body)
    if names:
        es.indices.delete(index=names)
    s3 = clients.aws_client("s3", settings)
    listed = s3.list_objects_v2(Bucket=settings.shared_bucket, Prefix=f"{tenant}/").get("Contents", [])
    for obj in listed:
        s3.delete_object(Bucket=settings.shared_bucket, Key=obj["Key"])
    kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)


def _archive(p: Platform, tenant: str, job: str, status: str, word: str) -> list:
    records = [
        {
            "object_type": "Case",
            "record_id": f"500Q{job}{i:04d}",
            "workspace_id": "org1",
            "fields": {"Subject": f"{word} escalation {i}", "Status": status},
        }
        for i in range(3)
    ]
    spec = JobSpec(job, tenant, "inline", tuple(records))
    assert submit_job(p.state, spec, p.open_archive).decision == "run"
    return records


def _wire_since(proxy: Proxy, mark: int) -> bytes:
    return b"\n".join(e.request_body or b"" for e in proxy.log[mark:])


def _in_clear(wire: bytes) -> list[str]:
    """Which of the secret's plaintext forms (word, token term, exact filter term) went out."""
    text = wire.decode("utf-8", "replace")
    forms = [normalize(SECRET_WORD), f"w:{normalize(SECRET_WORD)}", normalize(SECRET_STATUS)]
    return [f for f in forms if f in text]


def _forge_plaintext_generation(es, tenant: str, generation: int, *, move_alias_from: str | None) -> str:
    """What an ES operator does: a "plaintext" index of the tenant's name pattern holding a
    forged record that matches the query, and the tenant's alias moved onto it."""
    name = index_name(tenant, generation)
    es.indices.create(
        index=name, mappings=D.index_mapping(tenant, generation, IndexMode.PLAINTEXT), settings=D.index_settings()
    )
    forged = {
        "object_type": "Case",
        "record_id": "500QFORGED0001",
        "workspace_id": "org1",
        "fields": {"Subject": f"{SECRET_WORD} wire the refund to account 9", "Status": SECRET_STATUS},
    }
    from archive_kms.domain.records import Record

    doc = build_document(Record.from_json(json.dumps(forged)), tenant=tenant, mode=IndexMode.PLAINTEXT, keys=None)
    es.index(index=name, id=doc.doc_id, document=dict(doc.source), refresh=True)
    actions = [{"add": {"index": name, "alias": f"archive-{tenant}", "is_write_index": True}}]
    if move_alias_from:
        actions.insert(0, {"remove": {"index": move_alias_from, "alias": f"archive-{tenant}"}})
    es.indices.update_aliases(actions=actions)
    return name


def _alarms(p: Platform, tenant: str) -> list[str]:
    return [r.action for r in p.state.iter_audit(tenant_id=tenant) if r.action.startswith("alarm.")]


def test_an_es_operator_cannot_turn_a_byok_tenants_search_into_plaintext(wired):
    platform, es, proxy, tenant, key_ref, _ = wired
    p = platform()
    create_tenant(p, tenant, key_ref=key_ref)
    _archive(p, tenant, "j1", SECRET_STATUS, SECRET_WORD)
    query = Query(text=SECRET_WORD, filters={"Status": SECRET_STATUS}, limit=50)
    mark = len(proxy.log)
    assert len(p.open_archive(tenant).search(query)) == 3
    assert _in_clear(_wire_since(proxy, mark)) == []  # keyed: only HMAC tokens went out

    # 1. A new "plaintext" index of the tenant's own name pattern, alias moved onto it.
    real = index_name(tenant, 1)
    _forge_plaintext_generation(es, tenant, 7, move_alias_from=real)
    fresh = platform()  # a new worker or CLI call: nothing cached from before
    mark = len(proxy.log)
    with pytest.raises(SearchBindingError, match="not a generation the platform recorded"):
        fresh.open_archive(tenant).search(query)
    assert _in_clear(_wire_since(proxy, mark)) == []
    assert "alarm.search_binding" in _alarms(fresh, tenant)
    # the writer writes into the generation the registry names and we recorded, never the alias's
    mark = len(proxy.log)
    _archive(fresh, tenant, "j2", SECRET_STATUS, SECRET_WORD)
    assert _in_clear(_wire_since(proxy, mark)) == []
    es.indices.refresh(index=[real, index_name(tenant, 7)])
    assert (es.count(index=real)["count"], es.count(index=index_name(tenant, 7))["count"]) == (6, 1)

    # 2. The real generation deleted and re-created as "plaintext" under its own name.
    es.indices.update_aliases(actions=[{"remove": {"index": index_name(tenant, 7), "alias": f"archive-{tenant}"}}])
    es.indices.delete(index=[real, index_name(tenant, 7)])
    _forge_plaintext_generation(es, tenant, 1, move_alias_from=None)
    fresh = platform()
    mark = len(proxy.log)
    with pytest.raises(SearchBindingError, match="was created keyed"):
        fresh.open_archive(tenant).search(query)
    wire = _wire_since(proxy, mark)
    assert _in_clear(wire) == [] and b'"_search"' not in wire  # no query at all was sent
    assert fresh.state.iter_audit(tenant_id=tenant)  # and the alarm is on record
    assert _alarms(fresh, tenant).count("alarm.search_binding") >= 2


def test_a_database_operator_editing_key_mode_does_not_get_records_indexed_in_clear(wired):
    platform, es, proxy, tenant, key_ref, db = wired
    p = platform()
    create_tenant(p, tenant, key_ref=key_ref)
    _archive(p, tenant, "j1", "Open", "harmless")

    con = sqlite3.connect(db)
    con.execute("update tenants set key_mode='managed' where tenant_id=?", (tenant,))
    con.commit()
    con.close()
    fresh = platform()
    assert fresh.state.get_tenant(tenant).key_mode.value == "managed"  # the registry now lies
    archive = fresh.open_archive(tenant)
    assert archive.index_mode is IndexMode.KEYED and archive.search_keys is not None  # the signed record decides
    mark = len(proxy.log)
    _archive(fresh, tenant, "j2", SECRET_STATUS, SECRET_WORD)
    assert _in_clear(_wire_since(proxy, mark)) == []  # the new records went out keyed
    es.indices.refresh(index=index_name(tenant, 1))
    stored = json.dumps(es.search(index=index_name(tenant, 1), size=100)["hits"]["hits"])
    assert normalize(SECRET_WORD) not in stored.lower() and len(json.loads(stored)) == 6
    assert len(fresh.open_archive(tenant).search(Query(text=SECRET_WORD))) == 3

    # Whatever a caller builds, the generation takes only documents of its recorded mode ...
    from archive_kms.domain.records import Record

    clear = build_document(
        Record("Case", "500QCLEAR", {"Subject": SECRET_WORD}, workspace_id="org1"),
        tenant=tenant,
        mode=IndexMode.PLAINTEXT,
        keys=None,
    )
    mark = len(proxy.log)
    with pytest.raises(IndexModeMismatchError):
        fresh.index.bulk_index(index_name(tenant, 1), [clear])
    assert _in_clear(_wire_since(proxy, mark)) == []
    # ... and a plaintext generation is never created for a tenant whose head names a customer key.
    with pytest.raises(SearchBindingError, match="refusing to create a plaintext"):
        fresh.index.create_generation(tenant, 5, IndexMode.PLAINTEXT)

    # Editing the signed generation record instead breaks its signature: refused, alarmed.
    con = sqlite3.connect(db)
    body = con.execute("select body from search_generations where tenant_id=?", (tenant,)).fetchone()[0]
    con.execute(
        "update search_generations set body=? where tenant_id=?",
        (bytes(body).replace(b'"mode":"keyed"', b'"mode":"plaintext"'), tenant),
    )
    con.commit()
    con.close()
    fresh = platform()
    with pytest.raises(SearchBindingError, match="does not verify"):
        fresh.open_archive(tenant)
    assert "alarm.search_binding" in _alarms(fresh, tenant)
