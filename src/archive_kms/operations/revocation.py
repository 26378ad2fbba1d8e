"""Revocation runs with a receipt, and restore (docs/key-lifecycle.md; ADR 0023).

A revocation has two parts:

* ``begin_revocation`` runs in the caller's process (the CLI, the console API, the
  key-state monitor) and makes the revocation true everywhere before it returns: it warms
  a second keychain (``Platform.probe_view``: what another, warm process holds), commits
  the revocation to the signed keychain head (whole tenant, or a scope: one workspace, the
  DEKs of buckets before a time, or both), marks the tenant revoked in the registry,
  closes the tenant's archive gate (jobs are deferred, not lost), then reads and searches
  with the warm keychain until they are refused, and waits out
  ``revocation_check_seconds`` (the longest any process may reuse its view of the head),
  so once it returns no process serves the tenant. It never depends on a worker.
* ``finish_revocation`` is the recorded run (``Flow.REVOKE``; the ``key-revoke`` flow on
  a worker, or in process): it waits for the tenant's running migration run to stop (it
  fails at its next object boundary: "revoke wins"), records the run with its steps,
  probes every component (reads and searches from a fresh process, the unwrap path, job
  writes, the archive gate, the provider's own unwrap) and writes the **revocation
  receipt**: when the request came and when each component began refusing, measured.
  The receipt is the ``receipt`` step's result and the ``revoke.receipt`` audit record.

``restore_tenant`` (``Flow.RESTORE``) verifies that the master key unwraps the tenant key
again (a real unwrap at the provider), lifts the revocation, reopens the gate it closed
and replays the jobs deferred meanwhile exactly once, then probes that reads work again.

The run record of a revocation is created once no migration run of the tenant is
running (one running run per tenant); the revocation itself never waits for that.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms.domain.keychain import ScopedRevocation, time_in, time_out
from archive_kms.errors import (
    ArchiveKmsError,
    KeyServiceUnavailableError,
    KeyUnavailableError,
    StateError,
    ValidationError,
    VersionConflictError,
)
from archive_kms.operations.archive import RECORD_PREFIX, TenantArchive, replay_deferred, workspace_of
from archive_kms.operations.blast_radius import BlastRadius, blast_radius, register_dry_run
from archive_kms.operations.key_warnings import clear_warning, raise_warning
from archive_kms.operations.platform import Platform
from archive_kms.search import Query
from archive_kms.state.port import AuditEvent, Flow, GateState, KeyMode, MigrationRun, RunState, StepState, WarningKind

__all__ = [
    "RESTORE_STEPS",
    "REVOKE_STEPS",
    "RestoreReport",
    "RevocationReceipt",
    "RevocationScope",
    "RevocationStart",
    "begin_revocation",
    "check_restore",
    "check_revoke",
    "finish_revocation",
    "restore_tenant",
    "revocation_preview",
    "revoke_tenant",
]

log = logging.getLogger(__name__)

REVOKE_STEPS = ("request", "revoke_keys", "close_gate", "stop_runs", "probe", "receipt")
RESTORE_STEPS = ("request", "verify_unwrap", "restore_keys", "open_gate", "replay_jobs", "probe")

#: How long the warm probe may keep being served before the receipt says the bound failed.
PROBE_GRACE_SECONDS = 2.0
PROBE_INTERVAL_SECONDS = 0.02
#: How long the revocation run waits for the tenant's running migration run to stop.
RUN_STOP_TIMEOUT_SECONDS = 60.0
#: What a sample read reads at most (records are small; an attachment is never a sample).
_SAMPLES = 64


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime | None) -> str | None:
    return time_out(t)


# --- scope ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevocationScope:
    """What a revocation covers: the whole tenant (both None), one workspace, the DEKs of
    every bucket that ends at or before ``before``, or that range in one workspace."""

    workspace_id: str | None = None
    before: datetime | None = None

    @property
    def whole(self) -> bool:
        return self.workspace_id is None and self.before is None

    @property
    def kind(self) -> str:
        if self.whole:
            return "tenant"
        if self.before is None:
            return "workspace"
        return "range" if self.workspace_id is None else "workspace-range"

    def describe(self) -> str:
        if self.whole:
            return "the whole tenant"
        return ScopedRevocation(self.workspace_id, self.before, _now()).describe()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "workspace": self.workspace_id, "before": _iso(self.before)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RevocationScope:
        data = data or {}
        return cls(data.get("workspace"), time_in(data.get("before")))


# --- probing ----------------------------------------------------------------------------------


@dataclass
class _Probe:
    """When one component began refusing, as measured."""

    component: str
    how: str
    refusing_since: datetime | None = None
    error: str | None = None
    served: int = 0  # successful answers after the revocation was committed
    attempts: int = 0
    note: str | None = None
    last_served: datetime | None = None  # the last successful answer

    def to_dict(self, committed: datetime | None) -> dict[str, Any]:
        after = None
        if self.refusing_since is not None and committed is not None:
            after = round(max(0.0, (self.refusing_since - committed).total_seconds()) * 1000, 1)
        return {
            "component": self.component,
            "how": self.how,
            "refusing": self.refusing_since is not None,
            "refusing_since": _iso(self.refusing_since),
            "after_commit_ms": after,
            "served_after_commit": self.served,
            "last_served_at": _iso(self.last_served),
            "attempts": self.attempts,
            "error": self.error,
            "note": self.note,
        }


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, (KeyUnavailableError, KeyServiceUnavailableError))


def _until_refused(probe: _Probe, attempt: Callable[[], Any], deadline: float) -> _Probe:
    """Call ``attempt`` every ``PROBE_INTERVAL_SECONDS`` until it is refused by the
    keychain, or ``deadline`` (monotonic) passes."""
    while True:
        probe.attempts += 1
        try:
            attempt()
        except BaseException as exc:  # noqa: BLE001 - anything but a refusal is reported, not raised
            if _refused(exc):
                probe.refusing_since = _now()
                probe.error = f"{type(exc).__name__}: {exc}"[:400]
                return probe
            probe.note = f"probe failed: {type(exc).__name__}: {str(exc)[:200]}"
            return probe
        probe.served += 1
        probe.last_served = _now()
        if time.monotonic() >= deadline:
            probe.note = f"still served {probe.served} time(s) after the commit"
            return probe
        time.sleep(PROBE_INTERVAL_SECONDS)


def _succeeds(probe: _Probe, attempt: Callable[[], Any]) -> _Probe:
    probe.attempts += 1
    try:
        attempt()
    except BaseException as exc:  # noqa: BLE001
        probe.refusing_since = _now()
        probe.error = f"{type(exc).__name__}: {exc}"[:400]
        return probe
    probe.served += 1
    probe.last_served = _now()
    return probe


@dataclass(frozen=True)
class _Sample:
    name: bytes
    dek_id: str


def _samples(platform: Platform, tenant_id: str, scope: RevocationScope) -> tuple[_Sample | None, _Sample | None]:
    """A record object the scope covers (whole tenant: any), and one it does not (scoped
    revocations only: what must stay readable). Reads at most ``_SAMPLES`` headers."""
    from archive_kms.crypto.envelope import read_header

    archive = platform.open_archive(tenant_id)
    inside = outside = None
    for n, info in enumerate(archive.store.list(RECORD_PREFIX)):
        if n >= _SAMPLES or (inside is not None and (outside is not None or scope.whole)):
            break
        try:
            with archive.store.open_read(info.name) as reader:
                header = read_header(reader)
        except (ArchiveKmsError, OSError):
            continue
        sample = _Sample(info.name, header.dek_id)
        if scope.whole or platform.keychain.scope_covers(tenant_id, scope.workspace_id, scope.before, header.dek_id):
            inside = inside or sample
        else:
            outside = outside or sample
    return inside, outside


def _read(archive: TenantArchive, name: bytes) -> None:
    for _ in archive.read_object(name):
        pass


def _search_sees(archive: TenantArchive, sample: _Sample | None) -> Callable[[], None]:
    """A search that counts as served while it answers (whole tenant) or while it still
    returns the sample's record (a scoped revocation withholds it)."""

    def attempt() -> None:
        result = archive.search(Query(limit=1000))
        if sample is None:
            return
        ws = workspace_of(sample.name)
        record_id = sample.name.rsplit(b"/", 1)[-1].decode()
        if not any(h.workspace_id == ws and h.record_id == record_id for h in result.hits):
            raise KeyUnavailableError("the sample record is withheld from search results", state="revoked")

    return attempt


