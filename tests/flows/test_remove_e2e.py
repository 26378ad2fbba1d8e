"""Remove end to end on the real services: a tenant moved onto its own key (byokms on S3,
byokv on Azure) is brought back to shared storage under the managed key with a
plaintext index; the dedicated bucket/container and its index are deleted; nothing is
lost, duplicated or changed (plaintext digests equal to the original snapshot)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from conftest import invariants, run_plan, tenant_indices

from archive_kms import clients
from archive_kms.migration import plan_enable, plan_remove
from archive_kms.operations.tenants import MANAGED_KEY_REF
from archive_kms.search import IndexMode, Query
from archive_kms.state.port import KeyMode, RunState
from archive_kms.storage import Cloud, Kind, Location

CASES = [("byokms", "s3"), ("byokv", "azure")]


def dedicated_is_gone(platform, loc: Location) -> bool:
    """The dedicated bucket answers 404 to HEAD (S3), or the container does not exist."""
    if loc.cloud is Cloud.S3:
        try:
            clients.aws_client("s3", platform.settings).head_bucket(Bucket=loc.bucket)
        except ClientError as exc:
            return exc.response["Error"]["Code"] in ("404", "NoSuchBucket", "NotFound")
        return False
    if loc.own_account:  # the tenant's own account: gone, its pool account released
        from archive_kms.state.account_pool import SqlAccountPool

        return not platform.provisioner.exists(loc) and SqlAccountPool(platform.state).allocation(loc.account) is None
    container = clients.blob_service_client(platform.settings).get_container_client(loc.container)
    return not container.exists()


@pytest.mark.parametrize(("mode", "cloud"), CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_remove_brings_tenant_back_to_managed_key(flow_platform, archived_tenant, customer_key, mode, cloud):
    p = flow_platform
    archived = archived_tenant(cloud, records=20, seed=33)
    t = archived.tenant_id
    key_ref = customer_key(mode, cloud)
    enabled = run_plan(p, plan_enable(p, t, mode, key_ref, cloud=cloud, shards=4))
    assert enabled.state == RunState.COMPLETED.value, enabled.error
    dedicated = p.location_of(t)
    assert dedicated.kind is Kind.DEDICATED and dedicated.own_account is (cloud == "azure")
    account = p.provisioner.blob_service(dedicated) if dedicated.own_account else None
    byok_index = p.index.current_index(t)

    plan = plan_remove(p, t, shards=4)
    outcome = run_plan(p, plan)

    assert outcome.state == RunState.COMPLETED.value, outcome.error
    tenant = p.state.get_tenant(t)
    back = Location.from_dict(tenant.location)
    assert tenant.key_mode is KeyMode.MANAGED and back.kind is Kind.SHARED and back.cloud.value == cloud
    assert p.keychain.status(t).l1_ref == MANAGED_KEY_REF
    # same objects, same plaintext, one document per record, nothing pending, gate open
    figures = invariants(p, t, archived.snapshot)
    assert figures["records"] == archived.record_count == figures["documents"]

    # the dedicated bucket/container and its index are gone
    assert dedicated_is_gone(p, dedicated), f"{dedicated.uri} still exists"
    if account is not None:  # the account that stood in for it is empty again
        assert [c.name for c in account.list_containers()] == []
    es = clients.elasticsearch_client(p.settings)
    assert not es.indices.exists(index=byok_index)
    assert tenant_indices(p, t) == [plan.new_index]

    # a plaintext index again, and everything readable and searchable
    info = p.index.describe_generation(plan.new_index)
    assert info is not None and info.mode is IndexMode.PLAINTEXT and info.is_current
    archive = p.open_archive(t)
    for r in archived.records:
        assert archive.read_record(r.workspace_id, r.object_type, r.record_id) == r
    first = archived.records[0]
    word = first.fields["Description"].split()[-1]
    assert first.record_id in {h.record_id for h in archive.search(Query(text=word, limit=100))}

    # the customer's key no longer matters: disabling it does not stop reads
    customer_key.disable(key_ref)
    try:
        p.keychain.cache.purge(t)
        assert archive.read_record(first.workspace_id, first.object_type, first.record_id) == first
    finally:
        customer_key.enable(key_ref)
