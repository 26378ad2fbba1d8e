"""Cancelling a run that has not cut over puts the tenant back as it was (in memory):
tenant key re-wrapped under its original key, destination and new index deleted, old index
writable, jobs deferred during the run replayed into the source; refused after cutover;
never deletes a destination this run did not create."""

from __future__ import annotations

import pytest
from test_migration_engine import TENANT, archived_platform, digests, job  # shared setup

from archive_kms.errors import TransientError, ValidationError
from archive_kms.migration import cancel, execute, plan_enable, trigger
from archive_kms.migration import steps as steps_module
from archive_kms.operations.archive import submit_job
from archive_kms.operations.platform import Platform
from archive_kms.search import Query
from archive_kms.state.port import GateState, RunState


def _platform() -> Platform:
    return archived_platform(12)


def _fail_copy_once(monkeypatch, p: Platform) -> None:
    real = steps_module.STEP_FUNCTIONS["copy"]

    def copy_then_fail(ctx):
        assert submit_job(p.state, job("during", 3, offset=12), p.open_archive).decision == "deferred"
        real(ctx)
        raise TransientError("injected: the destination went away")

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "copy", copy_then_fail)


def test_cancel_after_a_failed_copy_puts_everything_back(monkeypatch):
    p = _platform()
    before = digests(p)
    l1_before = p.keychain.status(TENANT).l1_ref
    _fail_copy_once(monkeypatch, p)
    plan = plan_enable(p, TENANT, "byokms", "memory://customer")
    run, _ = trigger(p, plan, actor="t")
    assert execute(p, run.run_id, actor="t").state == "failed"
    assert p.keychain.status(TENANT).l1_ref != l1_before  # bound to the customer key mid-run
    assert p.provisioner.exists(plan.destination_location)

    out = cancel(p, run.run_id, actor="support")

    assert out.state == "cancelled" and "bind_key" in out.message and "create_destination" in out.message
    assert p.state.get_run(run.run_id).state is RunState.CANCELLED
    assert p.keychain.status(TENANT).l1_ref == l1_before
    assert not p.provisioner.exists(plan.destination_location)
    assert p.index.describe_generation(plan.new_index) is None
    assert p.state.gate(TENANT).state is GateState.OPEN
    assert p.state.get_tenant(TENANT).key_mode.value == "managed"
    after = digests(p)
    assert {k: v for k, v in after.items() if k in before} == before  # the source untouched
    assert len(after) > len(before)  # the job deferred during the run landed in the source, once
    assert len(p.open_archive(TENANT).search(Query(limit=100)).hits) == 15  # old index writable again
    assert submit_job(p.state, job("after", 2, offset=15), p.open_archive).decision == "run"
    assert [r.action for r in p.state.iter_audit(tenant_id=TENANT)].count("run.cancel") == 1
    assert cancel(p, run.run_id, actor="support").message == "already cancelled"
    # the tenant can be onboarded afresh
    monkeypatch.undo()
    run2, created = trigger(p, plan_enable(p, TENANT, "byokms", "memory://customer"), actor="t")
    assert created and execute(p, run2.run_id, actor="t").state == "completed"


def test_cancel_after_cutover_is_refused(monkeypatch):
    p = _platform()
    real = steps_module.STEP_FUNCTIONS["cleanup_source"]

    def fail(ctx):
        raise TransientError("injected")

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "cleanup_source", fail)
    run, _ = trigger(p, plan_enable(p, TENANT, "byokms", "memory://customer"), actor="t")
    assert execute(p, run.run_id, actor="t").state == "failed"
    with pytest.raises(ValidationError, match="cannot be cancelled"):
        cancel(p, run.run_id, actor="support")
    assert p.state.get_run(run.run_id).state is RunState.FAILED
    assert real is not None


def test_cancel_never_deletes_a_destination_the_run_did_not_create():
    p = _platform()
    plan = plan_enable(p, TENANT, "byokms", "memory://customer")
    dest = plan.destination_location
    p.provisioner.create(dest)
    p.store_for(dest).put_stream(b"records/ws0/Foreign/1", [b"someone else's"])
    run, _ = trigger(p, plan, actor="t")
    out = execute(p, run.run_id, actor="t")
    # refused at preflight: the run ends cancelled by itself (ADR 0021), nothing undone
    assert out.state == "refused" and "did not write" in (out.error or "")
    assert p.state.get_run(run.run_id).state is RunState.CANCELLED

    assert cancel(p, run.run_id, actor="support").message == "already cancelled"
    assert [i.name for i in p.store_for(dest).list()] == [b"records/ws0/Foreign/1"]


@pytest.mark.parametrize("flow", ["enable", "remove"])
@pytest.mark.parametrize(
    "step", ["pause", "cutover_point", "create_destination", "bind_key", "manifest", "copy", "verify", "build_index"]
)
def test_cancel_works_from_every_step_before_cutover(monkeypatch, flow, step):
    """Whatever step failed (after its side effects), cancel puts the tenant back: same
    location, key and index, gate open, destination and new index gone, source intact."""
    from test_migration_engine import fail_once

    from archive_kms.migration import plan_remove

    p = _platform()
    if flow == "remove":
        run0, _ = trigger(p, plan_enable(p, TENANT, "byokms", "memory://customer"), actor="t")
        assert execute(p, run0.run_id, actor="t").state == "completed"
    before = digests(p)
    tenant_before = p.state.get_tenant(TENANT)
    l1_before = p.keychain.status(TENANT).l1_ref
    alias_before = p.index.current_index(TENANT)
    plan = plan_enable(p, TENANT, "byokms", "memory://customer") if flow == "enable" else plan_remove(p, TENANT)
    fail_once(monkeypatch, step, after_side_effects=True)
    run, _ = trigger(p, plan, actor="t")
    assert execute(p, run.run_id, actor="t").state == "failed"
    monkeypatch.undo()

    out = cancel(p, run.run_id, actor="support")

    assert out.state == "cancelled" and p.state.get_run(run.run_id).state is RunState.CANCELLED
    t = p.state.get_tenant(TENANT)
    assert dict(t.location) == dict(tenant_before.location) and t.key_mode is tenant_before.key_mode
    assert p.keychain.status(TENANT).l1_ref == l1_before
    assert p.index.current_index(TENANT) == alias_before
    assert p.index.describe_generation(plan.new_index) is None
    assert p.state.gate(TENANT).state is GateState.OPEN and p.state.get_lease(TENANT) is None
    if plan.destination_location.kind.value == "dedicated":
        assert not p.provisioner.exists(plan.destination_location)
    else:
        assert list(p.store_for(plan.destination_location).list()) == []
    assert digests(p) == before
    assert submit_job(p.state, job("after", 2, offset=40), p.open_archive).decision == "run"
