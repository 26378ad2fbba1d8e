"""Starting migration runs on the deployments, and following them to the end.

The console and the CLI do not execute flows: they trigger the run in the state store
(so refusals come back at once, and the caller gets the run id), then *submit* a flow
run of the matching deployment through a ``RunLauncher``; a worker executes it. The
Prefect implementation is ``archive_kms.flows.launcher.PrefectLauncher`` (the library
itself never imports Prefect).

- ``start_enable`` / ``start_remove``: plan (every refusal of ``plan_enable`` /
  ``plan_remove``), trigger (one run per tenant: a run already going is returned with
  ``created=False`` and nothing is submitted), submit the deployment with the run id. If
  the submission fails, the just-triggered run is cancelled (none of its steps ran), so
  nothing is left half-started.
- ``start_support``: resume / rerun / cancel a run on the support deployment, after the
  checks that can be made without executing it.
- ``follow``: snapshots of a run's progress until it settles, read from the state store
  (the truth) and the run's latest flow run (did a worker take it; did it crash).
- ``start_revoke``: the revocation is made in the caller's process first
  (``operations.revocation.begin_revocation``: in force everywhere when it returns, no
  worker needed), then its run (probes and receipt) is submitted to the revoke
  deployment. ``start_restore``: checked, recorded as a ``restore`` run, submitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from archive_kms.errors import StateError, ValidationError
from archive_kms.migration.engine import cancel, trigger, waiting_on
from archive_kms.migration.flowdef import definition
from archive_kms.migration.plan import plan_enable, plan_remove
from archive_kms.migration.report import progress
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent, RunState, StepState

#: Deployment of each flow (``flows/prefect.yaml``: ``<flow name>/<deployment name>``).
DEPLOYMENTS: dict[str, str] = {
    "enable": "migration-enable/enable",
    "remove": "migration-remove/remove",
    "support": "migration-support/support",
    "erase": "key-erase/erase",
    "erase-retention": "key-erase-retention/retention",
    "rotate": "key-rotate/rotate",
    "revoke": "key-revoke/revoke",
    "restore": "key-restore/restore",
    "monitor": "key-monitor/monitor",
    "archive": "archive-job/archive",
}
SUPPORT_ACTIONS = ("resume", "rerun", "cancel")
TASK_RUNNERS = ("threads", "dask")


def run_tags(tenant_id: str, run_id: str) -> list[str]:
    """Tags every submitted flow run carries: the tenant, and the run it executes."""
    return ["archive-kms", f"tenant:{tenant_id}", f"run:{run_id}"]


@dataclass(frozen=True)
class Launch:
    """A flow run submitted to a deployment."""

    flow_run_id: str
    deployment: str


@dataclass(frozen=True)
class LaunchState:
    """What the orchestrator says about one flow run."""

    flow_run_id: str
    state: str  # scheduled | pending | running | paused | completed | failed | crashed | cancelled | cancelling
    terminal: bool
    message: str | None = None
    created: datetime | None = None  # when it was submitted
    state_since: datetime | None = None  # when it entered ``state``
    parameters: Mapping[str, Any] = field(default_factory=dict)  # what it was submitted with


class RunLauncher(Protocol):
    """Submits flow runs to deployments and reports on them (``flows/launcher.py``)."""

    def submit(self, deployment: str, parameters: Mapping[str, Any], *, tags: Sequence[str]) -> Launch:
        """Create a flow run of ``deployment`` for a worker to execute; returns at once.
        ``ConfigurationError`` if the orchestrator or the deployment is not there."""
        ...

    def launches(self, run_id: str) -> list[LaunchState]:
        """The flow runs submitted for ``run_id`` (tag ``run:<id>``), newest first."""
        ...

    def mark_crashed(self, flow_run_id: str, message: str) -> None:
        """Record that the flow run's executor is gone (its state becomes ``crashed``,
        terminal), so that nothing waits for it; a flow run already terminal is left as
        it is."""
        ...


@dataclass(frozen=True)
class Started:
    run_id: str
    tenant_id: str
    flow: str
    action: str  # enable | remove | erase | rotate | resume | rerun | cancel
    created: bool  # False: nothing was submitted (a run already going, or nothing to do)
    message: str
    flow_run_id: str | None = None
    deployment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant_id,
            "flow": self.flow,
            "action": self.action,
            "created": self.created,
            "message": self.message,
            "flow_run_id": self.flow_run_id,
            "deployment": self.deployment,
        }


def _check_task_runner(task_runner: str) -> None:
    if task_runner not in TASK_RUNNERS:
        raise ValidationError(f"task_runner {task_runner!r}: use one of {', '.join(TASK_RUNNERS)}")


def _audit(platform: Platform, actor: str, action: str, tenant_id: str, run_id: str, details: dict[str, Any]) -> None:
    platform.state.append_audit(
        AuditEvent(actor=actor, action=action, tenant_id=tenant_id, run_id=run_id, details=details)
    )


def _submit_new_run(
    platform: Platform, launcher: RunLauncher, plan: Any, parameters: dict[str, Any], *, actor: str
) -> Started:
    run, created = trigger(platform, plan, actor=actor)
    if not created:
        return Started(
            run.run_id, run.tenant_id, run.flow.value, plan.flow, False, f"already running: {run.flow.value} run"
        )
    deployment = DEPLOYMENTS[plan.flow]
    try:
        launch = launcher.submit(
            deployment, {**parameters, "run_id": run.run_id}, tags=run_tags(run.tenant_id, run.run_id)
        )
    except BaseException:
        # Nothing of the run executed: cancel it, so the tenant is free for the next attempt.
        cancel(platform, run.run_id, actor=actor)
        raise
    _audit(
        platform,
        actor,
        "run.submit",
        run.tenant_id,
        run.run_id,
        {"deployment": deployment, "flow_run": launch.flow_run_id},
    )
    return Started(
        run.run_id, run.tenant_id, plan.flow, plan.flow, True, "submitted", launch.flow_run_id, launch.deployment
    )


def start_enable(
    platform: Platform,
    launcher: RunLauncher,
    tenant_id: str,
    mode: str,
    key_ref: str,
    *,
    actor: str,
    cloud: str | None = None,
    shards: int | None = None,
    task_runner: str = "threads",
) -> Started:
    """Trigger onboarding of ``tenant_id`` onto ``key_ref`` and submit it to the enable deployment."""
    _check_task_runner(task_runner)
    plan = plan_enable(platform, tenant_id, mode, key_ref, cloud=cloud, shards=shards)
    parameters = {
        "tenant": plan.tenant_id,
        "mode": mode,
        "key_ref": plan.key_ref,
        "cloud": cloud,
        "shards": shards,
        "task_runner": task_runner,
        "actor": actor,
    }
    return _submit_new_run(platform, launcher, plan, parameters, actor=actor)


def start_remove(
    platform: Platform,
    launcher: RunLauncher,
    tenant_id: str,
    *,
    actor: str,
    shards: int | None = None,
    task_runner: str = "threads",
) -> Started:
    """Trigger removal of ``tenant_id``'s own key and submit it to the remove deployment."""
    _check_task_runner(task_runner)
    plan = plan_remove(platform, tenant_id, shards=shards)
    parameters = {"tenant": plan.tenant_id, "shards": shards, "task_runner": task_runner, "actor": actor}
    return _submit_new_run(platform, launcher, plan, parameters, actor=actor)