# --- begin ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevocationStart:
    """What ``begin_revocation`` did (plain JSON through ``to_params``: it is what the
    ``key-revoke`` deployment is given)."""

    run_id: str
    tenant_id: str
    scope: RevocationScope
    actor: str
    reason: str
    requested_at: datetime
    committed_at: datetime  # the keychain commit (or the earlier revocation's, if already revoked)
    already_revoked: bool
    refusing_everywhere_by: datetime  # commit + revocation_check_seconds
    bound_seconds: float
    gate: dict[str, Any]
    warm: list[dict[str, Any]]  # measured refusals of the warm keychain
    active_run: dict[str, Any] | None  # the tenant's running run at the time, if any
    key_state: dict[str, Any] | None = None  # the monitor's observation, for a customer-side revocation

    def to_params(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant_id,
            "scope": self.scope.to_dict(),
            "actor": self.actor,
            "reason": self.reason,
            "requested_at": _iso(self.requested_at),
            "committed_at": _iso(self.committed_at),
            "already_revoked": self.already_revoked,
            "refusing_everywhere_by": _iso(self.refusing_everywhere_by),
            "bound_seconds": self.bound_seconds,
            "gate": self.gate,
            "warm": self.warm,
            "active_run": self.active_run,
            "key_state": self.key_state,
        }

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> RevocationStart:
        return cls(
            run_id=p["run_id"],
            tenant_id=p["tenant"],
            scope=RevocationScope.from_dict(p.get("scope")),
            actor=p["actor"],
            reason=p.get("reason") or "",
            requested_at=time_in(p["requested_at"]),  # type: ignore[arg-type]
            committed_at=time_in(p["committed_at"]),  # type: ignore[arg-type]
            already_revoked=bool(p.get("already_revoked")),
            refusing_everywhere_by=time_in(p["refusing_everywhere_by"]),  # type: ignore[arg-type]
            bound_seconds=float(p["bound_seconds"]),
            gate=dict(p.get("gate") or {}),
            warm=list(p.get("warm") or []),
            active_run=p.get("active_run"),
            key_state=p.get("key_state"),
        )


