"""A tenant's own Azure storage account through the enable flow on the real stack (Azurite
pool accounts standing in for accounts Resource Manager would create): a run cancelled
before cutover deletes the account and releases the pool account; a run planned by an
earlier release, onto a container in the platform account, still resumes and completes."""

from __future__ import annotations

from conftest import invariants, run_plan, storage_snapshot

from archive_kms.errors import TransientError
from archive_kms.migration import cancel, execute, plan_enable, plan_remove, resume, trigger
from archive_kms.migration import steps as steps_module
from archive_kms.state.account_pool import SqlAccountPool
from archive_kms.state.port import RunState
from archive_kms.storage import Location


def test_cancel_before_cutover_deletes_the_tenant_account(flow_platform, archived_tenant, customer_key, monkeypatch):
    p = flow_platform
    archived = archived_tenant("azure", records=12, seed=5)
    t = archived.tenant_id
    real_copy = steps_module.STEP_FUNCTIONS["copy"]

    def copy_then_fail(ctx):
        real_copy(ctx)
        raise TransientError("injected: stop after the copy")

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "copy", copy_then_fail)
    plan = plan_enable(p, t, "byokv", customer_key("byokv", "azure"), shards=2)
    dest = plan.destination_location
    assert dest.own_account
    run, _ = trigger(p, plan, actor="test")
    assert execute(p, run.run_id, actor="test").state == RunState.FAILED.value
    pool = SqlAccountPool(p.state)
    allocation = pool.allocation(dest.account)
    assert allocation is not None and allocation.tenant_id == t
    account = p.provisioner.blob_service(dest)
    copied = sum(1 for _ in p.store_for(dest).list())
    assert copied == len(archived.snapshot)  # the copies landed in the tenant's account

    out = cancel(p, run.run_id, actor="support")

    assert out.state == RunState.CANCELLED.value and "create_destination" in out.message
    assert not p.provisioner.exists(dest)
    assert pool.allocation(dest.account) is None  # released
    assert [c.name for c in account.list_containers()] == []  # the pool account is empty again
    assert p.location_of(t) == plan.source_location
    assert storage_snapshot(p, t) == archived.snapshot  # the source untouched


def test_a_run_planned_onto_a_platform_account_container_still_resumes(
    flow_platform, archived_tenant, customer_key, monkeypatch
):
    """Plans stored by earlier releases name container byok-<tenant> in the platform account
    (no own_account key): such a run resumes after a failure and completes there."""
    p = flow_platform
    archived = archived_tenant("azure", records=10, seed=9)
    t = archived.tenant_id
    old_style = p.settings.model_copy(update={"azure_dedicated_storage": "container"})
    p.settings, settings = old_style, p.settings
    try:
        plan = plan_enable(p, t, "byokv", customer_key("byokv", "azure"), shards=2)
    finally:
        p.settings = settings
    assert "own_account" not in plan.destination and plan.destination["account"] == p.settings.shared_azure_account
    real_verify = steps_module.STEP_FUNCTIONS["verify"]
    calls = []

    def verify_fails_once(ctx):
        calls.append(1)
        if len(calls) == 1:
            raise TransientError("injected: a worker died")
        return real_verify(ctx)

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "verify", verify_fails_once)
    run, _ = trigger(p, plan, actor="test")
    assert execute(p, run.run_id, actor="test").state == RunState.FAILED.value
    resumed = resume(p, run.run_id, actor="support")  # reads the stored plan back
    assert resumed.state == RunState.COMPLETED.value, resumed.error
    loc = Location.from_dict(p.state.get_tenant(t).location)
    assert (loc.account, loc.container, loc.own_account) == (p.settings.shared_azure_account, f"byok-{t}", False)
    invariants(p, t, archived.snapshot)
    # and remove brings it back from there
    assert run_plan(p, plan_remove(p, t, shards=2)).state == RunState.COMPLETED.value
    assert not p.provisioner.exists(loc)