def start_erase(
    platform: Platform,
    launcher: RunLauncher,
    tenant_id: str,
    *,
    actor: str,
    before: datetime | None = None,
    workspace: str | None = None,
    reason: str | None = None,
) -> Started:
    """Trigger a crypto-erasure of ``tenant_id``'s buckets before ``before`` or its
    ``workspace`` and submit it to the erase deployment (every refusal comes first)."""
    from archive_kms.migration.erase import plan_erase

    plan = plan_erase(platform, tenant_id, before=before, workspace=workspace, reason=reason)
    parameters = {
        "tenant": plan.tenant_id,
        "before": before.isoformat() if before is not None else None,
        "workspace": workspace,
        "reason": plan.reason,
        "actor": actor,
    }
    return _submit_new_run(platform, launcher, plan, parameters, actor=actor)


def start_rotation_check(platform: Platform, launcher: RunLauncher, tenant_id: str, *, actor: str) -> Started:
    """Look for a rotation of ``tenant_id``'s key (``migration.rotation_monitor``); on one,
    make sure its rotate run exists and submit it to the rotate deployment (it pauses the
    tenant and waits for the confirmation). ``created`` False: no rotation, or its run
    was submitted already."""
    from archive_kms.migration.rotation_monitor import detect_rotation

    _, rotation, run, created = detect_rotation(platform, tenant_id, actor=actor)
    if run is None or rotation is None:
        return Started("", tenant_id, "rotate", "rotate", False, "no rotation of the key since the last check")
    return _submit_rotation_once(platform, launcher, rotation, run, created, actor=actor)


