"""Enable end to end on the real services, per mode (issue 6, "Tests that must exist").

A managed-key tenant on shared storage with records and attachments is moved onto a
fresh customer key by the migration engine (plan_enable + trigger + execute, shards in
threads; the Prefect wrapper is tested elsewhere). Afterwards: everything readable and
searchable under the new key, nothing left in the shared location or the old index, the
dedicated S3 bucket's default encryption names the customer key (AWS-held keys), counts
and plaintext digests equal, no plaintext in the new index; and a customer who disables
the key on its server cuts off reads once the key cache is purged.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from conftest import es_documents, invariants, run_plan, tenant_indices

from archive_kms import clients
from archive_kms.domain.records import Record
from archive_kms.domain.tenants import azure_storage_account_name
from archive_kms.errors import KeyUnavailableError
from archive_kms.keys.refs import parse_key_ref
from archive_kms.migration import plan_enable
from archive_kms.search import Query
from archive_kms.state.port import KeyMode, RunState
from archive_kms.storage import Kind, Location

CASES = [("byokms", "s3"), ("byok", "s3"), ("byokv", "azure"), ("byok", "azure"), ("kmip", "s3"), ("kmip", "azure")]


def plaintext_words_in(raw_documents: list[dict[str, Any]], records: list[Record]) -> set[str]:
    """Words (4+ characters) of the records that stand alone as a token in the raw
    documents. Substrings of base64 ciphertext or HMAC tokens are not evidence; a whole
    token equal to a record word (any case) is."""
    raw = json.dumps(raw_documents)
    tokens = set(re.findall(r"[A-Za-z0-9]+", raw))
    tokens |= {t.lower() for t in tokens}
    leaked: set[str] = set()
    for r in records:
        for value in [r.record_id, r.object_type, *[str(v) for v in r.fields.values() if v is not None]]:
            for word in re.findall(r"[A-Za-z0-9]+", value):
                if len(word) >= 4 and (word in tokens or word.lower() in tokens):
                    leaked.add(word)
    return leaked


def shared_location_leftovers(platform, shared: Location) -> int:
    """Objects still in the tenant's shared location (0 if the container is gone)."""
    if not platform.provisioner.exists(shared):
        return 0
    return sum(1 for _ in platform.store_for(shared).list())


def read_first_record(platform, tenant: str, records: list[Record]) -> Record:
    r = records[0]
    return platform.open_archive(tenant).read_record(r.workspace_id, r.object_type, r.record_id)


@pytest.mark.parametrize(("mode", "cloud"), CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_enable_moves_tenant_onto_customer_key(flow_platform, archived_tenant, customer_key, mode, cloud):
    p = flow_platform
    archived = archived_tenant(cloud, records=25, seed=21)
    t = archived.tenant_id
    shared = p.location_of(t)
    old_index = p.index.current_index(t)
    es = clients.elasticsearch_client(p.settings)
    assert es.indices.exists(index=old_index)
    key_ref = customer_key(mode, cloud)

    plan = plan_enable(p, t, mode, key_ref, cloud=cloud, shards=4)
    outcome = run_plan(p, plan)

    assert outcome.state == RunState.COMPLETED.value, outcome.error
    tenant = p.state.get_tenant(t)
    assert tenant.key_mode is KeyMode(mode)
    dest = Location.from_dict(tenant.location)
    assert dest.kind is Kind.DEDICATED and dest.uri == plan.destination_location.uri
    # the keychain's L1 is the customer key
    assert p.keychain.status(t).l1_ref == plan.key_ref

    # counts and digests equal; one document per record; no pending uploads; lease, gate
    figures = invariants(p, t, archived.snapshot)
    assert figures["records"] == archived.record_count == figures["documents"]

    # every record readable under the new key
    archive = p.open_archive(t)
    for r in archived.records:
        assert archive.read_record(r.workspace_id, r.object_type, r.record_id) == r

    # searchable: by a word, and by a field filter, through the new (keyed) index
    first = archived.records[0]
    word = first.fields["Description"].split()[-1]
    assert first.record_id in {h.record_id for h in archive.search(Query(text=word, limit=100))}
    by_name = archive.search(Query(filters={"Name": first.fields["Name"]}))
    assert [h.record_id for h in by_name] == [first.record_id]
    assert p.index.current_index(t) == plan.new_index != old_index

    # nothing left in the shared location or the old index
    assert shared_location_leftovers(p, shared) == 0
    assert not es.indices.exists(index=old_index)
    assert tenant_indices(p, t) == [plan.new_index]

    # S3: the dedicated bucket's default encryption names the customer key (AWS-held keys)
    if cloud == "s3":
        rules = clients.aws_client("s3", p.settings).get_bucket_encryption(Bucket=dest.bucket)[
            "ServerSideEncryptionConfiguration"
        ]["Rules"]
        default = rules[0]["ApplyServerSideEncryptionByDefault"]
        if mode in ("byokms", "byok"):
            arn = parse_key_ref(key_ref).api_key_id
            assert default["SSEAlgorithm"] == "aws:kms" and default["KMSMasterKeyID"] == arn, default

    # Azure: the tenant's own storage account (an Azurite pool account stands in for it),
    # named by the rule, recording the customer's Key Vault key (versionless) for byokv and byok (Azure)
    if cloud == "azure":
        assert dest.own_account and dest.container == f"byok-{t}"
        assert dest.account == azure_storage_account_name(t, prefix=p.settings.azure_tenant_account_prefix)
        want = parse_key_ref(key_ref).with_version(None).key_id if mode in ("byokv", "byok") else None
        assert dest.cmk_key_url == want
        account = p.provisioner.blob_service(dest)
        assert account.account_name != p.settings.shared_azure_account
        assert dest.container in [c.name for c in account.list_containers()]

    # the new index holds no plaintext
    docs = es_documents(p, plan.new_index)
    assert len(docs) == archived.record_count
    leaked = plaintext_words_in(docs, archived.records)
    assert not leaked, f"plaintext in the new index: {sorted(leaked)[:10]}"

    # the customer disables the key: once the cache is purged, reads are refused
    customer_key.disable(key_ref)
    try:
        p.keychain.cache.purge(t)
        with pytest.raises(KeyUnavailableError):
            read_first_record(p, t, archived.records)
    finally:
        if customer_key.can_reenable(key_ref):
            customer_key.enable(key_ref)
    if customer_key.can_reenable(key_ref):
        p.keychain.cache.purge(t)
        assert read_first_record(p, t, archived.records) == first
