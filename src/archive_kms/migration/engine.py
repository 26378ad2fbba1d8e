"""The step engine: runs a migration run's steps in order, checkpointed in the state store.

- ``trigger`` plans and starts a run, or returns the tenant's run already going (one
  running run per tenant is a unique index in the state store: two simultaneous triggers
  produce one run).
- ``execute`` takes the tenant's lease (expiry + fencing token), keeps it alive from a
  heartbeat thread, and runs every step not yet completed. Every state write carries the
  fence, so a stalled incarnation that wakes up after a takeover cannot write (faults D5).
  A failure marks the step and the run failed, with the error; nothing else changes.
- ``resume`` continues a failed or crashed run; ``rerun`` resets a named step and the
  later ones and runs them again (refused before the point of no return once it is
  passed, faults D8); either on a completed run changes nothing and says so (D7).
- ``execute`` stops gracefully on SIGTERM / SIGINT (main thread) or when its caller sets
  the run's ``StopRequest`` (faults D3; ``migration.stopping``): the run ends failed,
  resumable, with its lease released.
- ``waive`` lets support accept that quarantined objects are left behind, per object and
  audited, so the run can cut over without them (faults D9; ``migration.quarantine``).

- A step that raises ``StepWaiting`` (a rotation waiting for the customer's confirmation)
  leaves the run ``running`` with the wait recorded as a checkpoint of that step, releases
  the lease and returns the outcome ``waiting``; ``resume`` calls the step again.

Every kind of run (enable, remove, rotate, erase) is a ``FlowDefinition``
(``migration.flowdef``): its steps, their functions, its point of no return, its plan,
cancel and report. The engine itself is the same for all of them.

Prefect is not needed here: the flows in ``flows/`` call ``execute`` with hooks that
create Prefect artifacts and a shard runner that maps shard tasks onto Prefect's task
runner (threads, or Dask worker processes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from archive_kms import crashpoints, retry
from archive_kms.config import setting_default
from archive_kms.errors import ArchiveKmsError, FencedError, LeaseHeldError, StateError, ValidationError
from archive_kms.migration import stopping
from archive_kms.migration.context import FlowDefinition, Hooks, RunContext, ShardRunner, StepWaiting
from archive_kms.migration.copying import ShardPlatform, copy_shard, verify_shard
from archive_kms.migration.flowdef import definition
from archive_kms.migration.memory import limit_allocator
from archive_kms.migration.plan import MigrationPlan
from archive_kms.migration.quarantine import (
    MAX_WAIVER_REASON_CHARS,
    WAIVE_ACTION,
    Quarantine,
    Waiver,
    display_name,
    now_iso,
    quarantined,
    waiver_audit_details,
)
from archive_kms.migration.stopping import StopRequest, StopRequestedError
from archive_kms.operations.platform import Platform
from archive_kms.retry import Backoff
from archive_kms.state.port import (
    AuditEvent,
    AuditLog,
    CopyRecord,
    CopyStatus,
    Fence,
    Flow,
    Lease,
    LeaseRepo,
    LedgerRepo,
    MigrationRun,
    RunRepo,
    RunState,
    StepState,
)

log = logging.getLogger(__name__)


class RunStore(RunRepo, LedgerRepo, LeaseRepo, AuditLog, Protocol):
    """Runs, the copy ledger, leases and the audit log: the state that triggering a run,
    holding its lease and waiving its quarantined objects use."""


class HasRunStore(Protocol):
    """Anything with such a state store: the platform, or the CLI's state-only view."""

    @property
    def state(self) -> RunStore: ...


#: The run lease of a platform without settings: ``settings.lease_ttl_seconds``'s default.
DEFAULT_LEASE_TTL = timedelta(seconds=setting_default("lease_ttl_seconds"))

#: ``execute``'s ``admission``: a fresh context manager per run, held while its steps run.
Admission = Callable[[], contextlib.AbstractContextManager[None]]

#: Outcome state of a worker whose lease was taken over mid-run (not a run state: the run
#: goes on under its new holder).
SUPERSEDED = "superseded"
#: Outcome state of a run refused at preflight before anything changed; the run itself is
#: ``cancelled`` (ADR 0021).
REFUSED = "refused"
PREFLIGHT = "preflight"
#: Outcome state of a run whose step waits for something outside it (``StepWaiting``): the
#: run is ``running`` in the state store, holds no lease, and continues on ``resume``.
WAITING = "waiting"