def start_detected_rotation(
    platform: Platform,
    launcher: RunLauncher,
    tenant_id: str,
    *,
    key_ref: str,
    previous_version: str | None,
    observed_version: str | None,
    actor: str,
) -> Started:
    """The key-state monitor's ``on_rotation_detected``: the provider serves the tenant's
    key at another version than the accepted one. Open the rotation (or find the tenant's
    open one) with its rotate run, and submit that run unless it was submitted already."""
    from archive_kms.migration.rotation_monitor import RotationObservation, on_rotation_detected

    seen = RotationObservation(tenant_id, key_ref, previous_version, observed_version)
    rotation, run, created = on_rotation_detected(platform, tenant_id, seen, actor=actor)
    return _submit_rotation_once(platform, launcher, rotation, run, created, actor=actor)


#: A rotate run found not submitted this long after it was triggered lost its submitter (a
#: process that died between the two): the next check submits it. Younger, its creator is
#: submitting it now (a monitor check and a `rotation check` at once submit it once).
UNSUBMITTED_GRACE = timedelta(seconds=60)


def _submit_rotation_once(
    platform: Platform, launcher: RunLauncher, rotation: Any, run: Any, created: bool, *, actor: str
) -> Started:
    """Submit the rotate run if this caller triggered it (``created``), or if nobody did
    within ``UNSUBMITTED_GRACE``; else it is in hand."""
    tenant_id = run.tenant_id
    if not created:
        submitted = any(
            r.action == "run.submit" and r.run_id == run.run_id for r in platform.state.iter_audit(tenant_id=tenant_id)
        )
        born = run.created_at if run.created_at.tzinfo else run.created_at.replace(tzinfo=UTC)
        if submitted or datetime.now(UTC) - born < UNSUBMITTED_GRACE:
            message = f"rotation {rotation.rotation_id} is in hand"
            return Started(run.run_id, tenant_id, "rotate", "rotate", False, message)
    return submit_run(platform, launcher, run, {"tenant": tenant_id, "actor": actor}, actor=actor)


def confirm_and_resume(
    platform: Platform, launcher: RunLauncher, tenant_id: str, confirmation: bytes | str, *, actor: str
) -> Started:
    """Accept a rotation confirmation (``operations.rotation.confirm_rotation``: every
    refusal raises and changes nothing) and submit the resume of the waiting rotate run."""
    from archive_kms.operations.rotation import confirm_rotation

    rotation = confirm_rotation(platform, confirmation, tenant_id=tenant_id, actor=actor)
    if rotation.run_id is None:
        raise StateError(f"rotation {rotation.rotation_id} has no run", resource=f"rotation:{rotation.rotation_id}")
    return start_support(platform, launcher, rotation.run_id, "resume", actor=actor)


def start_revoke(
    platform: Platform,
    launcher: RunLauncher,
    tenant_id: str,
    *,
    actor: str,
    reason: str = "",
    workspace: str | None = None,
    before: Any = None,
) -> Started:
    """Revoke now, in this process (``begin_revocation``), then submit the revocation run
    (the receipt) to the revoke deployment. If the submission fails the revocation stands
    and the error says how to record its receipt."""
    from archive_kms.errors import ServiceUnavailableError
    from archive_kms.operations.revocation import RevocationScope, begin_revocation

    start = begin_revocation(platform, tenant_id, actor=actor, reason=reason, scope=RevocationScope(workspace, before))
    deployment = DEPLOYMENTS["revoke"]
    try:
        launch = launcher.submit(
            deployment,
            {"tenant": tenant_id, "actor": actor, "start": start.to_params()},
            tags=run_tags(tenant_id, start.run_id),
        )
    except Exception as exc:  # noqa: BLE001 - the revocation is in force whatever the orchestrator says
        raise ServiceUnavailableError(
            f"tenant {tenant_id}: the revocation is in force since {start.to_params()['committed_at']}, but its "
            f"receipt run could not be submitted ({type(exc).__name__}); record it with `archive-kms revoke "
            f"{tenant_id} --wait` (idempotent)",
            resource=f"run:{start.run_id}",
        ) from None
    _audit(
        platform,
        actor,
        "run.submit",
        tenant_id,
        start.run_id,
        {"deployment": deployment, "flow_run": launch.flow_run_id},
    )
    return Started(
        start.run_id,
        tenant_id,
        "revoke",
        "revoke",
        True,
        f"revoked at {start.to_params()['committed_at']} ({start.scope.describe()}); every process refuses by "
        f"{start.to_params()['refusing_everywhere_by']}; the receipt run is submitted",
        launch.flow_run_id,
        launch.deployment,
    )