def _check_reason(reason: str) -> str:
    text = (reason or "").strip()
    if len(text) > 500 or any(not c.isprintable() for c in text):
        raise ValidationError("the reason must be printable text on one line, at most 500 characters")
    return text


def check_revoke(platform: Platform, tenant_id: str, scope: RevocationScope) -> None:
    """What ``begin_revocation`` refuses, without changing anything (dry runs, the console)."""
    tenant = platform.state.get_tenant(tenant_id)
    if tenant is None:
        raise StateError(f"unknown tenant {tenant_id!r}: see `archive-kms tenant list`", resource=f"tenant:{tenant_id}")
    status = platform.keychain.status(tenant_id)
    if not scope.whole:
        if scope.workspace_id is not None and scope.workspace_id not in status.workspaces:
            raise ValidationError(
                f"tenant {tenant_id} has no live workspace {scope.workspace_id!r} (workspaces: "
                f"{', '.join(status.workspaces) or 'none'})"
            )
        if scope.before is not None and scope.before > _now():
            raise ValidationError(
                f"--before {_iso(scope.before)} is in the future: a time range covers data already archived"
            )


def begin_revocation(
    platform: Platform,
    tenant_id: str,
    *,
    actor: str,
    reason: str = "",
    scope: RevocationScope | None = None,
    run_id: str | None = None,
    key_state: dict[str, Any] | None = None,
) -> RevocationStart:
    """Revoke now (see the module docstring); returns once no process serves the scope."""
    scope = scope or RevocationScope()
    reason = _check_reason(reason)
    check_revoke(platform, tenant_id, scope)
    run_id = run_id or uuid.uuid4().hex
    requested_at = _now()
    platform.state.append_audit(
        AuditEvent(
            actor=actor,
            action="revoke.request",
            tenant_id=tenant_id,
            run_id=run_id,
            details={"scope": scope.to_dict(), "reason": reason},
        )
    )
    before = platform.keychain.status(tenant_id)
    already = before.revoked if scope.whole else False

    # A warm process: keys cached, head seen; measured below.
    probe = platform.probe_view()
    warm_archive = probe.open_archive(tenant_id)
    inside, _ = _samples(platform, tenant_id, scope) if not already else (None, None)
    warm_reads = _Probe("reads", "a warm process (its DEKs cached) reading a record every 20 ms")
    warm_search = _Probe("search", "a warm process (its search keys in use) searching every 20 ms")
    if inside is not None:
        try:
            _read(warm_archive, inside.name)
            _search_sees(warm_archive, inside)()
        except ArchiveKmsError as exc:
            log.warning("revocation of %s: warming the probe failed: %s", tenant_id, type(exc).__name__)

    # The revocation itself.
    if scope.whole:
        status = platform.keychain.revoke(tenant_id)
        committed = status.revoked_at or _now()
        _mark_tenant(platform, tenant_id, revoked=True)
    else:
        found = platform.keychain.revoke_scope(tenant_id, workspace_id=scope.workspace_id, before=scope.before)
        committed = found.revoked_at
    bound = platform.keychain.revocation_check_seconds
    everywhere_by = datetime.fromtimestamp(committed.timestamp() + bound, UTC)

    gate = _close_gate(platform, tenant_id, run_id) if scope.whole else {"closed": False, "why": "scoped revocation"}
    active = platform.state.find_active_run(tenant_id)
    active_run = None
    if active is not None:
        step = next((s.name for s in active.steps if s.state is StepState.RUNNING), None)
        active_run = {"run_id": active.run_id, "flow": active.flow.value, "step": step}

    # Measure the warm process, then wait out the bound: from here no process serves.
    deadline = time.monotonic() + bound + PROBE_GRACE_SECONDS
    warm: list[dict[str, Any]] = []
    if inside is not None:
        _until_refused(warm_reads, lambda: _read(warm_archive, inside.name), deadline)
        _until_refused(warm_search, _search_sees(warm_archive, inside), deadline)
        warm = [warm_reads.to_dict(committed), warm_search.to_dict(committed)]
    else:
        note = "already revoked" if already else "the tenant has no record in the scope to probe"
        warm = [
            {**_Probe("reads", warm_reads.how, note=note).to_dict(committed), "refusing": None},
            {**_Probe("search", warm_search.how, note=note).to_dict(committed), "refusing": None},
        ]
    wait = everywhere_by.timestamp() + 0.1 - time.time()
    if wait > 0:
        time.sleep(wait)
    if scope.whole:
        raise_warning(
            platform.state,
            tenant_id,
            WarningKind.TENANT_REVOKED,
            f"key access of tenant {tenant_id} revoked at {_iso(committed)} by {actor}"
            + (f" ({reason})" if reason else "")
            + ": reads, writes and searches are refused until `archive-kms restore`",
            actor=actor,
            details={"revoked_at": _iso(committed), "by": actor, "run_id": run_id},
        )
    log.warning("revocation of %s (%s) in force since %s", tenant_id, scope.describe(), _iso(committed))
    return RevocationStart(
        run_id=run_id,
        tenant_id=tenant_id,
        scope=scope,
        actor=actor,
        reason=reason,
        requested_at=requested_at,
        committed_at=committed,
        already_revoked=already,
        refusing_everywhere_by=everywhere_by,
        bound_seconds=bound,
        gate=gate,
        warm=warm,
        active_run=active_run,
        key_state=key_state,
    )


