"""Reclaiming runs whose executor is gone (``migration.reclaim``, issue #19) on the
in-memory platform with the recording launcher: which runs are taken for dead (lease
expired, flow run ended or stuck without the lease) and which are not (alive, queued for
a fleet slot, waiting for a worker), what a reclaim does (lost flow runs marked crashed,
a resume submitted with the run's task runner, audited), that the resumed run completes
with every object, and that a poison run is left to support."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archive_kms.config import Settings
from archive_kms.migration import execute, plan_enable, resume, trigger
from archive_kms.migration.reclaim import MIN_UNSTARTED_AFTER, reclaim
from archive_kms.operations.archive import JobSpec, submit_job
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import create_tenant
from archive_kms.state.port import RunState, StepState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from console_fixtures import RecordingLauncher

TENANT = "acme"
LEASE_TTL = 0.3  # seconds: expired leases without waiting long


@pytest.fixture
def platform() -> Platform:
    p = Platform.in_memory(Settings(aws_endpoint_url=None, lease_ttl_seconds=LEASE_TTL))
    create_tenant(p, TENANT, cloud="s3", provision_storage=False)
    spec = JobSpec("seed", TENANT, "synthetic", synthetic={"count": 12, "seed": 3, "mix": "small", "workspaces": 2})
    assert submit_job(p.state, spec, p.open_archive).decision == "run"
    return p


def _submitted_run(p: Platform, launcher: RecordingLauncher, *, task_runner: str = "threads") -> tuple[str, str]:
    """A run triggered and submitted the way the console does: (run id, flow run id)."""
    from archive_kms.migration.launch import start_enable

    plan = plan_enable(p, TENANT, "byokms", "memory://customer-1")
    started = start_enable(p, launcher, TENANT, "byokms", plan.key_ref, actor="test", task_runner=task_runner)
    assert started.created and started.flow_run_id
    return started.run_id, started.flow_run_id


def _executor_dies_mid_run(p: Platform, run_id: str) -> None:
    """What a worker killed with kill -9 leaves: the lease taken, a step running, no release."""
    lease = p.state.acquire_lease(TENANT, run_id, timedelta(seconds=LEASE_TTL))
    p.state.update_step(run_id, "preflight", StepState.RUNNING, fence=lease.fence)


def _later(seconds: float = 3600) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_a_run_whose_lease_expired_is_resumed_on_the_pool_and_completes(platform):
    launcher = RecordingLauncher()
    run_id, first = _submitted_run(platform, launcher, task_runner="dask")
    launcher.move(first, "running")
    _executor_dies_mid_run(platform, run_id)

    assert reclaim(platform, launcher) == []  # the lease is still valid: nothing to do yet
    time.sleep(LEASE_TTL * 1.5)
    (done,) = reclaim(platform, launcher, actor="ops")
    assert done.run_id == run_id and "lease expired" in done.reason and done.crashed == (first,)
    resubmitted = launcher.submitted[-1]
    assert resubmitted["deployment"] == "migration-support/support" and resubmitted["id"] == done.submitted
    params = resubmitted["parameters"]
    assert (params["run_id"], params["action"], params["task_runner"]) == (run_id, "resume", "dask")
    (newest, old) = launcher.launches(run_id)
    assert (newest.state, old.state, old.terminal) == ("scheduled", "crashed", True)
    assert reclaim(platform, launcher, clock=_later) == []  # the resume waits for a worker: not again

    # a live worker takes the resume (what the support flow does)
    outcome = resume(platform, run_id, actor="worker-2")
    assert outcome.state == "completed", outcome
    audit = [r for r in platform.state.iter_audit(tenant_id=TENANT) if r.run_id == run_id]
    reclaims = [r for r in audit if r.action == "run.reclaim"]
    assert len(reclaims) == 1 and reclaims[0].actor == "ops" and reclaims[0].details["crashed_flow_runs"] == [first]
    assert platform.state.get_lease(TENANT) is None


def test_a_run_holding_a_live_lease_is_never_taken_for_dead(platform):
    """Executing, or queued for a slot of the fleet's run limit: its heartbeat renews the
    lease, whatever Prefect shows."""
    launcher = RecordingLauncher()
    run_id, first = _submitted_run(platform, launcher)
    launcher.move(first, "running", since=datetime.now(UTC) - timedelta(hours=2))
    platform.state.acquire_lease(TENANT, run_id, timedelta(hours=1))
    assert reclaim(platform, launcher) == []
    assert len(launcher.submitted) == 1


def test_a_run_waiting_for_a_worker_is_left_alone(platform):
    launcher = RecordingLauncher()
    _submitted_run(platform, launcher)  # scheduled, no worker yet
    assert reclaim(platform, launcher, clock=_later) == []


def test_a_flow_run_that_ended_without_settling_the_run_is_resubmitted(platform):
    launcher = RecordingLauncher()
    run_id, first = _submitted_run(platform, launcher)
    launcher.settle(first, "crashed", "process exited")
    (done,) = reclaim(platform, launcher)
    assert "ended crashed" in done.reason and done.crashed == ()
    assert launcher.launches(run_id)[0].state == "scheduled"


def test_a_flow_run_stuck_started_without_the_lease_is_resubmitted_after_the_grace(platform):
    """The worker died between starting the flow-run process and the run taking its lease."""
    launcher = RecordingLauncher()
    run_id, first = _submitted_run(platform, launcher)
    launcher.move(first, "pending")
    grace = timedelta(seconds=2 * LEASE_TTL)
    assert reclaim(platform, launcher, unstarted_after=timedelta(minutes=5)) == []
    (done,) = reclaim(platform, launcher, unstarted_after=grace, clock=lambda: _later(60))
    assert "pending" in done.reason and done.crashed == (first,)


def test_a_slow_starting_flow_run_is_not_taken_for_lost_before_the_minimum_grace(platform):
    """A flow-run process on a loaded host stays pending for tens of seconds: with a short
    lease TTL the default grace is still MIN_UNSTARTED_AFTER, not twice the TTL."""
    launcher = RecordingLauncher()
    _, first = _submitted_run(platform, launcher)
    launcher.move(first, "pending")
    short = (MIN_UNSTARTED_AFTER - timedelta(seconds=5)).total_seconds()
    assert short > 2 * LEASE_TTL
    assert reclaim(platform, launcher, clock=lambda: _later(short)) == []
    (done,) = reclaim(platform, launcher, clock=lambda: _later(MIN_UNSTARTED_AFTER.total_seconds() + 5))
    assert done.crashed == (first,)


def test_an_in_process_run_whose_lease_expired_is_resumed_on_the_pool(platform):
    """A run executed by `--wait` (no flow run of a deployment) and killed: only its lease tells."""
    launcher = RecordingLauncher()
    run, _ = trigger(platform, plan_enable(platform, TENANT, "byokms", "memory://customer-1"), actor="test")
    assert reclaim(platform, launcher, clock=_later) == []  # never started: nothing says it died
    _executor_dies_mid_run(platform, run.run_id)
    (done,) = reclaim(platform, launcher, clock=_later)
    assert done.submitted and launcher.submitted[-1]["parameters"]["task_runner"] == "threads"


def test_a_run_submitted_too_often_is_left_for_support(platform):
    launcher = RecordingLauncher()
    run_id, first = _submitted_run(platform, launcher)
    launcher.settle(first, "crashed")
    for _ in range(3):
        (done,) = reclaim(platform, launcher, max_launches=3)
        if done.submitted:
            launcher.settle(done.submitted, "crashed")
    (done,) = reclaim(platform, launcher, max_launches=3)
    assert done.submitted is None and "3 times" in done.skipped
    assert len(launcher.launches(run_id)) == 3
    assert platform.state.get_run(run_id).state is RunState.RUNNING


def test_a_completed_run_is_not_reclaimed(platform):
    launcher = RecordingLauncher()
    run_id, first = _submitted_run(platform, launcher)
    assert execute(platform, run_id, actor="worker", handle_signals=False).state == "completed"
    launcher.settle(first, "completed")
    assert reclaim(platform, launcher, clock=_later) == []


def test_a_run_that_settled_after_the_listing_is_not_taken_for_lost(platform):
    """The run settles, then its flow run ends: a reclaimer that listed the run as running
    before and reads the ended flow run after must see the settled run, not a lost one."""
    launcher = RecordingLauncher()
    run_id, first = _submitted_run(platform, launcher)
    listed = platform.state.list_runs(states=[RunState.RUNNING])
    platform.state.set_run_state(run_id, RunState.COMPLETED)
    launcher.settle(first, "completed", "done")

    class Stale:
        def __getattr__(self, name):
            return getattr(platform.state, name)

        def list_runs(self, **kw):
            return listed

    stale = Platform.__new__(Platform)
    stale.__dict__.update(platform.__dict__)
    stale.__dict__["state"] = Stale()
    assert reclaim(stale, launcher) == []
    assert launcher.launches(run_id)[0].state == "completed"