#: (platform, run_id, shard, fence) -> the shard's result; runs in a thread or a Dask worker
ShardFunction = Callable[[ShardPlatform, str, int, Fence | None], dict[str, Any]]

#: step -> per-shard worker. Named directly: a Dask worker that runs a shard task imports
#: this module and ``copying`` either way (docs/adr/0009-composition-root.md).
SHARD_FUNCTIONS: dict[str, ShardFunction] = {
    "copy": copy_shard,
    "verify": verify_shard,
}


def shard_function(step: str) -> ShardFunction:
    return SHARD_FUNCTIONS[step]


def thread_shard_runner(
    platform: Platform, run_id: str, step: str, shards: Sequence[int], fence: Fence | None
) -> list[dict[str, Any]]:
    """Shards in threads of this process (``parallel_shards`` at a time)."""
    plan = MigrationPlan.from_params(get_run(platform, run_id).params)
    fn = shard_function(step)
    with ThreadPoolExecutor(max_workers=plan.parallel_shards, thread_name_prefix=f"akms-{step}") as pool:
        return list(pool.map(lambda s: fn(platform, run_id, s, fence), shards))


@dataclass(frozen=True)
class Outcome:
    run_id: str
    tenant_id: str
    flow: str
    state: str
    created: bool = True  # False: the trigger found a run already going
    executed: tuple[str, ...] = ()  # steps run by this call
    message: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant_id,
            "flow": self.flow,
            "state": self.state,
            "created": self.created,
            "executed": list(self.executed),
            "message": self.message,
            "error": self.error,
        }


# --- triggering ---------------------------------------------------------------------------


def check_trigger(platform: HasRunStore, plan: Any) -> MigrationRun | None:
    """What ``trigger`` refuses, without starting anything: ``StateError`` if a failed run
    of the tenant is in the way or a run of the other flow is going. Returns the tenant's
    running run of the same flow, if any (``trigger`` would return it)."""
    active = platform.state.find_active_run(plan.tenant_id)
    if active is None:
        failed = platform.state.list_runs(plan.tenant_id, states=[RunState.FAILED], limit=1)
        if failed:
            # A failed run may hold the gate paused and a half-made destination: a second run
            # would fail on them. Support decides: finish it, or put the tenant back first.
            f = failed[0]
            step = next((s.name for s in f.steps if s.state is StepState.FAILED), "?")
            raise StateError(
                f"tenant {plan.tenant_id} has failed {f.flow.value} run {f.run_id} (at step {step}): "
                f"resume it (`archive-kms runs resume {f.run_id}`) or cancel it "
                f"(`archive-kms runs cancel {f.run_id}`) first",
                resource=f"run:{f.run_id}",
            )
    if active is not None and active.flow.value != plan.flow:
        raise StateError(
            f"tenant {plan.tenant_id} has a running {active.flow.value} run {active.run_id}; "
            f"finish or cancel it before starting {plan.flow}",
            resource=f"run:{active.run_id}",
        )
    return active


def trigger(platform: HasRunStore, plan: Any, *, actor: str) -> tuple[MigrationRun, bool]:
    """Start a run for ``plan`` (any flow's plan: ``tenant_id``, ``flow``, ``mode``,
    ``key_ref``, ``to_params()``), or return the tenant's running run (created False).
    A running run of another flow is refused (faults E5, E6)."""
    check_trigger(platform, plan)
    run, created = platform.state.start_run(
        plan.tenant_id, Flow(plan.flow), mode=plan.mode, steps=definition(plan.flow).steps, params=plan.to_params()
    )
    if created:
        platform.state.append_audit(
            AuditEvent(
                actor=actor,
                action="run.start",
                tenant_id=plan.tenant_id,
                run_id=run.run_id,
                details={"flow": plan.flow, "mode": plan.mode, "key_ref": plan.key_ref},
            )
        )
    elif run.flow.value != plan.flow:
        raise StateError(
            f"tenant {plan.tenant_id} has a running {run.flow.value} run {run.run_id}", resource=f"run:{run.run_id}"
        )
    return run, created


# --- executing ------------------------------------------------------------------------------