def _mark_tenant(platform: Platform, tenant_id: str, *, revoked: bool) -> None:
    """The registry's ``revoked`` column (what ``tenant list`` shows); the keychain's
    signed flag is what refuses."""
    for _ in range(8):
        t = platform.state.get_tenant(tenant_id)
        if t is None or t.revoked is revoked:
            return
        try:
            platform.state.update_tenant(replace(t, revoked=revoked))
            return
        except VersionConflictError:
            continue


def _close_gate(platform: Platform, tenant_id: str, run_id: str) -> dict[str, Any]:
    gate = platform.state.gate(tenant_id)
    if gate.state is GateState.PAUSED:
        return {
            "closed": True,
            "by_run": gate.paused_by_run,
            "since": _iso(gate.since),
            "note": f"already paused by run {gate.paused_by_run}: archive jobs were deferred already",
        }
    paused = platform.state.pause(tenant_id, run_id)
    platform.state.append_audit(
        AuditEvent(
            actor="revocation",
            action="gate.pause",
            tenant_id=tenant_id,
            run_id=run_id,
            details={"reason": "tenant revoked"},
        )
    )
    return {"closed": True, "by_run": run_id, "since": _iso(paused.since), "note": "paused by this revocation"}


# --- finish -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevocationReceipt:
    """The revocation receipt (``to_dict`` is what is stored, audited and printed)."""

    run_id: str
    tenant_id: str
    data: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.data.get("ok"))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)


def _wait_for_active_run(platform: Platform, start: RevocationStart, timeout: float) -> dict[str, Any]:
    """Wait until the migration run that was going when the revocation began has stopped."""
    if start.active_run is None or start.active_run.get("flow") in (Flow.REVOKE.value, Flow.RESTORE.value):
        return {"runs": [], "note": "no migration run was going"}
    run_id = start.active_run["run_id"]
    deadline = time.monotonic() + timeout
    while True:
        run = platform.state.get_run(run_id)
        if run is None or run.state is not RunState.RUNNING:
            break
        if time.monotonic() >= deadline:
            raise StateError(
                f"run {run_id} of tenant {start.tenant_id} is still running {timeout:.0f} s after the revocation "
                f"(step {_running_step(run)}); the revocation is in force since {_iso(start.committed_at)}, but "
                f"its run record and receipt wait until that run stops: run `archive-kms revoke "
                f"{start.tenant_id}` again then (it is idempotent)",
                resource=f"run:{run_id}",
            )
        time.sleep(0.2)
    failed = None
    if run is not None:
        failed = next((s for s in run.steps if s.state is StepState.FAILED), None)
    return {
        "runs": [
            {
                "run_id": run_id,
                "flow": start.active_run.get("flow"),
                "state": run.state.value if run is not None else "gone",
                "stopped_at": _iso(run.updated_at) if run is not None else None,
                "step": failed.name if failed else start.active_run.get("step"),
                "error": (failed.error or "")[:300] if failed else None,
                "resume": f"archive-kms runs resume {run_id}" if run and run.state is RunState.FAILED else None,
            }
        ]
    }


def _running_step(run: MigrationRun) -> str:
    return next((s.name for s in run.steps if s.state is StepState.RUNNING), "?")


def _record_run(platform: Platform, start: RevocationStart, timeout: float) -> tuple[MigrationRun, dict[str, Any]]:
    stopped = _wait_for_active_run(platform, start, timeout)
    deadline = time.monotonic() + timeout
    while True:
        run, _ = platform.state.start_run(
            start.tenant_id,
            Flow.REVOKE,
            mode=start.scope.kind,
            steps=REVOKE_STEPS,
            params={"scope": start.scope.to_dict(), "actor": start.actor, "reason": start.reason},
            run_id=start.run_id,
        )
        if run.run_id == start.run_id:
            return run, stopped
        if time.monotonic() >= deadline:  # another run started meanwhile (a restore, say)
            raise StateError(
                f"tenant {start.tenant_id} has running {run.flow.value} run {run.run_id}: the revocation is in "
                f"force since {_iso(start.committed_at)}; its receipt waits until that run ends",
                resource=f"run:{run.run_id}",
            )
        time.sleep(0.2)


def _step(platform: Platform, run_id: str, name: str, result: dict[str, Any]) -> None:
    platform.state.update_step(run_id, name, StepState.RUNNING)
    platform.state.update_step(run_id, name, StepState.COMPLETED, result=result)


