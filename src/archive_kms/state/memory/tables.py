"""The in-memory state store's tables: every aggregate's rows in plain dicts under one
re-entrant lock (every method holds it: each call is atomic), the clock, and the checks
shared by the repositories (fencing, a tenant's gate, a run). Nothing survives the process."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms.errors import FencedError, StateError, ValidationError
from archive_kms.state import audit as chain
from archive_kms.state._common import check_token
from archive_kms.state.port import (
    DEFAULT_JOB_LEASE_TTL,
    ArchiveJob,
    AuditRecord,
    CopyRecord,
    DeferredJob,
    Fence,
    GateState,
    GracePolicyRecord,
    KeyRotation,
    KeyVersionMark,
    ManifestEntry,
    MigrationRun,
    ObservedKey,
    RetentionPolicy,
    StepRecord,
    StoredWarning,
    TenantRecord,
)

__all__ = ["DEFAULT_JOB_STALE_AFTER", "MemoryTables"]

DEFAULT_JOB_STALE_AFTER = DEFAULT_JOB_LEASE_TTL  # the older name of the job lease TTL (ADR 0020)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Gate:
    state: GateState
    paused_by_run: str | None
    since: datetime
    next_position: int = 0


@dataclass
class _LeaseRow:
    run_id: str
    token: int
    acquired_at: datetime
    expires_at: datetime
    released_at: datetime | None = None


@dataclass
class _Manifest:
    tenant_id: str
    source: dict[str, Any]
    created_at: datetime


class MemoryTables:
    """The rows of every aggregate; the repositories in this package subclass it."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = None,
        sealer: chain.HeadSealer | None = None,
        job_stale_after: timedelta = DEFAULT_JOB_STALE_AFTER,
    ) -> None:
        self._now = clock or _utcnow
        self._sealer = sealer
        if job_stale_after <= timedelta(0):
            raise ValidationError("the job lease TTL must be positive")
        self._job_stale_after = job_stale_after  # the job lease TTL (ADR 0020)
        self._lock = threading.RLock()
        self._job_leases: dict[str, datetime] = {}  # job id -> until when its attempt's writer holds it
        self._job_writes: dict[str, set[bytes]] = {}  # job id -> names its attempts may create
        self._tenants: dict[str, TenantRecord] = {}
        self._gates: dict[str, _Gate] = {}
        self._deferred: dict[str, DeferredJob] = {}
        self._jobs: dict[str, ArchiveJob] = {}
        self._runs: dict[str, MigrationRun] = {}
        self._checkpoints: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._manifests: dict[str, _Manifest] = {}
        self._entries: dict[str, dict[bytes, ManifestEntry]] = {}
        self._copies: dict[str, dict[bytes, CopyRecord]] = {}
        self._leases: dict[str, _LeaseRow] = {}
        self._audit: list[AuditRecord] = []
        self._search_generations: dict[tuple[str, int], bytes] = {}  # signed JSON, as SQL keeps it
        self._retention: dict[str, RetentionPolicy] = {}
        self._key_versions: dict[str, KeyVersionMark] = {}
        self._rotations: dict[str, KeyRotation] = {}
        self._warnings: dict[str, StoredWarning] = {}
        self._observations: dict[str, ObservedKey] = {}
        self._grace: dict[str, GracePolicyRecord] = {}
        self._heads: dict[str, chain.ChainHead] = {
            chain.GLOBAL_CHAIN: chain.ChainHead(chain.GLOBAL_CHAIN, 0, chain.GENESIS)
        }

    # --- helpers -------------------------------------------------------------------------

    def _fenced(self, fence: Fence | None, tenant_id: str) -> None:
        if fence is None:
            return
        if fence.tenant_id != tenant_id:
            raise FencedError(
                f"fence of tenant {fence.tenant_id!r} used for a write to tenant {tenant_id!r}",
                resource=f"lease:{tenant_id}",
            )
        check_token(self._leases.get(tenant_id), tenant_id, fence.token)

    def _gate(self, tenant_id: str) -> _Gate:
        gate = self._gates.get(tenant_id)
        if gate is None:
            raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
        return gate

    def _run(self, run_id: str) -> MigrationRun:
        run = self._runs.get(run_id)
        if run is None:
            raise StateError(f"no run {run_id!r}", resource=f"run:{run_id}")
        return run


# Records hold dicts; hand out copies so callers cannot change what the store holds.


def _copy_tenant(t: TenantRecord) -> TenantRecord:
    return replace(t, location=copy.deepcopy(dict(t.location)))


def _copy_job(j: DeferredJob) -> DeferredJob:
    return replace(j, payload=copy.deepcopy(dict(j.payload)))


def _copy_step(s: StepRecord) -> StepRecord:
    return replace(s, result=None if s.result is None else copy.deepcopy(dict(s.result)))


def _copy_run(r: MigrationRun) -> MigrationRun:
    return replace(r, params=copy.deepcopy(dict(r.params)), steps=tuple(_copy_step(s) for s in r.steps))


def _copy_audit(r: AuditRecord) -> AuditRecord:
    return replace(r, details=copy.deepcopy(dict(r.details)))
