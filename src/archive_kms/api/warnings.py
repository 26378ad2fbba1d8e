"""Warnings the console shows: what needs a human, per tenant.

A ``WarningSource`` looks at the tenants in the caller's scope and yields ``ConsoleWarning``s.
Sources are registered with ``register_warning_source``; the console asks every one. The
sources here:

- ``RunWarnings``: a run that failed (``run_failed``, offers resume/cancel), a run that
  stopped with quarantined objects waiting for a waiver (``run_waiting``, offers waive),
  a run marked running whose worker lease has expired (``run_stalled``, offers resume).
- ``KeyStateWarnings``: a tenant whose master key the provider reports unusable
  (``key_unavailable``: disabled, pending deletion, revoked, not found, no access), from the
  preflight's state check (``KeyProvider.status()``; no wrap/unwrap), cached per tenant.
- ``AlarmWarnings``: security alarms (``archive_kms.alarms``: an index behind a tenant's alias
  we never created, an audit log that does not continue its anchors, a keychain audit chain
  that does not verify), from the ``alarm.*`` audit records, the tenant's and the
  platform-wide ones (critical; read incrementally).

The key-lifecycle work adds its own sources (a rotation waiting for confirmation, offering
``confirm_rotation``) with one ``register_warning_source`` call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from archive_kms.errors import ArchiveKmsError, KeyNotFoundError
from archive_kms.migration.engine import waiting_on
from archive_kms.operations.platform import Platform
from archive_kms.state.port import CopyStatus, RunState, StepState, TenantRecord


@dataclass(frozen=True)
class ConsoleWarning:
    id: str  # stable while the condition lasts: "<kind>:<tenant>[:<subject>]"
    kind: str
    severity: str  # critical | warning | info
    tenant: str
    message: str
    run_id: str | None = None
    since: datetime | None = None
    actions: tuple[str, ...] = ()  # what the page may offer (names of console actions)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "severity": self.severity,
            "tenant": self.tenant,
            "message": self.message,
            "run_id": self.run_id,
            "since": self.since.isoformat(timespec="seconds") if self.since else None,
            "actions": list(self.actions),
            "details": self.details,
        }


class WarningSource(Protocol):
    def warnings(self, platform: Platform, tenants: Sequence[TenantRecord]) -> Iterable[ConsoleWarning]:
        """Warnings about ``tenants`` (the caller's scope). Must not raise for one tenant's
        trouble: a source that cannot look says so as a warning."""
        ...


_SOURCES: list[WarningSource] = []


def register_warning_source(source: WarningSource) -> None:
    _SOURCES.append(source)


def warning_sources() -> list[WarningSource]:
    return list(_SOURCES)


def collect(
    platform: Platform, tenants: Sequence[TenantRecord], sources: Iterable[WarningSource]
) -> list[ConsoleWarning]:
    out: list[ConsoleWarning] = []
    seen: set[str] = set()
    for source in sources:
        for w in source.warnings(platform, tenants):
            if w.id not in seen:  # two sources may see one condition: the first says it
                seen.add(w.id)
                out.append(w)
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda w: (order.get(w.severity, 3), w.tenant, w.id))


# --- runs -------------------------------------------------------------------------------------


class RunWarnings:
    """Failed, waiting and stalled runs (the latest run of each tenant)."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock

    def warnings(self, platform: Platform, tenants: Sequence[TenantRecord]) -> Iterable[ConsoleWarning]:
        for t in tenants:
            latest = platform.state.list_runs(t.tenant_id, limit=1)
            if not latest:
                continue
            run = latest[0]
            if run.state is RunState.FAILED:
                yield self._failed(platform, run)
            elif run.state is RunState.RUNNING:
                lease = platform.state.get_lease(t.tenant_id)
                started = any(s.state is not StepState.PENDING for s in run.steps)
                stale = lease is None or lease.run_id != run.run_id or lease.expires_at < self._clock()
                # a run waiting for a human (a rotation's confirmation) holds no lease on purpose
                if started and stale and waiting_on(platform, run) is None:
                    yield ConsoleWarning(
                        id=f"run_stalled:{t.tenant_id}:{run.run_id}",
                        kind="run_stalled",
                        severity="warning",
                        tenant=t.tenant_id,
                        run_id=run.run_id,
                        since=run.updated_at,
                        message=f"{run.flow.value} run {run.run_id} has no live worker (its lease expired)",
                        actions=("resume", "cancel"),
                    )

    @staticmethod
    def _failed(platform: Platform, run: Any) -> ConsoleWarning:
        step = next((s for s in run.steps if s.state is StepState.FAILED), None)
        quarantined = platform.state.copy_counts(run.run_id).get(CopyStatus.QUARANTINED, 0)
        if quarantined:
            return ConsoleWarning(
                id=f"run_waiting:{run.tenant_id}:{run.run_id}",
                kind="run_waiting",
                severity="warning",
                tenant=run.tenant_id,
                run_id=run.run_id,
                since=run.updated_at,
                message=f"{run.flow.value} run {run.run_id} waits before cutover: {quarantined} quarantined "
                "object(s) need a waiver or a rerun",
                actions=("waive", "rerun", "cancel"),
                details={"quarantined": quarantined},
            )
        where = step.name if step else "?"
        return ConsoleWarning(
            id=f"run_failed:{run.tenant_id}:{run.run_id}",
            kind="run_failed",
            severity="critical",
            tenant=run.tenant_id,
            run_id=run.run_id,
            since=run.updated_at,
            message=f"{run.flow.value} run {run.run_id} failed at step {where}",
            actions=("resume", "cancel"),
            details={"step": where, "error": (step.error if step else None)},
        )


# --- key state --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyStateView:
    state: str  # active | revoked | unavailable | unknown
    detail: str | None  # the provider's key state, or why it could not be read
    checked_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail, "checked_at": self.checked_at.isoformat(timespec="seconds")}