def finish_revocation(
    platform: Platform, start: RevocationStart, *, run_stop_timeout: float = RUN_STOP_TIMEOUT_SECONDS
) -> RevocationReceipt:
    """Record the revocation run and write its receipt (see the module docstring).
    Idempotent: a run already completed returns its receipt."""
    existing = platform.state.get_run(start.run_id)
    if existing is not None and existing.state is RunState.COMPLETED:
        return RevocationReceipt(start.run_id, start.tenant_id, dict(existing.step("receipt").result or {}))
    run, stopped = _record_run(platform, start, run_stop_timeout)
    run_id = start.run_id
    current = "request"
    try:
        done = {s.name for s in run.steps if s.state is StepState.COMPLETED}
        if "request" not in done:
            _step(
                platform,
                run_id,
                "request",
                {
                    "requested_at": _iso(start.requested_at),
                    "actor": start.actor,
                    "reason": start.reason,
                    "scope": start.scope.to_dict(),
                },
            )
        current = "revoke_keys"
        if "revoke_keys" not in done:
            _step(
                platform,
                run_id,
                "revoke_keys",
                {
                    "committed_at": _iso(start.committed_at),
                    "already_revoked": start.already_revoked,
                    "refusing_everywhere_by": _iso(start.refusing_everywhere_by),
                    "bound_seconds": start.bound_seconds,
                },
            )
        current = "close_gate"
        if "close_gate" not in done:
            _step(platform, run_id, "close_gate", start.gate)
        current = "stop_runs"
        if "stop_runs" not in done:
            _step(platform, run_id, "stop_runs", stopped)
        current = "probe"
        platform.state.update_step(run_id, "probe", StepState.RUNNING)
        probes = _probe_all(platform, start)
        platform.state.update_step(run_id, "probe", StepState.COMPLETED, result={"components": probes})
        current = "receipt"
        platform.state.update_step(run_id, "receipt", StepState.RUNNING)
        receipt = _receipt(platform, start, probes, stopped)
        platform.state.update_step(run_id, "receipt", StepState.COMPLETED, result=receipt)
        platform.state.append_audit(
            AuditEvent(
                actor=start.actor, action="revoke.receipt", tenant_id=start.tenant_id, run_id=run_id, details=receipt
            )
        )
        platform.state.set_run_state(run_id, RunState.COMPLETED)
        clear_warning(
            platform.state,
            start.tenant_id,
            WarningKind.RUN_FAILED,
            actor=start.actor,
            subject=run_id,
            reason="completed",
        )
        return RevocationReceipt(run_id, start.tenant_id, receipt)
    except BaseException as exc:
        _fail_run(platform, run_id, start.tenant_id, current, exc, actor=start.actor)
        raise


def _fail_run(platform: Platform, run_id: str, tenant_id: str, step: str, exc: BaseException, *, actor: str) -> None:
    error = f"{type(exc).__name__}: {exc}"[:1000]
    try:
        platform.state.update_step(run_id, step, StepState.FAILED, error=error)
        platform.state.set_run_state(run_id, RunState.FAILED)
        raise_warning(
            platform.state,
            tenant_id,
            WarningKind.RUN_FAILED,
            f"run {run_id} failed at step {step}: {error[:300]}",
            actor=actor,
            subject=run_id,
            details={"run_id": run_id, "step": step},
        )
    except ArchiveKmsError:
        log.exception("run %s: recording its failure failed", run_id)


def _probe_all(platform: Platform, start: RevocationStart) -> list[dict[str, Any]]:
    """Probe every component from a fresh process view (after the bound has passed)."""
    tenant_id, scope = start.tenant_id, start.scope
    committed = start.committed_at
    fresh = platform.probe_view()
    archive = fresh.open_archive(tenant_id)
    inside, outside = _samples(platform, tenant_id, scope)
    out: list[dict[str, Any]] = list(start.warm)
    deadline = time.monotonic() + PROBE_GRACE_SECONDS
    fresh_reads = _Probe("reads (fresh process)", "a process that starts now reading a record")
    fresh_search = _Probe("search (fresh process)", "a process that starts now searching")
    unwrap = _Probe("unwrap", "the keychain unwrapping a DEK the scope covers (fresh process)")
    if inside is not None:
        _until_refused(fresh_reads, lambda: _read(archive, inside.name), deadline)
        _until_refused(fresh_search, _search_sees(archive, inside), deadline)
        _until_refused(unwrap, lambda: fresh.keychain.dek_by_id(tenant_id, inside.dek_id), deadline)
    else:
        if scope.whole:
            _until_refused(fresh_search, _search_sees(archive, None), deadline)
        for p in (fresh_reads, unwrap):
            p.note = "the tenant has no record in the scope to probe"
        if not scope.whole:
            fresh_search.note = "the tenant has no record in the scope to probe"
    out += [fresh_reads.to_dict(committed), fresh_search.to_dict(committed), unwrap.to_dict(committed)]
    if scope.whole:
        writes = _Probe("job writes", "an archive job's write path (the DEK for encryption)")
        ws = workspace_of(inside.name) if inside is not None else "default"
        _until_refused(writes, lambda: fresh.keychain.dek_for_encrypt(tenant_id, ws), deadline)
        out.append(writes.to_dict(committed))
        gate = platform.state.gate(tenant_id)
        jobs = {
            "component": "archive jobs",
            "how": "the archive gate in the state store: jobs admitted from then on are deferred",
            "refusing": gate.state is GateState.PAUSED,
            "refusing_since": _iso(gate.since) if gate.state is GateState.PAUSED else None,
            "after_commit_ms": round(max(0.0, (gate.since - committed).total_seconds()) * 1000, 1)
            if gate.state is GateState.PAUSED
            else None,
            "served_after_commit": 0,
            "attempts": 1,
            "error": None,
            "note": f"gate {gate.state.value}, paused by run {gate.paused_by_run}; {gate.pending} job(s) deferred",
        }
        out.append(jobs)
    if outside is not None:  # a scoped revocation leaves the rest readable: show it
        rest = _succeeds(
            _Probe("reads outside the scope", "a record the scope does not cover"), lambda: _read(archive, outside.name)
        )
        out.append({**rest.to_dict(committed), "refusing": rest.refusing_since is not None})
    out.append(_provider_probe(platform, start))
    return out


