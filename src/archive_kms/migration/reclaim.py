"""Reclaiming runs whose executor is gone: a worker killed mid-run (``kill -9``, a lost
host) leaves its runs ``running`` in the state store, with a lease nobody renews and a
flow run the orchestrator still shows running. ``reclaim`` finds them and submits a
``resume`` of each to the support deployment, which any live worker of the pool picks up;
the resumed run takes the tenant's lease over (its fencing token grows, so the lost
executor could not write even if it came back) and continues from its first unfinished
step (docs/migration-flows.md "Workers come and go"; docs/adr/0034-reclaiming-runs.md).

The state store decides, never a clock alone: a run is reclaimed when

==================================================  ===========================================
what the state store and the orchestrator say       why the executor is gone
==================================================  ===========================================
the run's lease expired (not renewed for a TTL)     its heartbeat stopped: process or host dead
and no flow run was submitted since
its newest flow run ended (completed, failed,       the process exited without settling the run
crashed, cancelled) and the run is still running
its newest flow run has been pending or running     the worker that started it died before it
for ``unstarted_after`` without the run holding     took the lease (default: twice the lease
a lease                                             TTL, at least 2 minutes: a flow-run process
                                                    on a loaded host takes tens of seconds to
                                                    start)
==================================================  ===========================================

A run that waits for a fleet slot (``archive-kms-runs``) holds its lease (its heartbeat
runs), so it is never taken for dead; a run whose newest flow run is still ``scheduled``
waits for a worker and is left alone. The flow runs of the lost executor are marked
``crashed`` before the resume is submitted. A run that has been submitted
``max_launches`` times is left for support (a poison run must not loop). Running two
reclaimers at once is safe: the second resume finds the lease held and fails without
touching the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms.errors import ArchiveKmsError
from archive_kms.migration.launch import LaunchState, RunLauncher, start_support
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent, MigrationRun, RunState

__all__ = ["DEFAULT_MAX_LAUNCHES", "MIN_UNSTARTED_AFTER", "Reclaimed", "reclaim", "stalled_reason"]

log = logging.getLogger(__name__)

#: The shortest wait before a flow run that never took its run's lease counts as lost: a
#: flow-run process on a loaded host stays ``pending`` for tens of seconds while it starts.
MIN_UNSTARTED_AFTER = timedelta(minutes=2)
#: Flow runs submitted for one run (its first one included) after which it is left to support.
DEFAULT_MAX_LAUNCHES = 5
_WAITING = {"scheduled", "late", "paused", "cancelling", "awaitingretry"}


@dataclass(frozen=True)
class Reclaimed:
    run_id: str
    tenant_id: str
    reason: str
    submitted: str | None  # the resume's flow run id; None if not submitted (see ``skipped``)
    crashed: tuple[str, ...] = ()  # flow runs of the lost executor, marked crashed
    skipped: str | None = None  # why nothing was submitted (too many launches, submission refused)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant_id,
            "reason": self.reason,
            "submitted": self.submitted,
            "crashed": list(self.crashed),
            "skipped": self.skipped,
        }


def stalled_reason(
    platform: Platform,
    run: MigrationRun,
    launches: list[LaunchState],
    *,
    now: datetime,
    unstarted_after: timedelta,
) -> str | None:
    """Why ``run`` (running) has lost its executor, or None if it has not (module table)."""
    lease = platform.state.get_lease(run.tenant_id)
    held = lease is not None and lease.run_id == run.run_id
    if held and lease is not None and lease.expires_at > now:
        return None  # executing, or queued for a fleet slot: its heartbeat renews the lease
    latest = launches[0] if launches else None
    if latest is None:
        # started outside the deployments (an in-process run): only its lease tells
        return f"its lease expired at {lease.expires_at.isoformat(timespec='seconds')}" if held and lease else None
    if latest.state in _WAITING:
        return None  # a worker will take it
    if latest.terminal:
        return f"flow run {latest.flow_run_id} ended {latest.state} without settling the run"
    if held and lease is not None and (latest.created is None or latest.created <= lease.expires_at):
        return f"its lease expired at {lease.expires_at.isoformat(timespec='seconds')} (flow run {latest.flow_run_id})"
    since = latest.state_since or latest.created
    if since is not None and now - since >= unstarted_after:
        return (
            f"flow run {latest.flow_run_id} has been {latest.state} since {since.isoformat(timespec='seconds')} "
            "without the run holding its lease"
        )
    return None


def reclaim(
    platform: Platform,
    launcher: RunLauncher,
    *,
    actor: str = "reclaimer",
    unstarted_after: timedelta | None = None,
    max_launches: int = DEFAULT_MAX_LAUNCHES,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    limit: int = 10_000,
) -> list[Reclaimed]:
    """Resubmit every running run whose executor is gone (module docstring); one entry
    per run acted on. ``unstarted_after`` defaults to twice the lease TTL, at least
    ``MIN_UNSTARTED_AFTER``."""
    grace = (
        unstarted_after
        if unstarted_after is not None
        else max(MIN_UNSTARTED_AFTER, timedelta(seconds=2 * platform.settings.lease_ttl_seconds))
    )
    out: list[Reclaimed] = []
    for listed in platform.state.list_runs(states=[RunState.RUNNING], limit=limit):
        launches = launcher.launches(listed.run_id)
        # Read the run again after its flow runs: a run settles before its flow run ends,
        # so one that ended since the listing is seen settled here, not as lost.
        run = platform.state.get_run(listed.run_id)
        if run is None or run.state != RunState.RUNNING:
            continue
        reason = stalled_reason(platform, run, launches, now=clock(), unstarted_after=grace)
        if reason is None:
            continue
        out.append(_resubmit(platform, launcher, run, launches, reason, actor=actor, max_launches=max_launches))
    return out


def _resubmit(
    platform: Platform,
    launcher: RunLauncher,
    run: MigrationRun,
    launches: list[LaunchState],
    reason: str,
    *,
    actor: str,
    max_launches: int,
) -> Reclaimed:
    if len(launches) >= max_launches:
        log.error(
            "run %s of %s lost its executor (%s) but was submitted %d times already; left for support "
            "(`archive-kms runs resume %s`)",
            run.run_id,
            run.tenant_id,
            reason,
            len(launches),
            run.run_id,
        )
        return Reclaimed(run.run_id, run.tenant_id, reason, None, skipped=f"submitted {len(launches)} times already")
    crashed = []
    for launch in launches:
        if not launch.terminal:
            launcher.mark_crashed(launch.flow_run_id, f"executor lost: {reason}; reclaimed by {actor}")
            crashed.append(launch.flow_run_id)
    task_runner = str((launches[0].parameters if launches else {}).get("task_runner") or "threads")
    platform.state.append_audit(
        AuditEvent(
            actor=actor,
            action="run.reclaim",
            tenant_id=run.tenant_id,
            run_id=run.run_id,
            details={"reason": reason[:300], "crashed_flow_runs": crashed},
        )
    )
    try:
        started = start_support(platform, launcher, run.run_id, "resume", actor=actor, task_runner=task_runner)
    except ArchiveKmsError as exc:
        log.error("run %s: could not submit its resume: %s", run.run_id, exc)
        return Reclaimed(
            run.run_id, run.tenant_id, reason, None, tuple(crashed), skipped=f"{type(exc).__name__}: {exc}"
        )
    log.warning(
        "run %s of %s lost its executor (%s): resume submitted as flow run %s",
        run.run_id,
        run.tenant_id,
        reason,
        started.flow_run_id,
    )
    return Reclaimed(run.run_id, run.tenant_id, reason, started.flow_run_id, tuple(crashed))