class KeyStateProbe:
    """Each tenant's master-key state from its provider (``status()``, the preflight's
    state check), remembered for ``ttl`` seconds so the page can poll."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._seen: dict[str, tuple[float, KeyStateView]] = {}
        self._lock = threading.Lock()

    def state(self, platform: Platform, tenant: TenantRecord) -> KeyStateView:
        now = self._clock()
        with self._lock:
            hit = self._seen.get(tenant.tenant_id)
            if hit is not None and now - hit[0] < self._ttl:
                return hit[1]
        view = self._probe(platform, tenant)
        with self._lock:
            self._seen[tenant.tenant_id] = (now, view)
        return view

    @staticmethod
    def _probe(platform: Platform, tenant: TenantRecord) -> KeyStateView:
        at = datetime.now(UTC)
        if tenant.revoked:
            return KeyStateView("revoked", "tenant revoked", at)
        try:
            status = platform.keychain.status(tenant.tenant_id)
            if status.revoked:
                return KeyStateView("revoked", "keychain revoked", at)
            key = platform.resolve_provider(status.l1_ref).status()
        except KeyNotFoundError:
            return KeyStateView("unknown", "no keychain", at)
        except ArchiveKmsError as exc:
            return KeyStateView("unknown", f"{type(exc).__name__}", at)
        except Exception as exc:  # noqa: BLE001 - one provider's bug must not take the console's listing down
            return KeyStateView("unknown", f"{type(exc).__name__}", at)
        if key.state.usable:
            return KeyStateView("active", key.state.value, at)
        return KeyStateView("unavailable", key.state.value, at)


class KeyStateWarnings:
    def __init__(self, probe: KeyStateProbe) -> None:
        self._probe = probe

    def warnings(self, platform: Platform, tenants: Sequence[TenantRecord]) -> Iterable[ConsoleWarning]:
        for t in tenants:
            view = self._probe.state(platform, t)
            if view.state == "unavailable":
                yield ConsoleWarning(
                    id=f"key_unavailable:{t.tenant_id}",
                    kind="key_unavailable",
                    severity="critical",
                    tenant=t.tenant_id,
                    since=view.checked_at,
                    message=f"the master key of {t.tenant_id} is {view.detail}: reads, searches and runs fail "
                    "until it is usable again",
                    details={"key_state": view.detail, "key_mode": t.key_mode.value},
                )


class AlarmWarnings:
    """The ``alarm.*`` audit records of the tenants in scope and the platform-wide ones
    (global chain, no tenant), the latest of each kind. Each chain is read once, then only
    the records appended since (``after_seq``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str | None, tuple[int, dict[str, Any]]] = {}  # chain -> (after_seq, kind -> record)

    def _alarms(self, platform: Platform, tenant_id: str | None) -> dict[str, Any]:
        from archive_kms.alarms import is_alarm

        with self._lock:
            after, found = self._seen.get(tenant_id, (0, {}))
        found = dict(found)
        for rec in platform.state.iter_audit(tenant_id=tenant_id, after_seq=after):
            after = rec.seq
            if is_alarm(rec.action) and (tenant_id is not None or rec.tenant_id is None):
                found[rec.action] = rec
        with self._lock:
            self._seen[tenant_id] = (after, found)
        return found

    def warnings(self, platform: Platform, tenants: Sequence[TenantRecord]) -> Iterable[ConsoleWarning]:
        scopes: list[str | None] = [None, *(t.tenant_id for t in tenants)]
        for scope in scopes:
            try:
                alarms = self._alarms(platform, scope)
            except ArchiveKmsError as exc:
                yield ConsoleWarning(
                    id=f"alarm_unreadable:{scope or '*'}",
                    kind="alarm_unreadable",
                    severity="critical",
                    tenant=scope or "*",
                    message=f"the audit log could not be read for security alarms: {type(exc).__name__}",
                )
                continue
            for action, rec in sorted(alarms.items()):
                kind = action.removeprefix("alarm.")
                yield ConsoleWarning(
                    id=f"alarm:{kind}:{scope or '*'}",
                    kind=f"alarm_{kind}",
                    severity="critical",
                    tenant=scope or "*",
                    since=rec.ts,
                    message=str(rec.details.get("message", action)),
                    details={"audit_seq": rec.seq},
                )


__all__ = [
    "AlarmWarnings",
    "ConsoleWarning",
    "KeyStateProbe",
    "KeyStateView",
    "KeyStateWarnings",
    "RunWarnings",
    "WarningSource",
    "collect",
    "register_warning_source",
    "warning_sources",
]