def start_restore(
    platform: Platform,
    launcher: RunLauncher,
    tenant_id: str,
    *,
    actor: str,
    reason: str = "",
    workspace: str | None = None,
    before: Any = None,
) -> Started:
    """Check the restore, record its run and submit it to the restore deployment."""
    from archive_kms.operations.revocation import RESTORE_STEPS, RevocationScope, check_restore
    from archive_kms.state.port import Flow

    scope = RevocationScope(workspace, before)
    check_restore(platform, tenant_id, scope)
    run, created = platform.state.start_run(
        tenant_id,
        Flow.RESTORE,
        mode=scope.kind,
        steps=RESTORE_STEPS,
        params={"scope": scope.to_dict(), "actor": actor, "reason": reason},
    )
    if not created:
        return Started(
            run.run_id, tenant_id, run.flow.value, "restore", False, f"already running: {run.flow.value} run"
        )
    deployment = DEPLOYMENTS["restore"]
    try:
        launch = launcher.submit(
            deployment,
            {
                "tenant": tenant_id,
                "actor": actor,
                "reason": reason,
                "workspace": workspace,
                "before": scope.to_dict()["before"],
                "run_id": run.run_id,
            },
            tags=run_tags(tenant_id, run.run_id),
        )
    except BaseException:
        platform.state.set_run_state(run.run_id, RunState.CANCELLED)  # none of its steps ran
        raise
    _audit(
        platform, actor, "run.submit", tenant_id, run.run_id, {"deployment": deployment, "flow_run": launch.flow_run_id}
    )
    return Started(
        run.run_id, tenant_id, "restore", "restore", True, "submitted", launch.flow_run_id, launch.deployment
    )


def submit_run(
    platform: Platform, launcher: RunLauncher, run: Any, parameters: dict[str, Any], *, actor: str
) -> Started:
    deployment = DEPLOYMENTS[run.flow.value]
    launch = launcher.submit(deployment, {**parameters, "run_id": run.run_id}, tags=run_tags(run.tenant_id, run.run_id))
    _audit(
        platform,
        actor,
        "run.submit",
        run.tenant_id,
        run.run_id,
        {"deployment": deployment, "flow_run": launch.flow_run_id},
    )
    return Started(
        run.run_id,
        run.tenant_id,
        run.flow.value,
        run.flow.value,
        True,
        "submitted",
        launch.flow_run_id,
        launch.deployment,
    )


def check_support(platform: Platform, run_id: str, action: str, from_step: str | None = None) -> Any:
    """The run, if ``action`` may be submitted for it; ``StateError`` for an unknown run,
    ``ValidationError`` naming what to fix for a request the flow would refuse."""
    if action not in SUPPORT_ACTIONS:
        raise ValidationError(f"action {action!r}: use one of {', '.join(SUPPORT_ACTIONS)}")
    run = platform.state.get_run(run_id)
    if run is None:
        raise StateError(f"unknown run {run_id!r}", resource=f"run:{run_id}")
    flowdef = definition(run.flow)
    if action == "rerun":
        if from_step not in flowdef.steps:
            raise ValidationError(f"from_step {from_step!r}: use one of {', '.join(flowdef.steps)}")
        refusal = None if run.state is RunState.COMPLETED else flowdef.rerun_refusal(run, from_step)
        if refusal is not None:
            raise ValidationError(f"from_step {from_step!r}: {refusal}")
    if action in ("resume", "rerun") and run.state is RunState.CANCELLED:
        raise ValidationError(f"run {run_id} was cancelled; start a new run")
    if action == "cancel" and run.state is not RunState.CANCELLED:
        refusal = flowdef.cancel_refusal(run)
        if refusal is None and run.state is RunState.COMPLETED:
            refusal = f"run {run_id} has completed"
        if refusal is not None:
            raise ValidationError(f"{refusal}; it cannot be cancelled")
    return run