def _provider_probe(platform: Platform, start: RevocationStart) -> dict[str, Any]:
    """Does the master key's provider itself refuse to unwrap the tenant key? (A real unwrap
    at the provider, the key wiped at once; for a revocation by the customer, since when the
    monitor first saw the key unusable.)"""
    probe = _Probe("provider unwrap", "unwrapping the tenant key at its master key's provider")
    try:
        platform.probe_view().keychain.verify_l1_unwrap(start.tenant_id)
        probe.served = 1
        probe.note = (
            "the provider still unwraps: this revocation is enforced by the platform (signed keychain flag, caches "
            "purged); disable the key at the provider as well to make it refuse too"
        )
    except ArchiveKmsError as exc:
        probe.refusing_since = _now()
        probe.error = f"{type(exc).__name__}: {exc}"[:400]
        seen = (start.key_state or {}).get("first_seen_unusable_at")
        if seen:
            probe.refusing_since = min(probe.refusing_since, time_in(seen))  # type: ignore[type-var]
            probe.note = f"the key-state check first saw the key {start.key_state.get('state')} at {seen}"  # type: ignore[union-attr]
    probe.attempts = 1
    out = probe.to_dict(start.committed_at)
    if probe.refusing_since is not None and probe.refusing_since < start.committed_at:
        out["after_commit_ms"] = -round((start.committed_at - probe.refusing_since).total_seconds() * 1000, 1)
    return out


def _receipt(
    platform: Platform, start: RevocationStart, probes: list[dict[str, Any]], stopped: dict[str, Any]
) -> dict[str, Any]:
    platform_components = [p for p in probes if p["component"] not in ("provider unwrap", "reads outside the scope")]
    # Late: a component still answering, or one that answered after every process had to
    # refuse (its last success later than commit + bound). Refused at its first try after the
    # bound is on time: nothing was served past it.
    bound = _iso(start.refusing_everywhere_by) or ""
    served_late = [
        p["component"]
        for p in platform_components
        if p.get("refusing") is False or (p.get("last_served_at") or "") > bound
    ]
    outside = next((p for p in probes if p["component"] == "reads outside the scope"), None)
    ok = not served_late and (outside is None or not outside["refusing"])
    return {
        "format": "archive_kms.revocation-receipt/1",
        "run_id": start.run_id,
        "tenant": start.tenant_id,
        "scope": start.scope.to_dict(),
        "actor": start.actor,
        "reason": start.reason,
        "requested_at": _iso(start.requested_at),
        "committed_at": _iso(start.committed_at),
        "already_revoked": start.already_revoked,
        "bound_seconds": start.bound_seconds,
        "refusing_everywhere_by": _iso(start.refusing_everywhere_by),
        "components": probes,
        "gate": start.gate,
        "runs_stopped": stopped.get("runs", []),
        "ok": ok,
        "not_refusing_in_time": served_late,
        "completed_at": _iso(_now()),
    }


def revoke_tenant(
    platform: Platform,
    tenant_id: str,
    *,
    actor: str,
    reason: str = "",
    scope: RevocationScope | None = None,
    run_id: str | None = None,
    key_state: dict[str, Any] | None = None,
    run_stop_timeout: float = RUN_STOP_TIMEOUT_SECONDS,
) -> RevocationReceipt:
    """``begin_revocation`` then ``finish_revocation``, in this process."""
    start = begin_revocation(
        platform, tenant_id, actor=actor, reason=reason, scope=scope, run_id=run_id, key_state=key_state
    )
    return finish_revocation(platform, start, run_stop_timeout=run_stop_timeout)


# --- restore ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreReport:
    run_id: str
    tenant_id: str
    scope: RevocationScope
    restored: bool  # False: nothing was revoked in this scope
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tenant": self.tenant_id,
            "scope": self.scope.to_dict(),
            "restored": self.restored,
            **self.data,
        }


def check_restore(platform: Platform, tenant_id: str, scope: RevocationScope) -> str:
    """What restore would lift, in words; ``ValidationError`` if nothing is revoked there
    (and ``StateError`` for an unknown tenant)."""
    if platform.state.get_tenant(tenant_id) is None:
        raise StateError(f"unknown tenant {tenant_id!r}: see `archive-kms tenant list`", resource=f"tenant:{tenant_id}")
    status = platform.keychain.status(tenant_id)
    if scope.whole:
        if not status.revoked:
            raise ValidationError(f"tenant {tenant_id} is not revoked: nothing to restore")
        return f"the revocation of tenant {tenant_id} of {_iso(status.revoked_at)}"
    key = (scope.workspace_id or "", _iso(scope.before) or "")
    scopes = platform.keychain.scoped_revocations(tenant_id)
    if not any(s.scope == key for s in scopes):
        held = "; ".join(s.describe() for s in scopes) or "none"
        raise ValidationError(f"tenant {tenant_id} has no revocation of {scope.describe()} (in force: {held})")
    return f"the revocation of {scope.describe()}"


