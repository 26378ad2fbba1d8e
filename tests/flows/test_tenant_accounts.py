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


def test_cli_enable_killed_then_runs_cancel_releases_the_tenant_account(
    flow_platform, archived_tenant, customer_key, prefect_api, tmp_path
):
    """The operator's path: `archive-kms enable --mode kmip --cloud azure --wait` dies after
    the copy (SIGKILL at a crash point), `archive-kms runs cancel --takeover` deletes the
    tenant's account and releases its pool account."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    p = flow_platform
    archived = archived_tenant("azure", records=8, seed=13)
    t = archived.tenant_id
    cli = str(Path(sys.executable).with_name("archive-kms"))
    env = {k: v for k, v in os.environ.items() if k != "ARCHIVE_KMS_CRASH_AT"}
    env.update(ARCHIVE_KMS_STATE_URL=p.settings.state_url, ARCHIVE_KMS_LEASE_TTL_SECONDS="3")
    key_ref = customer_key("kmip", "azure")
    killed = subprocess.run(
        [
            cli,
            "enable",
            t,
            "--mode",
            "kmip",
            "--cloud",
            "azure",
            "--key-ref",
            key_ref,
            "--shards",
            "2",
            "--json",
            "--wait",
        ],
        env=dict(env, ARCHIVE_KMS_CRASH_AT="after:copy"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = p.state.list_runs(t)
    dest = Location.from_dict(run.params["destination"])
    assert dest.own_account and dest.cmk_key_url is None  # KMIP: no Key Vault key to encrypt the account with
    assert p.provisioner.exists(dest)
    account = p.provisioner.blob_service(dest)

    cancelled = subprocess.run(
        [cli, "runs", "cancel", run.run_id, "--takeover", "--json", "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cancelled.returncode == 0, cancelled.stderr[-3000:]
    assert json.loads(cancelled.stdout)["outcome"]["state"] == RunState.CANCELLED.value
    assert not p.provisioner.exists(dest)
    assert SqlAccountPool(p.state).allocation(dest.account) is None
    assert [c.name for c in account.list_containers()] == []
    assert storage_snapshot(p, t) == archived.snapshot