def start_support(
    platform: Platform,
    launcher: RunLauncher,
    run_id: str,
    action: str,
    *,
    actor: str,
    from_step: str | None = None,
    takeover: bool = False,
    task_runner: str = "threads",
) -> Started:
    """Submit ``action`` (resume | rerun | cancel) of run ``run_id`` to the support deployment."""
    _check_task_runner(task_runner)
    run = check_support(platform, run_id, action, from_step)
    if run.state is RunState.COMPLETED and action in ("resume", "rerun"):
        return Started(run_id, run.tenant_id, run.flow.value, action, False, "run already completed: nothing to do")
    if run.state is RunState.CANCELLED:
        return Started(run_id, run.tenant_id, run.flow.value, action, False, "already cancelled")
    parameters: dict[str, Any] = {
        "run_id": run_id,
        "action": action,
        "takeover": takeover,
        "task_runner": task_runner,
        "actor": actor,
    }
    if from_step is not None:
        parameters["from_step"] = from_step
    deployment = DEPLOYMENTS["support"]
    launch = launcher.submit(deployment, parameters, tags=run_tags(run.tenant_id, run_id))
    _audit(
        platform,
        actor,
        "run.submit",
        run.tenant_id,
        run_id,
        {"deployment": deployment, "flow_run": launch.flow_run_id, "action": action},
    )
    return Started(
        run_id, run.tenant_id, run.flow.value, action, True, "submitted", launch.flow_run_id, launch.deployment
    )


# --- following a run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    run_id: str
    tenant_id: str
    flow: str
    state: str  # the run's state in the state store
    progress: Mapping[str, Any]
    current_step: str | None
    launch: LaunchState | None
    done: bool
    outcome: str | None = None  # once done: completed | failed | cancelled | crashed | waiting
    message: str = ""
    steps: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)


def snapshot(platform: Platform, run_id: str, launcher: RunLauncher | None = None) -> Snapshot:
    """One look at the run and its latest flow run; ``done`` once neither will change."""
    run = platform.state.get_run(run_id)
    if run is None:
        raise StateError(f"unknown run {run_id!r}", resource=f"run:{run_id}")
    launch = None
    if launcher is not None:
        found = launcher.launches(run_id)
        launch = found[0] if found else None
    current = next((s.name for s in run.steps if s.state not in (StepState.COMPLETED, StepState.SKIPPED)), None)
    steps = tuple({"step": s.name, "state": s.state.value, "attempts": s.attempt, "error": s.error} for s in run.steps)
    base: dict[str, Any] = dict(
        run_id=run_id,
        tenant_id=run.tenant_id,
        flow=run.flow.value,
        state=run.state.value,
        progress=progress(platform, run),
        current_step=current,
        launch=launch,
        steps=steps,
    )
    wait = waiting_on(platform, run)
    if wait is not None and (launch is None or launch.terminal or launch.state == "paused"):
        # the run waits for something outside it (a rotation's confirmation): settled until then
        return Snapshot(**base, done=True, outcome="waiting", message=str(wait.get("waiting", "")))
    if launch is not None and not launch.terminal:
        waiting = launch.state in ("scheduled", "pending")
        return Snapshot(**base, done=False, message="waiting for a worker" if waiting else f"flow run {launch.state}")
    if run.state is not RunState.RUNNING:
        failed = next((s for s in run.steps if s.state is StepState.FAILED), None)
        message = f"step {failed.name} failed: {failed.error}" if failed and run.state is RunState.FAILED else ""
        return Snapshot(**base, done=True, outcome=run.state.value, message=message)
    if launch is not None:  # the flow run ended but the run is still marked running: its executor died
        return Snapshot(
            **base,
            done=True,
            outcome="crashed",
            message=f"flow run {launch.flow_run_id} ended {launch.state} without settling the run"
            + (f": {launch.message}" if launch.message else ""),
        )
    return Snapshot(**base, done=False, message="running")


def follow(
    platform: Platform,
    run_id: str,
    launcher: RunLauncher | None = None,
    *,
    interval: float = 1.0,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Snapshot]:
    """Snapshots every ``interval`` seconds until the run is done (the last one has
    ``done=True``), or ``timeout`` passes (the last one then has ``done=False``)."""
    deadline = None if timeout is None else clock() + timeout
    while True:
        snap = snapshot(platform, run_id, launcher)
        yield snap
        if snap.done or (deadline is not None and clock() >= deadline):
            return
        sleep(interval)


__all__ = [
    "DEPLOYMENTS",
    "SUPPORT_ACTIONS",
    "Launch",
    "LaunchState",
    "RunLauncher",
    "Snapshot",
    "Started",
    "check_support",
    "confirm_and_resume",
    "follow",
    "run_tags",
    "snapshot",
    "start_detected_rotation",
    "start_enable",
    "start_erase",
    "start_remove",
    "start_restore",
    "start_revoke",
    "start_rotation_check",
    "start_support",
    "submit_run",
]
