"""Regression tests for the review of the migration engine (in memory): cancel re-binds
the key the tenant had when the run was planned; the resume step never completes with
jobs still queued; cleanup re-checks reality before deleting the source; a verify
mismatch converges on a plain resume; reruns respect cancel and a half-done cutover."""

from __future__ import annotations

import pytest
from test_migration_engine import TENANT, archived_platform, job  # shared setup

from archive_kms.errors import TransientError, ValidationError
from archive_kms.migration import cancel, execute, plan_enable, rerun, resume, trigger
from archive_kms.migration import steps as steps_module
from archive_kms.migration.copying import read_plaintext_digest
from archive_kms.operations import archive as archive_module
from archive_kms.operations.archive import submit_job
from archive_kms.operations.platform import Platform
from archive_kms.state.port import GateState, RunState, StepState
from archive_kms.storage import Location

KEY = "memory://customer"


def _platform() -> Platform:
    return archived_platform(12)


def _once(monkeypatch, step: str, *, after: bool, effect=None) -> None:
    real = steps_module.STEP_FUNCTIONS[step]
    fired = {"n": 0}

    def wrapped(ctx):
        if not fired["n"] and not after:
            fired["n"] += 1
            raise TransientError(f"injected before {step}")
        result = real(ctx)
        if not fired["n"]:
            fired["n"] += 1
            if effect is not None:
                effect(ctx)
            raise TransientError(f"injected after {step}")
        return result

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, step, wrapped)


def test_cancel_rebinds_the_planned_key_even_after_a_rerun_of_bind_key(monkeypatch):
    p = _platform()
    managed = p.keychain.status(TENANT).l1_ref
    _once(monkeypatch, "bind_key", after=True)  # re-wrapped, then "crashed" before recording
    run, _ = trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    assert execute(p, run.run_id, actor="t").state == "failed"
    _once(monkeypatch, "copy", after=False)
    assert resume(p, run.run_id, actor="t").state == "failed"  # bind reran: its "from" is the customer key
    assert p.state.get_run(run.run_id).step("bind_key").result["from"] != managed

    assert cancel(p, run.run_id, actor="support").state == "cancelled"
    assert p.keychain.status(TENANT).l1_ref == managed


def test_resume_step_does_not_complete_while_deferred_jobs_wait(monkeypatch):
    p = _platform()

    def defer_two(ctx):
        for i in range(2):
            assert submit_job(p.state, job(f"during-{i}", 2, offset=12 + 2 * i), p.open_archive).decision == "deferred"

    _once(monkeypatch, "copy", after=True, effect=defer_two)
    run, _ = trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    assert execute(p, run.run_id, actor="t").state == "failed"

    real_run = archive_module._run
    calls = {"n": 0}

    def first_replay_fails(state, spec, attempt, open_archive, **kw):
        calls["n"] += 1

        def failing_open(tenant):
            raise TransientError("injected: the store did not answer")

        # through the real _run, so the failed attempt is recorded as the writer would
        return real_run(state, spec, attempt, failing_open if calls["n"] == 1 else open_archive, **kw)

    monkeypatch.setattr(archive_module, "_run", first_replay_fails)
    out = resume(p, run.run_id, actor="t")
    assert out.state == "failed" and "injected" in (out.error or ""), out.error
    assert p.state.get_run(run.run_id).step("resume").state is StepState.FAILED
    assert p.state.gate(TENANT).pending == 2  # both still queued: one failed, one never reached

    out = resume(p, run.run_id, actor="t")  # claims of the dead attempt are taken over at once
    assert out.state == "completed", out.error
    gate = p.state.gate(TENANT)
    assert gate.state is GateState.OPEN and gate.pending == 0
    assert [j.job_id for j in p.state.list_deferred(TENANT)] == []


def test_cleanup_refuses_when_the_destination_lost_an_object_after_verify(monkeypatch):
    p = _platform()

    def lose_one(ctx):
        store = ctx.platform.store_for(ctx.plan.destination_location)
        store.delete(next(iter(store.list())).name)

    _once(monkeypatch, "build_index", after=True, effect=lose_one)
    run, _ = trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    assert execute(p, run.run_id, actor="t").state == "failed"  # the injected build_index failure
    source = p.store_for(Location.from_dict(p.state.get_run(run.run_id).params["source"]))
    before = sorted(i.name for i in source.list())
    out = resume(p, run.run_id, actor="t")
    assert out.state == "failed" and "refusing to delete the source" in (out.error or ""), out.error
    assert sorted(i.name for i in source.list()) == before  # nothing deleted


def test_a_verify_mismatch_converges_on_a_plain_resume(monkeypatch):
    p = _platform()

    def corrupt_one(ctx):
        from archive_kms.state.port import CopyRecord, CopyStatus

        rec = next(iter(ctx.platform.state.iter_copies(ctx.run_id)))
        ctx.platform.state.record_copy(
            ctx.run_id, CopyRecord(rec.name, CopyStatus.COPIED, rec.dest_etag, rec.dest_size, "00" * 32)
        )

    _once(monkeypatch, "copy", after=True, effect=corrupt_one)
    run, _ = trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    assert execute(p, run.run_id, actor="t").state == "failed"  # injected after copy
    out = resume(p, run.run_id, actor="t")  # verify finds the wrong digest: marks it failed
    assert out.state == "failed" and "failed verification" in (out.error or ""), out.error
    out = resume(p, run.run_id, actor="t")  # verify copies it again first, then passes
    assert out.state == "completed", out.error
    assert p.state.get_run(run.run_id).step("verify").result["recopied"] >= 1
    dest = p.store_for(p.location_of(TENANT))
    for info in dest.list():
        read_plaintext_digest(dest, p.keychain, TENANT, info.name)


def test_rerun_refuses_a_cancelled_run_and_steps_before_a_half_done_cutover(monkeypatch):
    p = _platform()
    _once(monkeypatch, "copy", after=False)
    run, _ = trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    execute(p, run.run_id, actor="t")
    cancel(p, run.run_id, actor="t")
    with pytest.raises(ValidationError, match="cancelled"):
        rerun(p, run.run_id, "copy", actor="t")
    assert p.state.get_run(run.run_id).state is RunState.CANCELLED

    monkeypatch.undo()
    _once(monkeypatch, "cutover", after=True)  # registry moved, alias moved, "crashed" before recording
    run2, _ = trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    assert execute(p, run2.run_id, actor="t").state == "failed"
    with pytest.raises(ValidationError, match="Rerun from cutover"):
        rerun(p, run2.run_id, "copy", actor="t")
    assert rerun(p, run2.run_id, "cutover", actor="t").state == "completed"


def test_a_new_trigger_is_refused_while_a_failed_run_waits_for_support(monkeypatch):
    from archive_kms.errors import StateError

    p = _platform()
    _once(monkeypatch, "copy", after=False)
    run, _ = trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    assert execute(p, run.run_id, actor="t").state == "failed"
    with pytest.raises(StateError, match=f"failed enable run {run.run_id} \\(at step copy\\).*runs cancel"):
        trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    assert len(p.state.list_runs(TENANT)) == 1
    cancel(p, run.run_id, actor="support")
    run2, created = trigger(p, plan_enable(p, TENANT, "byokms", KEY), actor="t")
    assert created and run2.run_id != run.run_id