class _Heartbeat(threading.Thread):
    def __init__(self, platform: HasRunStore, lease: Lease, ttl: timedelta, fenced: threading.Event) -> None:
        super().__init__(daemon=True, name=f"akms-lease-{lease.tenant_id}")
        self._platform, self.lease, self._ttl, self._fenced = platform, lease, ttl, fenced
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = max(self._ttl.total_seconds() / 3, 0.2)
        last_ok = time.monotonic()
        while not self._stop_event.wait(interval):
            try:
                self.lease = self._platform.state.renew_lease(self.lease, self._ttl)
                last_ok = time.monotonic()
            except FencedError:
                log.error("run %s lost the lease of %s: stopping", self.lease.run_id, self.lease.tenant_id)
                self._fenced.set()
                return
            except ArchiveKmsError:  # database blip: the next beat retries while the lease may still hold
                if time.monotonic() - last_ok >= self._ttl.total_seconds():
                    # Not renewed for a whole TTL: another worker may hold the tenant by now.
                    log.error(
                        "run %s could not renew its lease for %.0f s: stopping",
                        self.lease.run_id,
                        self._ttl.total_seconds(),
                    )
                    self._fenced.set()
                    return
                log.warning("lease renewal failed; retrying", exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _lease_ttl(platform: HasRunStore) -> timedelta:
    seconds = getattr(getattr(platform, "settings", None), "lease_ttl_seconds", None)
    return timedelta(seconds=seconds) if seconds else DEFAULT_LEASE_TTL


def _acquire(platform: HasRunStore, run: MigrationRun, *, takeover: bool) -> Lease:
    current = platform.state.get_lease(run.tenant_id)
    now = datetime.now(UTC)
    if current is not None and current.run_id == run.run_id and current.expires_at > now and not takeover:
        raise LeaseHeldError(
            f"run {run.run_id} is being executed by a live worker (its lease expires at "
            f"{current.expires_at.isoformat(timespec='seconds')}); wait for it, or pass --takeover if that worker "
            "is known to be dead",
            resource=f"run:{run.run_id}",
        )
    if current is not None and current.run_id != run.run_id and current.expires_at > now:
        holder = platform.state.get_run(current.run_id)
        if holder is not None and holder.state is not RunState.RUNNING:
            # Its worker died after the run ended and before it let go (a kill between the
            # two): the lease protects nothing, so it does not hold the tenant until expiry.
            log.warning("lease of %s left by ended run %s: released", run.tenant_id, current.run_id)
            platform.state.release_lease(current)
    return platform.state.acquire_lease(run.tenant_id, run.run_id, _lease_ttl(platform))


def execute(
    platform: Platform,
    run_id: str,
    *,
    actor: str,
    shard_runner: ShardRunner | None = None,
    hooks: Hooks | None = None,
    takeover: bool = False,
    stop: StopRequest | None = None,
    handle_signals: bool = True,
    admission: Admission | None = None,
) -> Outcome:
    """Run every step of ``run_id`` that is not completed yet, in order.

    ``stop``: a flag the caller may set (from another thread, a Prefect hook) to stop the
    run gracefully; one is made if not given, and ``stopping.request_stop(run_id)`` finds
    it either way. In the main thread, and unless ``handle_signals`` is False, SIGTERM and
    SIGINT set it for the duration of the call (the previous handlers are restored).

    ``admission``: entered once the run holds its tenant's lease (the heartbeat renewing
    it) and before its first step, left when it ends: a fleet-wide slot the run waits for
    and holds (the flows pass Prefect's global concurrency limit ``archive-kms-runs``).
    Waiting under a live lease tells everyone the run is alive, only queued."""
    run = get_run(platform, run_id)
    if run.state is RunState.COMPLETED:
        return Outcome(run.run_id, run.tenant_id, run.flow.value, run.state.value, message="run already completed")
    if run.state is not RunState.RUNNING:
        raise StateError(
            f"run {run_id} is {run.state.value}: use `archive-kms runs resume {run_id}`", resource=f"run:{run_id}"
        )
    limit_allocator()  # flat RSS for the copy threads (ADR 0019)
    stop = stop or StopRequest()
    with stopping.registered(run_id, stop):
        kw = dict(shard_runner=shard_runner, hooks=hooks, takeover=takeover, stop=stop, admission=admission)
        if handle_signals:
            with stopping.stop_on_signals(stop):
                return _execute(platform, run, actor=actor, **kw)  # type: ignore[arg-type]
        return _execute(platform, run, actor=actor, **kw)  # type: ignore[arg-type]


def _execute(
    platform: Platform,
    run: MigrationRun,
    *,
    actor: str,
    shard_runner: ShardRunner | None,
    hooks: Hooks | None,
    takeover: bool,
    stop: StopRequest,
    admission: Admission | None = None,
) -> Outcome:
    run_id = run.run_id
    flowdef = definition(run.flow)
    plan = flowdef.plan_from_params(run.params)
    hooks = hooks or Hooks()
    lease = _acquire(platform, run, takeover=takeover)
    fenced = threading.Event()
    beat = _Heartbeat(platform, lease, _lease_ttl(platform), fenced)
    beat.start()
    ctx = RunContext(
        platform, run_id, plan, lease.fence, actor, shard_runner or thread_shard_runner, hooks, fenced, stop
    )
    executed: list[str] = []
    admitted = contextlib.ExitStack()
    try:
        _audit_start_if_missing(platform, run, actor)
        if admission is not None:
            admitted.enter_context(admission())
        for step in flowdef.steps:
            record = get_run(platform, run_id).step(step)
            if record.state in (StepState.COMPLETED, StepState.SKIPPED):
                continue
            ctx.check_fenced()
            if ctx.stopping:  # between steps: the next one is recorded as interrupted before it began
                return _interrupted(platform, ctx, step, executed, started=False)
            platform.state.update_step(run_id, step, StepState.RUNNING, fence=ctx.fence)
            hooks.on_step(step, "running", None)
            crashpoints.hit(f"before:{step}")
            started = time.monotonic()
            try:
                result = _call(flowdef, step, ctx)
            except FencedError:
                raise  # handled below: this worker was superseded, it records nothing
            except StopRequestedError:
                return _interrupted(platform, ctx, step, executed, started=True)
            except StepWaiting as wait:
                return _waiting(platform, ctx, step, executed, wait)
            except BaseException as exc:
                if step == PREFLIGHT and isinstance(exc, ArchiveKmsError) and _untouched(platform, run_id):
                    return _refused(platform, ctx, exc)
                _fail(platform, ctx, step, exc)
                hooks.on_step(step, "failed", {"error": _describe(exc)})
                if isinstance(exc, ArchiveKmsError):
                    return Outcome(
                        run_id,
                        plan.tenant_id,
                        plan.flow,
                        RunState.FAILED.value,
                        executed=tuple(executed),
                        message=f"step {step} failed",
                        error=_describe(exc),
                    )
                raise
            result = {**result, "seconds": round(time.monotonic() - started, 3)}
            crashpoints.hit(f"after:{step}")
            platform.state.update_step(run_id, step, StepState.COMPLETED, result=result, fence=ctx.fence)
            executed.append(step)
            hooks.on_step(step, "completed", result)
        # The record first: a worker that dies between the two leaves a run that is still
        # running (a resume completes it, and records it again), never a completed run
        # without its record (I6).
        ctx.audit("run.complete", {"flow": plan.flow, "steps": executed})
        platform.state.set_run_state(run_id, RunState.COMPLETED, fence=ctx.fence)
        return Outcome(
            run_id, plan.tenant_id, plan.flow, RunState.COMPLETED.value, executed=tuple(executed), message="completed"
        )
    except FencedError as exc:
        # Another worker took the run over (this one stalled past its lease, or support
        # passed --takeover): every write of ours is refused from now on, so stop here and
        # say so; the run's state is whatever the new holder makes it.
        log.warning("run %s: superseded by another worker; stopping without writing", run_id)
        return Outcome(
            run_id,
            plan.tenant_id,
            plan.flow,
            SUPERSEDED,
            executed=tuple(executed),
            message="superseded: another worker holds this run now; this one stopped without writing",
            error=_describe(exc),
        )
    finally:
        admitted.close()
        beat.stop()
        _release(platform, beat.lease)  # a stopped run is resumed at once, without --takeover


def _audit_start_if_missing(platform: HasRunStore, run: MigrationRun, actor: str) -> None:
    """``trigger`` creates the run, then audits ``run.start``: a worker that died (or a
    state store that failed) between the two left a run with no start in the audit log.
    The first worker that executes it (holding the lease) writes it, marked recovered."""
    if any(
        r.run_id == run.run_id and r.action == "run.start" for r in platform.state.iter_audit(tenant_id=run.tenant_id)
    ):
        return
    plan = definition(run.flow).plan_from_params(run.params)
    _audit_run(
        platform,
        run,
        actor,
        "run.start",
        {"flow": plan.flow, "mode": plan.mode, "key_ref": plan.key_ref, "recovered": True},
    )


def _untouched(platform: HasRunStore, run_id: str) -> bool:
    """Whether no step after preflight ever started (attempt counts survive a rerun's
    reset), so the tenant is exactly as it was before the run."""
    run = get_run(platform, run_id)
    return all(s.attempt == 0 for s in run.steps if s.name != PREFLIGHT)


def _refused(platform: Platform, ctx: RunContext, exc: BaseException) -> Outcome:
    """A run refused at preflight, before anything changed, ends cancelled (ADR 0021):
    the tenant is as it was and no failed run blocks the next trigger; the step keeps the
    error and ``run.refused`` is audited. Fix the cause and trigger the flow again."""
    error = _describe(exc)
    platform.state.update_step(ctx.run_id, PREFLIGHT, StepState.FAILED, error=error, fence=ctx.fence)
    platform.state.set_run_state(ctx.run_id, RunState.CANCELLED, fence=ctx.fence)
    ctx.audit("run.refused", {"step": PREFLIGHT, "error": error[:300]})
    ctx.hooks.on_step(PREFLIGHT, "failed", {"error": error})
    log.warning("run %s refused at preflight: %s", ctx.run_id, error)
    return Outcome(
        ctx.run_id,
        ctx.plan.tenant_id,
        ctx.plan.flow,
        REFUSED,
        message="refused at preflight; nothing was changed and no run is left to clean up",
        error=error,
    )


def _interrupted(platform: Platform, ctx: RunContext, step: str, executed: list[str], *, started: bool) -> Outcome:
    """Record a graceful stop: ``step`` failed as interrupted, the run failed (resumable),
    audited as ``run.stop``. Raises FencedError if the lease was lost meanwhile."""
    reason = ctx.stop.reason or "stop requested"
    when = "during" if started else "before"
    error = f"interrupted: {reason} {when} step {step}; `archive-kms runs resume {ctx.run_id}` continues the run"
    log.warning("run %s: %s", ctx.run_id, error)
    if not started and get_run(platform, ctx.run_id).step(step).state is StepState.FAILED:
        # failed -> failed would keep the old error: record this stop as an attempt of its own
        platform.state.update_step(ctx.run_id, step, StepState.RUNNING, fence=ctx.fence)
    platform.state.update_step(ctx.run_id, step, StepState.FAILED, error=error, fence=ctx.fence)
    platform.state.set_run_state(ctx.run_id, RunState.FAILED, fence=ctx.fence)
    ctx.audit("run.stop", {"step": step, "reason": reason, "started": started})
    ctx.hooks.on_step(step, "failed", {"error": error})
    return Outcome(
        ctx.run_id,
        ctx.plan.tenant_id,
        ctx.plan.flow,
        RunState.FAILED.value,
        executed=tuple(executed),
        message=reason,
        error=f"{StopRequestedError.__name__}: {error}",
    )


def _waiting(platform: Platform, ctx: RunContext, step: str, executed: list[str], wait: StepWaiting) -> Outcome:
    """Record that ``step`` waits (a checkpoint of the step, so every process and a resume
    after a crash know it), audit the first wait, and return the ``waiting`` outcome. The
    run stays running; the lease is released by the caller."""
    before = waiting_on(platform, get_run(platform, ctx.run_id))
    since = before["since"] if before and before.get("step") == step else datetime.now(UTC).isoformat()
    record = {"waiting": wait.reason, "step": step, "since": since, **wait.details}
    platform.state.save_checkpoint(ctx.run_id, step, 0, record, fence=ctx.fence)
    if before is None or before.get("step") != step:
        ctx.audit("run.wait", {"step": step, "reason": wait.reason[:300]})
    log.info("run %s waits at step %s: %s", ctx.run_id, step, wait.reason)
    ctx.hooks.on_step(step, WAITING, {"reason": wait.reason})
    return Outcome(
        ctx.run_id, ctx.plan.tenant_id, ctx.plan.flow, WAITING, executed=tuple(executed), message=wait.reason
    )


def waiting_on(platform: HasRunStore, run: MigrationRun) -> dict[str, Any] | None:
    """What ``run`` waits for (``{"waiting": reason, "step", "since", ...}``), or None: a
    running run whose first unfinished step is running and recorded a wait."""
    if run.state is not RunState.RUNNING:
        return None
    current = next((s for s in run.steps if s.state not in (StepState.COMPLETED, StepState.SKIPPED)), None)
    if current is None or current.state is not StepState.RUNNING:
        return None
    mark = platform.state.load_checkpoints(run.run_id, current.name).get(0) or {}
    if "waiting" not in mark or mark.get("step") != current.name:
        return None
    return dict(mark)


def _call(flowdef: FlowDefinition, step: str, ctx: RunContext) -> dict[str, Any]:
    return flowdef.step_functions()[step](ctx)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def _bookkeeping_backoff(platform: HasRunStore) -> Backoff:
    """0.2 s doubling to 2 s, as many attempts as fit in one lease TTL."""
    ttl = _lease_ttl(platform).total_seconds()
    attempts, waited, delay = 1, 0.0, 0.2
    while waited + delay <= ttl:
        attempts, waited, delay = attempts + 1, waited + delay, min(delay * 2, 2.0)
    return Backoff(max_attempts=attempts, base_delay=0.2, max_delay=2.0, jitter=False)


def _state_write(platform: HasRunStore, what: str, write: Callable[[], Any]) -> Any:
    """``write()`` to the state store, retried with backoff while the store reports a
    retryable error, for at most one lease TTL: a step that failed *because* the store
    blipped (a restart, a dropped connection) must still be recorded as failed, not leave
    the run running with the worker gone. Each write retried here is idempotent; a
    ``FencedError`` is not retryable and is raised at once."""
    return retry.call(write, backoff=_bookkeeping_backoff(platform), what=what)


def _fail(platform: Platform, ctx: RunContext, step: str, exc: BaseException) -> None:
    """Record the failure if we still hold the tenant (a fenced run records nothing).
    If the state store stays unreachable for a whole lease TTL the failure is logged and
    the run stays ``running``; its lease expires and a resume takes it."""
    if isinstance(exc, FencedError):
        return
    what = f"run {ctx.run_id}: recording the failure of step {step}"
    try:
        _state_write(
            platform,
            what,
            lambda: platform.state.update_step(
                ctx.run_id, step, StepState.FAILED, error=_describe(exc), fence=ctx.fence
            ),
        )
        _state_write(platform, what, lambda: platform.state.set_run_state(ctx.run_id, RunState.FAILED, fence=ctx.fence))
        _state_write(platform, what, lambda: ctx.audit("run.fail", {"step": step, "error": _describe(exc)[:300]}))
    except FencedError:
        log.error("run %s was taken over while failing step %s", ctx.run_id, step)
    except ArchiveKmsError as error:
        log.error("%s failed (%s): the run stays running until its lease expires; resume it then", what, error)


def _release(platform: HasRunStore, lease: Lease) -> None:
    """Release the lease; if the state store stays unreachable, log it (the lease
    expires by itself) rather than replace what the run ended with."""
    try:
        _state_write(platform, f"releasing the lease of {lease.tenant_id}", lambda: platform.state.release_lease(lease))
    except ArchiveKmsError as exc:
        log.error("lease of %s not released (%s); it expires by itself", lease.tenant_id, exc)


def get_run(platform: HasRunStore, run_id: str) -> MigrationRun:
    run = platform.state.get_run(run_id)
    if run is None:
        raise StateError(f"unknown run {run_id!r}: see `archive-kms runs list`", resource=f"run:{run_id}")
    return run


# --- support: resume and rerun ----------------------------------------------------------------


def resume(platform: Platform, run_id: str, *, actor: str, takeover: bool = False, **kw: Any) -> Outcome:
    """Continue a failed run, or a running one whose worker died (lease expired, or
    ``takeover``), from its first step not completed."""
    run = get_run(platform, run_id)
    if run.state is RunState.COMPLETED:
        _audit_run(platform, run, actor, "run.resume.noop", {})
        return Outcome(
            run_id,
            run.tenant_id,
            run.flow.value,
            run.state.value,
            created=False,
            message="run already completed: nothing to resume",
        )
    if run.state is RunState.CANCELLED:
        raise StateError(f"run {run_id} was cancelled; start a new run", resource=f"run:{run_id}")
    if run.state is RunState.FAILED:
        platform.state.set_run_state(run_id, RunState.RUNNING)
    _audit_run(platform, run, actor, "run.resume", {"from_state": run.state.value})
    return execute(platform, run_id, actor=actor, takeover=takeover, **kw)


def rerun(platform: Platform, run_id: str, from_step: str, *, actor: str, takeover: bool = False, **kw: Any) -> Outcome:
    """Reset ``from_step`` and every later step, then run them again."""
    run = get_run(platform, run_id)
    flowdef = definition(run.flow)
    if from_step not in flowdef.steps:
        raise ValidationError(f"unknown step {from_step!r}: one of {', '.join(flowdef.steps)}")
    if run.state is RunState.COMPLETED:
        when = run.step(from_step).finished_at
        _audit_run(platform, run, actor, "run.rerun.noop", {"from": from_step})
        return Outcome(
            run_id,
            run.tenant_id,
            run.flow.value,
            run.state.value,
            created=False,
            message=f"run completed; step {from_step} completed at "
            f"{when.isoformat(timespec='seconds') if when else '?'}: nothing changed",
        )
    if run.state is RunState.CANCELLED:
        raise ValidationError(f"run {run_id} was cancelled; start a new run", resource=f"run:{run_id}")
    # Past the flow's point of no return (enable: the tenant lives at the destination; its
    # cutover half way: only the cutover itself, whose halves are conditional, or later).
    refusal = flowdef.rerun_refusal(run, from_step)
    if refusal is not None:
        raise ValidationError(refusal)
    # Take the lease *before* resetting: a live worker being taken over is fenced first, so
    # it cannot mark a just-reset step completed with a token that was still valid.
    lease = _acquire(platform, run, takeover=takeover)
    if run.state is RunState.FAILED:
        platform.state.set_run_state(run_id, RunState.RUNNING, fence=lease.fence)
    platform.state.reset_steps(run_id, from_step, fence=lease.fence)
    _audit_run(platform, run, actor, "run.rerun", {"from": from_step})
    return execute(platform, run_id, actor=actor, takeover=True, **kw)


def cancel(platform: Platform, run_id: str, *, actor: str, takeover: bool = False) -> Outcome:
    """Give up a run that has not reached its flow's point of no return and undo what it did
    (enable/remove: the tenant key re-wrapped under its original key, the destination and
    the new index generation deleted if this run created them, the old index writable
    again, the gate reopened with the deferred jobs replayed; rotate: the gate reopened and
    the rotation left unconfirmed; erase: nothing destroyed yet). Idempotent; refused past
    the point of no return and for flows that cannot be cancelled."""
    run = get_run(platform, run_id)
    if run.state is RunState.CANCELLED:
        return Outcome(
            run_id, run.tenant_id, run.flow.value, run.state.value, created=False, message="already cancelled"
        )
    flowdef = definition(run.flow)
    refusal = flowdef.cancel_refusal(run)
    if refusal is None and run.state is RunState.COMPLETED:
        refusal = f"run {run_id} has completed"
    if refusal is not None:
        raise ValidationError(f"{refusal}: it cannot be cancelled" + _after_cancel_hint(run.flow))
    plan = flowdef.plan_from_params(run.params)
    lease = _acquire(platform, run, takeover=takeover)
    fence = lease.fence
    try:
        _audit_start_if_missing(platform, run, actor)
        assert flowdef.cancel is not None  # cancel_refusal said so
        undone = flowdef.cancel(platform, run, plan, fence)
        platform.state.set_run_state(run_id, RunState.CANCELLED, fence=fence)
        _audit_run(platform, run, actor, "run.cancel", {"undone": undone})
    finally:
        platform.state.release_lease(lease)
    return Outcome(
        run_id,
        plan.tenant_id,
        plan.flow,
        RunState.CANCELLED.value,
        created=False,
        message="cancelled: " + (", ".join(undone) or "nothing to undo"),
    )


def _after_cancel_hint(flow: Flow) -> str:
    if flow in (Flow.ENABLE, Flow.REMOVE):
        return "; the tenant may already live at the destination: resume it, then run the reverse flow"
    return "; resume it"


@dataclass(frozen=True)
class WaiveOutcome:
    run_id: str
    tenant_id: str
    waived: tuple[str, ...]  # names waived by this call
    already: tuple[str, ...]  # named, but waived before
    remaining: int  # quarantined objects of the run still not waived
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant_id,
            "waived": list(self.waived),
            "already_waived": list(self.already),
            "remaining": self.remaining,
            "message": self.message,
        }