def restore_tenant(
    platform: Platform,
    tenant_id: str,
    *,
    actor: str,
    reason: str = "",
    scope: RevocationScope | None = None,
    run_id: str | None = None,
) -> RestoreReport:
    """Restore access (see the module docstring), recorded as a ``restore`` run. Raises
    ``KeyUnavailableError`` (the run failed, the tenant still revoked) while the master
    key does not unwrap; ``StateError`` if another run of the tenant is going."""
    scope = scope or RevocationScope()
    reason = _check_reason(reason)
    known = platform.state.get_run(run_id) if run_id else None
    if known is not None and known.state is not RunState.RUNNING:  # a duplicate delivery: report, never redo
        if known.state is RunState.COMPLETED:
            return RestoreReport(run_id or "", tenant_id, scope, True, dict(known.step("probe").result or {}))
        raise StateError(f"restore run {run_id} is {known.state.value}: start a new restore", resource=f"run:{run_id}")
    what = check_restore(platform, tenant_id, scope)
    run, created = platform.state.start_run(
        tenant_id,
        Flow.RESTORE,
        mode=scope.kind,
        steps=RESTORE_STEPS,
        params={"scope": scope.to_dict(), "actor": actor, "reason": reason},
        run_id=run_id,
    )
    if not created and run.flow is not Flow.RESTORE:
        raise StateError(
            f"tenant {tenant_id} has a running {run.flow.value} run {run.run_id}: restore after it ends",
            resource=f"run:{run.run_id}",
        )
    run_id = run.run_id
    current = "request"
    try:
        _step(
            platform, run_id, "request", {"requested_at": _iso(_now()), "actor": actor, "reason": reason, "lifts": what}
        )
        platform.state.append_audit(
            AuditEvent(
                actor=actor,
                action="restore.request",
                tenant_id=tenant_id,
                run_id=run_id,
                details={"scope": scope.to_dict(), "reason": reason},
            )
        )
        current = "verify_unwrap"
        platform.state.update_step(run_id, current, StepState.RUNNING)
        started = time.monotonic()
        platform.keychain.verify_l1_unwrap(tenant_id)  # the provider unwraps again (else it raises)
        platform.state.update_step(
            run_id,
            current,
            StepState.COMPLETED,
            result={"unwrapped_at": _iso(_now()), "seconds": round(time.monotonic() - started, 3)},
        )
        current = "restore_keys"
        platform.state.update_step(run_id, current, StepState.RUNNING)
        if scope.whole:
            status = platform.keychain.restore(tenant_id)
            _mark_tenant(platform, tenant_id, revoked=False)
            lifted = status.revoked is False
        else:
            lifted = (
                platform.keychain.restore_scope(tenant_id, workspace_id=scope.workspace_id, before=scope.before)
                is not None
            )
        restored_at = _now()
        # Other processes reuse the revoked head they verified for at most the bound: wait it
        # out, so every process serves again once this returns (as a revocation waits it out).
        bound = platform.keychain.revocation_check_seconds
        platform.state.update_step(
            run_id,
            current,
            StepState.COMPLETED,
            result={
                "restored_at": _iso(restored_at),
                "serving_everywhere_by": _iso(restored_at + timedelta(seconds=bound)),
            },
        )
        time.sleep(max(0.0, restored_at.timestamp() + bound - time.time()))
        current = "open_gate"
        platform.state.update_step(run_id, current, StepState.RUNNING)
        gate = _open_gate(platform, tenant_id) if scope.whole else {"opened": False, "why": "scoped revocation"}
        platform.state.update_step(run_id, current, StepState.COMPLETED, result=gate)
        current = "replay_jobs"
        platform.state.update_step(run_id, current, StepState.RUNNING)
        replayed: list[Any] = []
        if scope.whole and gate.get("opened"):
            replayed = replay_deferred(platform.state, tenant_id, run_id, platform.open_archive)
        platform.state.update_step(
            run_id,
            current,
            StepState.COMPLETED,
            result={
                "replayed": sum(o.decision == "run" for o in replayed),
                "duplicates": sum(o.decision == "duplicate" for o in replayed),
            },
        )
        current = "probe"
        platform.state.update_step(run_id, current, StepState.RUNNING)
        probe = _restore_probe(platform, tenant_id, scope)
        failed_runs = [
            {"run_id": r.run_id, "flow": r.flow.value, "resume": f"archive-kms runs resume {r.run_id}"}
            for r in platform.state.list_runs(tenant_id, states=[RunState.FAILED], limit=5)
            if r.flow not in (Flow.REVOKE, Flow.RESTORE)
        ]
        result = {"components": probe, "restored_at": _iso(restored_at), "failed_runs": failed_runs}
        platform.state.update_step(run_id, current, StepState.COMPLETED, result=result)
        platform.state.set_run_state(run_id, RunState.COMPLETED)
        platform.state.append_audit(
            AuditEvent(
                actor=actor,
                action="restore.complete",
                tenant_id=tenant_id,
                run_id=run_id,
                details={"scope": scope.to_dict(), "restored_at": _iso(restored_at), "replayed": len(replayed)},
            )
        )
        if scope.whole:
            for kind in (WarningKind.TENANT_REVOKED, WarningKind.KEY_DISABLED):
                clear_warning(platform.state, tenant_id, kind, actor=actor, reason=f"restored by run {run_id}")
        return RestoreReport(
            run_id,
            tenant_id,
            scope,
            lifted,
            {
                "restored_at": _iso(restored_at),
                "gate": gate,
                "replayed_jobs": len(replayed),
                "components": probe,
                "failed_runs": failed_runs,
            },
        )
    except BaseException as exc:
        _fail_run(platform, run_id, tenant_id, current, exc, actor=actor)
        raise


