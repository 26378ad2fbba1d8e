"""The engine when the state store fails around its own bookkeeping (issue 17; faults D4,
I6), on the in-memory platform with the store's methods made to fail on cue:

* the store is unreachable while a failed step is recorded: the failure is still
  recorded once the store answers (the run ends failed and resumable, not ``running``
  with the worker gone), and a lease that cannot be released does not replace the outcome;
* the ``run.start`` record is lost after the run was created: the first worker that
  executes the run writes it (marked recovered), so no run lacks its start (I6);
* the ``run.complete`` record cannot be written: the run is not marked completed without
  it; a resume completes it and records it;
* a worker killed after its run ended but before it released the lease: the next run
  takes the lease at once.
"""

from __future__ import annotations

import pytest
from test_migration_engine import TENANT, archived_platform, enable_plan, remove_plan

from archive_kms.errors import ServiceUnavailableError
from archive_kms.migration import execute, resume, trigger
from archive_kms.migration import steps as steps_module
from archive_kms.state.port import RunState, StepState


class Flaky:
    """Makes ``obj.name`` raise ServiceUnavailableError while ``when(*args, **kw)`` and
    ``left`` > 0 (``left=None``: until ``heal()``)."""

    def __init__(self, monkeypatch, obj, name: str, when=lambda *a, **k: True, left: int | None = None) -> None:
        self.real = getattr(obj, name)
        self.left = left
        self.failed = 0
        self.healed = False

        def flaky(*args, **kwargs):
            if not self.healed and when(*args, **kwargs) and (self.left is None or self.left > 0):
                if self.left is not None:
                    self.left -= 1
                self.failed += 1
                raise ServiceUnavailableError(f"{name}: state store is not answering (injected)")
            return self.real(*args, **kwargs)

        monkeypatch.setattr(obj, name, flaky)

    def heal(self) -> None:
        self.healed = True


def _audits(p, run_id: str, action: str) -> list:
    return [r for r in p.state.iter_audit(tenant_id=TENANT) if r.run_id == run_id and r.action == action]


def test_a_failed_step_is_recorded_failed_through_a_state_store_blip(monkeypatch):
    p = archived_platform(records=6)
    run, _ = trigger(p, enable_plan(p), actor="t")

    def broken_copy(ctx):
        raise ServiceUnavailableError("copy: the state store restarted (injected)")

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, "copy", broken_copy)
    failing = Flaky(monkeypatch, p.state, "update_step", when=lambda *a, **k: a[2] is StepState.FAILED, left=2)
    Flaky(monkeypatch, p.state, "release_lease", left=1)
    out = execute(p, run.run_id, actor="t", handle_signals=False)
    assert out.state == RunState.FAILED.value and out.error.startswith("ServiceUnavailableError"), out
    assert failing.failed == 2
    stored = p.state.get_run(run.run_id)
    assert stored.state is RunState.FAILED and stored.step("copy").state is StepState.FAILED
    assert p.state.get_lease(TENANT) is None, "the lease was not released once the store answered"
    assert len(_audits(p, run.run_id, "run.fail")) == 1

    monkeypatch.undo()
    done = resume(p, run.run_id, actor="t", handle_signals=False)
    assert done.state == RunState.COMPLETED.value, done.error


def test_a_run_whose_start_record_was_lost_gets_it_when_executed(monkeypatch):
    p = archived_platform(records=6)
    lost = Flaky(monkeypatch, p.state, "append_audit", when=lambda e: e.action == "run.start", left=1)
    with pytest.raises(ServiceUnavailableError):
        trigger(p, enable_plan(p), actor="t")
    assert lost.failed == 1
    (run,) = p.state.list_runs(TENANT)
    assert _audits(p, run.run_id, "run.start") == []
    out = resume(p, run.run_id, actor="t", handle_signals=False)
    assert out.state == RunState.COMPLETED.value, out.error
    starts = _audits(p, run.run_id, "run.start")
    assert len(starts) == 1 and starts[0].details["recovered"] is True
    assert starts[0].details["flow"] == "enable" and starts[0].details["mode"] == "byokms"


def test_a_run_is_never_completed_without_its_completion_record(monkeypatch):
    p = archived_platform(records=6)
    run, _ = trigger(p, enable_plan(p), actor="t")
    lost = Flaky(monkeypatch, p.state, "append_audit", when=lambda e: e.action == "run.complete")
    with pytest.raises(ServiceUnavailableError):
        execute(p, run.run_id, actor="t", handle_signals=False)
    assert lost.failed >= 1
    stored = p.state.get_run(run.run_id)
    assert stored.state is RunState.RUNNING, "the run was marked completed without its run.complete record"
    assert all(s.state is StepState.COMPLETED for s in stored.steps)
    lost.heal()
    out = resume(p, run.run_id, actor="t", handle_signals=False)
    assert out.state == RunState.COMPLETED.value and out.executed == (), out
    assert p.state.get_run(run.run_id).state is RunState.COMPLETED
    assert len(_audits(p, run.run_id, "run.complete")) == 1


def test_a_lease_left_by_a_worker_killed_after_its_run_ended_does_not_block_the_next_run():
    """A worker killed between marking its run completed and releasing the lease leaves a
    live lease behind (found by the random-kill soak, seed 20060). It protects nothing: the
    next run of the tenant takes it at once instead of failing with LeaseHeldError until
    it expires."""
    from datetime import timedelta

    p = archived_platform(records=6)
    run, _ = trigger(p, enable_plan(p), actor="t")
    assert execute(p, run.run_id, actor="t", handle_signals=False).state == RunState.COMPLETED.value
    p.state.acquire_lease(TENANT, run.run_id, timedelta(minutes=5))  # what the killed worker held
    back, created = trigger(p, remove_plan(p), actor="t")
    assert created
    out = execute(p, back.run_id, actor="t", handle_signals=False)
    assert out.state == RunState.COMPLETED.value, out.error
    assert p.state.get_lease(TENANT) is None


def test_a_running_runs_lease_still_blocks_another_run():
    """Only a lease whose run has ended is taken over: a live worker's is not."""
    from datetime import timedelta

    from archive_kms.errors import LeaseHeldError

    p = archived_platform(records=6)
    run, _ = trigger(p, enable_plan(p), actor="t")
    p.state.acquire_lease(TENANT, "f" * 32, timedelta(minutes=5))  # another run, still running
    with pytest.raises(LeaseHeldError):
        execute(p, run.run_id, actor="t", handle_signals=False)