def _waiver_reason(reason: str) -> str:
    text = (reason or "").strip()
    if not text:
        raise ValidationError("a waiver needs a reason (--reason): why may this object be left behind?")
    if len(text) > MAX_WAIVER_REASON_CHARS:
        raise ValidationError(f"the waiver reason is {len(text)} characters; at most {MAX_WAIVER_REASON_CHARS}")
    if any(not c.isprintable() for c in text):
        raise ValidationError("the waiver reason must be printable text on one line")
    return text


def waive(
    platform: HasRunStore,
    run_id: str,
    *,
    reason: str,
    actor: str,
    objects: Sequence[bytes] = (),
    all_objects: bool = False,
    takeover: bool = False,
) -> WaiveOutcome:
    """Accept that quarantined objects of ``run_id`` are left behind, so the run can cut
    over without them (faults D9). Every waiver is first an ``object.waive`` audit record
    (actor, object, reason), then a mark on the object's ledger row; the run itself is
    not executed: ``resume`` it afterwards. Refused once cutover has started, and while a
    live worker holds the run. Naming an object that is not quarantined waives nothing."""
    text = _waiver_reason(reason)
    if bool(objects) == bool(all_objects):
        raise ValidationError("name the objects to waive (--object NAME, repeatable) or pass --all, not both")
    run = get_run(platform, run_id)
    if run.state in (RunState.COMPLETED, RunState.CANCELLED):
        raise ValidationError(f"run {run_id} is {run.state.value}: nothing to waive")
    barrier = definition(run.flow).point_of_no_return
    if run.flow not in (Flow.ENABLE, Flow.REMOVE) or barrier is None:
        raise ValidationError(f"run {run_id} is a {run.flow.value} run: it copies nothing, so nothing is quarantined")
    if run.step(barrier).state is not StepState.PENDING:
        raise ValidationError(f"run {run_id} has reached {barrier}: its quarantine was settled before it")
    lease = _acquire(platform, run, takeover=takeover)
    try:
        held = dict(quarantined(platform.state, run_id))
        wanted = sorted(held) if all_objects else list(dict.fromkeys(bytes(n) for n in objects))
        unknown = [n for n in wanted if n not in held]
        if unknown:
            first = ", ".join(repr(display_name(n)[:120]) for n in unknown[:5])
            raise ValidationError(
                f"{len(unknown)} named object(s) are not quarantined in run {run_id} (first: "
                f"{first}); nothing waived. See `archive-kms runs show {run_id}`"
            )
        already = [n for n in wanted if held[n].waived]
        rows: list[CopyRecord] = []
        for name in (n for n in wanted if not held[n].waived):
            q: Quarantine = held[name]
            # The audit record first: a waiver without one never happened (I6), and verify checks it.
            rec = platform.state.append_audit(
                AuditEvent(
                    actor=actor,
                    action=WAIVE_ACTION,
                    tenant_id=run.tenant_id,
                    run_id=run_id,
                    details=waiver_audit_details(name, q, text),
                )
            )
            waiver = Waiver(actor=actor, reason=text, at=now_iso(), audit_seq=rec.seq)
            rows.append(CopyRecord(name, CopyStatus.QUARANTINED, error=q.with_waiver(waiver).to_error()))
        for i in range(0, len(rows), 500):
            platform.state.record_copies(run_id, rows[i : i + 500], fence=lease.fence)
    finally:
        platform.state.release_lease(lease)
    remaining = sum(1 for q in held.values() if not q.waived) - len(rows)
    message = f"waived {len(rows)} object(s) of run {run_id}" + (f" ({len(already)} already waived)" if already else "")
    message += (
        f"; {remaining} quarantined object(s) still not waived"
        if remaining
        else f"; continue with `archive-kms runs resume {run_id}`"
    )
    return WaiveOutcome(
        run_id,
        run.tenant_id,
        tuple(display_name(r.name) for r in rows),
        tuple(display_name(n) for n in already),
        remaining,
        message,
    )


def _audit_run(platform: HasRunStore, run: MigrationRun, actor: str, action: str, details: dict[str, Any]) -> None:
    platform.state.append_audit(
        AuditEvent(actor=actor, action=action, tenant_id=run.tenant_id, run_id=run.run_id, details=details)
    )


__all__ = [
    "REFUSED",
    "SUPERSEDED",
    "WAITING",
    "Admission",
    "Hooks",
    "Outcome",
    "RunContext",
    "ShardRunner",
    "WaiveOutcome",
    "cancel",
    "check_trigger",
    "execute",
    "get_run",
    "rerun",
    "resume",
    "shard_function",
    "thread_shard_runner",
    "trigger",
    "waiting_on",
    "waive",
]