def _open_gate(platform: Platform, tenant_id: str) -> dict[str, Any]:
    """Resume the gate if a revocation closed it (a migration run that paused it resumes it
    itself, when it is resumed)."""
    gate = platform.state.gate(tenant_id)
    if gate.state is not GateState.PAUSED:
        return {"opened": gate.state is not GateState.PAUSED, "note": f"gate was {gate.state.value}"}
    holder = platform.state.get_run(gate.paused_by_run) if gate.paused_by_run else None
    if holder is not None and holder.flow is not Flow.REVOKE:
        return {
            "opened": False,
            "note": f"paused by {holder.flow.value} run {holder.run_id}: it reopens the gate when resumed "
            f"(`archive-kms runs resume {holder.run_id}`)",
        }
    platform.state.resume(tenant_id, gate.paused_by_run or "")
    return {"opened": True, "note": f"the gate closed by revocation run {gate.paused_by_run} is open again"}


def _restore_probe(platform: Platform, tenant_id: str, scope: RevocationScope) -> list[dict[str, Any]]:
    fresh = platform.probe_view()
    archive = fresh.open_archive(tenant_id)
    inside, _ = _samples(platform, tenant_id, scope)
    out = []
    reads = _Probe("reads", "a process that starts now reading a record the revocation covered")
    if inside is not None:
        _succeeds(reads, lambda: _read(archive, inside.name))
    else:
        reads.note = "no record to probe"
    search = _succeeds(_Probe("search", "a process that starts now searching"), lambda: archive.search(Query(limit=1)))
    for p in (reads, search):
        d = p.to_dict(None)
        d["serving"] = p.served > 0
        out.append(d)
    return out


# --- dry runs -----------------------------------------------------------------------------------


def _describe_revoke(platform: Platform, tenant_id: str) -> list[str]:
    check_revoke(platform, tenant_id, RevocationScope())
    t = platform.state.get_tenant(tenant_id)
    keyed = t is not None and t.key_mode is not KeyMode.MANAGED  # check_revoke refused unknown tenants
    index = "keyed index" if keyed else "plaintext index"
    return [
        "commit the revocation to the tenant's signed keychain head (every process refuses within "
        f"{platform.keychain.revocation_check_seconds:g} s; caches purged)",
        f"refuse reads, archive writes and searches of the {index}",
        "close the archive gate: new archive jobs are deferred durably, replayed by restore",
        "stop the tenant's running migration run at its next object boundary (resumable after restore)",
        "probe every component and write the revocation receipt (audit log and run)",
    ]


def _describe_restore(platform: Platform, tenant_id: str) -> list[str]:
    what = check_restore(platform, tenant_id, RevocationScope())
    return [
        "unwrap the tenant key at its master key's provider (refused while the key is unusable)",
        f"lift {what}",
        "reopen the archive gate the revocation closed and replay the jobs deferred meanwhile, once each",
        "probe that reads and searches work again",
    ]


register_dry_run("revoke", _describe_revoke)
register_dry_run("restore", _describe_restore)


def revocation_preview(
    platform: Platform, tenant_id: str, scope: RevocationScope, action: str = "revoke"
) -> BlastRadius:
    """The blast radius of revoking (or restoring) ``scope``: for the whole tenant, the
    registered dry run; for a scope, the objects it covers (a time range reads each
    object's header to learn its DEK: one small read per object), their index documents
    (one per record), and the jobs and runs of the tenant. Changes nothing."""
    if action not in ("revoke", "restore"):
        raise ValidationError(f"action {action!r}: revoke or restore")
    if scope.whole:
        return blast_radius(platform, tenant_id, action)
    if action == "revoke":
        check_revoke(platform, tenant_id, scope)
        verb = "refuse"
    else:
        check_restore(platform, tenant_id, scope)
        verb = "make readable again"
    from archive_kms.crypto.envelope import read_header

    t = platform.state.get_tenant(tenant_id)
    assert t is not None
    location = platform.location_of(tenant_id)
    store = platform.store_for(location)
    objects = size = records = 0
    for info in store.list():
        ws = workspace_of(info.name)
        if scope.workspace_id is not None and ws != scope.workspace_id:
            continue
        if scope.before is not None:
            try:
                with store.open_read(info.name) as reader:
                    dek_id = read_header(reader).dek_id
            except ArchiveKmsError:
                continue
            if not platform.keychain.scope_covers(tenant_id, scope.workspace_id, scope.before, dek_id):
                continue
        objects += 1
        size += info.size
        records += info.name.startswith(RECORD_PREFIX)
    gate = platform.state.gate(tenant_id)
    active = platform.state.find_active_run(tenant_id)
    return BlastRadius(
        tenant=tenant_id,
        action=action,
        location=location.uri,
        key_mode=t.key_mode.value,
        key_ref=t.key_ref,
        objects=objects,
        bytes=size,
        index=platform.index.current_index(tenant_id),
        index_documents=records,
        queued_jobs=gate.pending,
        running_jobs=len(platform.state.running_jobs(tenant_id)),
        running_runs=[active.run_id] if active is not None else [],
        would=[
            f"{verb} {objects} object(s) ({records} record(s), their search hits withheld) under {scope.describe()}",
            "leave the rest of the tenant readable; archive jobs keep running (writes into a revoked workspace are refused)",
            "record the change in the signed keychain head and the audit log"
            + ("; probe and write a receipt" if action == "revoke" else "; after a verified unwrap at the provider"),
        ],
    )
