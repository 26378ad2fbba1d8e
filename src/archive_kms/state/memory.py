"""The StateStore in process memory: a real implementation of the same contract as
``state.sql`` (the contract suite runs on both), for fast tests of the layers above.
One lock makes every method atomic; nothing survives the process.

``_audit`` and ``_heads`` are the raw audit rows; tests edit them to play an attacker.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms.domain.tenants import TenantId
from archive_kms.errors import (
    ConfigurationError,
    FencedError,
    LeaseHeldError,
    StateError,
    ValidationError,
    VersionConflictError,
)
from archive_kms.state import audit as chain
from archive_kms.state._common import (
    RUN_MOVES,
    check_entry,
    check_id,
    check_steps,
    check_token,
    job_payload,
    json_object,
    member,
    step_transition,
)
from archive_kms.state.port import (
    PARKED_MEMBER,
    Admission,
    ArchiveJob,
    AuditEvent,
    AuditRecord,
    AuditVerification,
    CopyRecord,
    CopyStatus,
    Decision,
    DeferredJob,
    DeferredState,
    Fence,
    Flow,
    GateState,
    GateStatus,
    JobState,
    KeyMode,
    Lease,
    ManifestEntry,
    ManifestSummary,
    MigrationRun,
    RunState,
    StepRecord,
    StepState,
    TenantRecord,
    check_parkable,
    parking_record,
    submitted_payload,
)
from archive_kms.state.schema import JOB_ID, RUN_ID

__all__ = ["InMemoryStateStore"]

DEFAULT_JOB_STALE_AFTER = timedelta(minutes=15)


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


class InMemoryStateStore:
    """``StateStore`` in memory (thread-safe)."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = None,
        sealer: chain.HeadSealer | None = None,
        job_stale_after: timedelta = DEFAULT_JOB_STALE_AFTER,
    ) -> None:
        self._now = clock or _utcnow
        self._sealer = sealer
        self._job_stale_after = job_stale_after
        self._lock = threading.RLock()
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
        self._heads: dict[str, chain.ChainHead] = {
            chain.GLOBAL_CHAIN: chain.ChainHead(chain.GLOBAL_CHAIN, 0, chain.GENESIS)
        }

    def __repr__(self) -> str:
        return f"InMemoryStateStore({len(self._tenants)} tenants)"

    def close(self) -> None:
        return None

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

    # --- tenants -------------------------------------------------------------------------

    def create_tenant(self, tenant: TenantRecord) -> TenantRecord:
        TenantId(tenant.tenant_id)
        key_mode = member(KeyMode, tenant.key_mode, "key mode")
        with self._lock:
            if tenant.tenant_id in self._tenants:
                raise StateError(f"tenant {tenant.tenant_id!r} already exists", resource=f"tenant:{tenant.tenant_id}")
            now = self._now()
            rec = replace(
                tenant,
                key_mode=key_mode,
                location=json_object(tenant.location, "tenant location"),
                revoked=bool(tenant.revoked),
                version=1,
                created_at=now,
                updated_at=now,
            )
            self._tenants[tenant.tenant_id] = rec
            self._gates[tenant.tenant_id] = _Gate(GateState.OPEN, None, now)
            return _copy_tenant(rec)

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._lock:
            t = self._tenants.get(tenant_id)
            return None if t is None else _copy_tenant(t)

    def list_tenants(self) -> list[TenantRecord]:
        with self._lock:
            return [_copy_tenant(self._tenants[k]) for k in sorted(self._tenants)]

    def update_tenant(self, tenant: TenantRecord, *, fence: Fence | None = None) -> TenantRecord:
        key_mode = member(KeyMode, tenant.key_mode, "key mode")
        tid = tenant.tenant_id
        with self._lock:
            self._fenced(fence, tid)
            current = self._tenants.get(tid)
            if current is None:
                raise StateError(f"no tenant {tid!r}", resource=f"tenant:{tid}")
            if current.version != tenant.version:
                raise VersionConflictError(
                    f"tenant {tid!r} is at version {current.version}; this update was based on version "
                    f"{tenant.version}: re-read and retry",
                    resource=f"tenant:{tid}",
                )
            rec = replace(
                tenant,
                key_mode=key_mode,
                location=json_object(tenant.location, "tenant location"),
                revoked=bool(tenant.revoked),
                version=current.version + 1,
                created_at=current.created_at,
                updated_at=self._now(),
            )
            self._tenants[tid] = rec
            return _copy_tenant(rec)

    # --- gate ----------------------------------------------------------------------------

    def _pending(self, tenant_id: str) -> int:
        return sum(
            1 for j in self._deferred.values() if j.tenant_id == tenant_id and j.state is not DeferredState.REPLAYED
        )

    def _status(self, tenant_id: str) -> GateStatus:
        g = self._gate(tenant_id)
        return GateStatus(tenant_id, g.state, g.paused_by_run, g.since, self._pending(tenant_id))

    def _set_gate(self, tenant_id: str, state: GateState, run_id: str | None) -> None:
        g = self._gate(tenant_id)
        g.state, g.paused_by_run, g.since = state, run_id, self._now()

    def _open_if_drained(self, tenant_id: str) -> None:
        if self._gate(tenant_id).state is GateState.DRAINING and self._pending(tenant_id) == 0:
            self._set_gate(tenant_id, GateState.OPEN, None)

    def gate(self, tenant_id: str) -> GateStatus:
        with self._lock:
            return self._status(tenant_id)

    def pause(self, tenant_id: str, run_id: str, *, fence: Fence | None = None) -> GateStatus:
        check_id("run id", run_id, RUN_ID)
        with self._lock:
            self._fenced(fence, tenant_id)
            g = self._gate(tenant_id)
            if g.state is GateState.PAUSED:
                if g.paused_by_run != run_id:
                    raise StateError(
                        f"archive jobs of tenant {tenant_id!r} are already paused by run {g.paused_by_run!r}",
                        resource=f"gate:{tenant_id}",
                    )
            else:
                self._set_gate(tenant_id, GateState.PAUSED, run_id)
            return self._status(tenant_id)

    def _resume(self, tenant_id: str, run_id: str, fence: Fence | None) -> None:
        self._fenced(fence, tenant_id)
        g = self._gate(tenant_id)
        if g.state is not GateState.PAUSED:
            return
        if g.paused_by_run != run_id:
            raise StateError(
                f"archive jobs of tenant {tenant_id!r} were paused by run {g.paused_by_run!r}, not {run_id!r}",
                resource=f"gate:{tenant_id}",
            )
        self._set_gate(tenant_id, GateState.DRAINING, run_id)
        self._open_if_drained(tenant_id)

    def resume(self, tenant_id: str, run_id: str, *, fence: Fence | None = None) -> GateStatus:
        with self._lock:
            self._resume(tenant_id, run_id, fence)
            return self._status(tenant_id)

    def _queue(self, tenant_id: str, job_id: str, payload: dict[str, Any], sealed: bytes | None) -> None:
        g = self._gate(tenant_id)
        g.next_position += 1
        self._deferred[job_id] = DeferredJob(
            job_id, tenant_id, payload, self._now(), DeferredState.DEFERRED, g.next_position, sealed=sealed
        )

    def _known_deferred(self, tenant_id: str, job_id: str, payload: dict[str, Any]) -> DeferredJob | None:
        job = self._deferred.get(job_id)
        if job is not None and (job.tenant_id != tenant_id or submitted_payload(job.payload) != payload):
            raise StateError(
                f"job id {job_id!r} was already used for another tenant or payload", resource=f"job:{job_id}"
            )
        return job

    def _mark_replayed(self, job_id: str) -> bool:
        job = self._deferred.get(job_id)
        if job is None or job.state is DeferredState.REPLAYED:
            return False
        # The sealed content goes with the replay; the clear payload stays for resent ids.
        self._deferred[job_id] = replace(job, state=DeferredState.REPLAYED, replayed_at=self._now(), sealed=None)
        return True

    def _try_start(self, tenant_id: str, job_id: str) -> Admission:
        now = self._now()
        job = self._jobs.get(job_id)
        if job is None:
            self._jobs[job_id] = ArchiveJob(job_id, tenant_id, JobState.RUNNING, 1, now)
            return Admission(job_id, Decision.RUN, 1)
        if job.tenant_id != tenant_id:
            raise StateError(f"job id {job_id!r} belongs to another tenant", resource=f"job:{job_id}")
        if job.state is JobState.COMPLETED:
            self._mark_replayed(job_id)
            return Admission(job_id, Decision.DUPLICATE, job.attempt)
        if job.state is JobState.RUNNING and job.started_at > now - self._job_stale_after:
            return Admission(job_id, Decision.DUPLICATE, job.attempt)
        attempt = job.attempt + 1
        self._jobs[job_id] = ArchiveJob(job_id, tenant_id, JobState.RUNNING, attempt, now)
        return Admission(job_id, Decision.RUN, attempt)

    def _job_is_settled(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None:
            return False
        return job.state is JobState.COMPLETED or (
            job.state is JobState.RUNNING and job.started_at > self._now() - self._job_stale_after
        )

    def admit_job(
        self, tenant_id: str, job_id: str, payload: Mapping[str, Any], *, sealed: bytes | None = None
    ) -> Admission:
        check_id("job id", job_id, JOB_ID)
        body, sealed = job_payload(payload, sealed)
        with self._lock:
            g = self._gate(tenant_id)
            if self._known_deferred(tenant_id, job_id, body) is not None:
                return Admission(job_id, Decision.DUPLICATE)
            if self._job_is_settled(job_id):
                return self._try_start(tenant_id, job_id)
            if g.state is not GateState.OPEN:
                self._queue(tenant_id, job_id, body, sealed)
                return Admission(job_id, Decision.DEFERRED)
            return self._try_start(tenant_id, job_id)

    def defer(self, job: DeferredJob) -> bool:
        check_id("job id", job.job_id, JOB_ID)
        body, sealed = job_payload(job.payload, job.sealed)
        with self._lock:
            self._gate(job.tenant_id)
            if self._known_deferred(job.tenant_id, job.job_id, body) is not None:
                return False
            self._queue(job.tenant_id, job.job_id, body, sealed)
            return True

    def _claim(self, tenant_id: str, limit: int, reclaim_after: timedelta) -> list[DeferredJob]:
        now = self._now()
        ready = sorted(
            (
                j
                for j in self._deferred.values()
                if j.tenant_id == tenant_id
                and (
                    j.state is DeferredState.DEFERRED
                    or (
                        j.state is DeferredState.CLAIMED
                        and j.claimed_at is not None
                        and j.claimed_at <= now - reclaim_after
                    )
                )
            ),
            key=lambda j: j.position,
        )[:limit]
        out = []
        for j in ready:
            claimed = replace(j, state=DeferredState.CLAIMED, claimed_at=now)
            self._deferred[j.job_id] = claimed
            out.append(_copy_job(claimed))
        return out

    def claim_deferred(
        self, tenant_id: str, limit: int = 100, *, reclaim_after: timedelta = timedelta(minutes=5)
    ) -> list[DeferredJob]:
        if limit < 1:
            raise ValidationError("claim limit must be at least 1")
        with self._lock:
            if self._gate(tenant_id).state is GateState.PAUSED:
                return []
            jobs = self._claim(tenant_id, limit, reclaim_after)
            if not jobs:
                self._open_if_drained(tenant_id)
            return jobs

    def resume_and_drain(
        self, tenant_id: str, run_id: str, *, limit: int = 1000, fence: Fence | None = None
    ) -> list[DeferredJob]:
        with self._lock:
            self._resume(tenant_id, run_id, fence)
            jobs = self._claim(tenant_id, limit, timedelta(minutes=5))
            if not jobs:
                self._open_if_drained(tenant_id)
            return jobs

    def mark_replayed(self, job_id: str) -> None:
        with self._lock:
            job = self._deferred.get(job_id)
            if job is None:
                raise StateError(f"no deferred job {job_id!r}", resource=f"job:{job_id}")
            if self._mark_replayed(job_id):
                self._open_if_drained(job.tenant_id)

    def park_deferred(self, tenant_id: str, job_id: str, *, reason: str, actor: str) -> DeferredJob:
        now = self._now()
        parking = parking_record(reason, actor, now)
        with self._lock:
            self._gate(tenant_id)
            job = check_parkable(tenant_id, job_id, self._deferred.get(job_id))
            # Replayed without running; the seal stays for forensics (mark_replayed purges it).
            parked = replace(
                job, state=DeferredState.REPLAYED, replayed_at=now, payload={**job.payload, PARKED_MEMBER: parking}
            )
            self._deferred[job_id] = parked
            self._open_if_drained(tenant_id)
            return _copy_job(parked)

    def start_job(self, tenant_id: str, job_id: str) -> Admission:
        check_id("job id", job_id, JOB_ID)
        with self._lock:
            g = self._gate(tenant_id)
            if g.state is GateState.PAUSED:
                raise StateError(
                    f"archive jobs of tenant {tenant_id!r} are paused by run {g.paused_by_run!r}: "
                    "stop replaying; the job stays queued",
                    resource=f"gate:{tenant_id}",
                )
            return self._try_start(tenant_id, job_id)

    def finish_job(
        self, job_id: str, attempt: int, *, object_count: int | None = None, error: str | None = None
    ) -> ArchiveJob:
        state = JobState.FAILED if error is not None else JobState.COMPLETED
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise StateError(f"no archive job {job_id!r}", resource=f"job:{job_id}")
            if job.attempt == attempt and job.state is state:
                return job
            if job.attempt != attempt or job.state is not JobState.RUNNING:
                raise FencedError(
                    f"archive job {job_id!r} attempt {attempt} is no longer current "
                    f"(attempt {job.attempt} is {job.state.value})",
                    resource=f"job:{job_id}",
                )
            job = replace(job, state=state, finished_at=self._now(), object_count=object_count, error=error)
            self._jobs[job_id] = job
            if state is JobState.COMPLETED and self._mark_replayed(job_id):
                self._open_if_drained(job.tenant_id)
            return job

    def get_job(self, job_id: str) -> ArchiveJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def running_jobs(self, tenant_id: str) -> list[ArchiveJob]:
        with self._lock:
            return sorted(
                (j for j in self._jobs.values() if j.tenant_id == tenant_id and j.state is JobState.RUNNING),
                key=lambda j: (j.started_at, j.job_id),
            )

    def list_deferred(self, tenant_id: str, *, include_replayed: bool = False) -> list[DeferredJob]:
        with self._lock:
            return [
                _copy_job(j)
                for j in sorted(self._deferred.values(), key=lambda j: j.position)
                if j.tenant_id == tenant_id and (include_replayed or j.state is not DeferredState.REPLAYED)
            ]

    # --- runs ----------------------------------------------------------------------------

    def _running_run(self, tenant_id: str) -> MigrationRun | None:
        return next((r for r in self._runs.values() if r.tenant_id == tenant_id and r.state is RunState.RUNNING), None)

    def start_run(
        self,
        tenant_id: str,
        flow: Flow,
        *,
        mode: str,
        steps: Sequence[str],
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> tuple[MigrationRun, bool]:
        flow = member(Flow, flow, "flow")
        run_id = run_id or uuid.uuid4().hex
        check_id("run id", run_id, RUN_ID)
        check_id("mode", mode, 32)
        check_steps(steps)
        body = json_object(params or {}, "run params")
        with self._lock:
            if tenant_id not in self._tenants:
                raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
            existing = self._runs.get(run_id)
            if existing is not None:
                if existing.tenant_id != tenant_id or existing.flow is not flow:
                    raise StateError(f"run id {run_id!r} is already used by another run", resource=f"run:{run_id}")
                return _copy_run(existing), False
            active = self._running_run(tenant_id)
            if active is not None:
                return _copy_run(active), False
            now = self._now()
            run = MigrationRun(
                run_id,
                tenant_id,
                flow,
                mode,
                RunState.RUNNING,
                body,
                now,
                now,
                tuple(StepRecord(run_id, name, i) for i, name in enumerate(steps)),
            )
            self._runs[run_id] = run
            return _copy_run(run), True

    def find_active_run(self, tenant_id: str) -> MigrationRun | None:
        with self._lock:
            run = self._running_run(tenant_id)
            return None if run is None else _copy_run(run)

    def get_run(self, run_id: str) -> MigrationRun | None:
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else _copy_run(run)

    def list_runs(
        self, tenant_id: str | None = None, *, states: Iterable[RunState] | None = None, limit: int = 100
    ) -> list[MigrationRun]:
        wanted = None if states is None else {member(RunState, s, "run state") for s in states}
        with self._lock:
            found = [
                r
                for r in self._runs.values()
                if (tenant_id is None or r.tenant_id == tenant_id) and (wanted is None or r.state in wanted)
            ]
            found.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
            return [_copy_run(r) for r in found[:limit]]

    def set_run_state(self, run_id: str, state: RunState, *, fence: Fence | None = None) -> MigrationRun:
        state = member(RunState, state, "run state")
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            if run.state is state:
                return _copy_run(run)
            if state not in RUN_MOVES[run.state]:
                raise StateError(
                    f"run {run_id!r} cannot move from {run.state.value} to {state.value}", resource=f"run:{run_id}"
                )
            if state is RunState.RUNNING and self._running_run(run.tenant_id) is not None:
                raise StateError(
                    f"run {run_id!r} cannot resume: its tenant has another running run", resource=f"run:{run_id}"
                )
            run = replace(run, state=state, updated_at=self._now())
            self._runs[run_id] = run
            return _copy_run(run)

    def update_step(
        self,
        run_id: str,
        step: str,
        state: StepState,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        fence: Fence | None = None,
    ) -> StepRecord:
        state = member(StepState, state, "step state")
        body = None if result is None else json_object(result, "step result")
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            if run.state is not RunState.RUNNING:
                raise StateError(
                    f"run {run_id!r} is {run.state.value}; steps change only while it is running",
                    resource=f"run:{run_id}",
                )
            idx = next((i for i, s in enumerate(run.steps) if s.name == step), None)
            if idx is None:
                raise StateError(f"run {run_id!r} has no step {step!r}", resource=f"run:{run_id}")
            cur = run.steps[idx]
            now = self._now()
            values = step_transition(cur.state.value, state, cur.attempt, body, error, now, run_id, step)
            if values is None:
                return _copy_step(cur)
            values["state"] = StepState(values["state"])
            new = replace(cur, **values)
            self._runs[run_id] = replace(run, steps=run.steps[:idx] + (new,) + run.steps[idx + 1 :], updated_at=now)
            return _copy_step(new)

    def reset_steps(self, run_id: str, from_step: str, *, fence: Fence | None = None) -> MigrationRun:
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            start = next((s.ordinal for s in run.steps if s.name == from_step), None)
            if start is None:
                raise StateError(f"run {run_id!r} has no step {from_step!r}", resource=f"run:{run_id}")
            reset = {s.name for s in run.steps if s.ordinal >= start}
            for key in [k for k in self._checkpoints if k[0] == run_id and k[1] in reset]:
                del self._checkpoints[key]
            steps = tuple(
                replace(s, state=StepState.PENDING, started_at=None, finished_at=None, result=None, error=None)
                if s.name in reset
                else s
                for s in run.steps
            )
            run = replace(run, steps=steps, updated_at=self._now())
            self._runs[run_id] = run
            return _copy_run(run)

    def save_checkpoint(
        self, run_id: str, step: str, shard: int, cursor: Mapping[str, Any], *, fence: Fence | None = None
    ) -> None:
        body = json_object(cursor, "checkpoint cursor")
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            if not any(s.name == step for s in run.steps):
                raise StateError(f"run {run_id!r} has no step {step!r}", resource=f"run:{run_id}")
            self._checkpoints[(run_id, step, shard)] = body

    def load_checkpoints(self, run_id: str, step: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {k[2]: copy.deepcopy(v) for k, v in self._checkpoints.items() if k[0] == run_id and k[1] == step}

    # --- manifests and copy ledger -------------------------------------------------------

    def create_manifest(self, run_id: str, source: Mapping[str, Any], *, fence: Fence | None = None) -> None:
        source = json_object(source, "manifest source")
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            existing = self._manifests.get(run_id)
            if existing is not None:
                if existing.source != source:
                    raise StateError(
                        f"run {run_id!r} already has a manifest of another source", resource=f"run:{run_id}"
                    )
                return
            self._manifests[run_id] = _Manifest(run.tenant_id, source, self._now())
            self._entries[run_id] = {}
            self._copies[run_id] = {}

    def add_manifest_entries(self, run_id: str, entries: Iterable[ManifestEntry], *, fence: Fence | None = None) -> int:
        batch: dict[bytes, ManifestEntry] = {}
        for e in entries:
            check_entry(e)
            e = replace(e, name=bytes(e.name))
            prior = batch.get(e.name)
            if prior is not None and prior != e:
                raise StateError(
                    f"manifest of run {run_id!r} lists object {e.name!r} twice with different attributes",
                    resource=f"run:{run_id}",
                )
            batch[e.name] = e
        with self._lock:
            m = self._manifests.get(run_id)
            if m is None:
                raise StateError(f"run {run_id!r} has no manifest (create_manifest first)", resource=f"run:{run_id}")
            self._fenced(fence, m.tenant_id)
            existing = self._entries[run_id]
            for name, e in batch.items():
                if name in existing and existing[name] != e:
                    raise StateError(
                        f"object {name!r} is already in the manifest of run {run_id!r} with other "
                        "attributes (size/etag/shard/digest)",
                        resource=f"run:{run_id}",
                    )
            new = [e for n, e in batch.items() if n not in existing]
            for e in new:
                existing[e.name] = e
            return len(new)

    def manifest_summary(self, run_id: str) -> ManifestSummary | None:
        with self._lock:
            m = self._manifests.get(run_id)
            if m is None:
                return None
            entries = self._entries[run_id].values()
            return ManifestSummary(
                run_id,
                m.tenant_id,
                copy.deepcopy(m.source),
                m.created_at,
                len(entries),
                sum(e.size for e in entries),
                len({e.shard for e in entries}),
            )

    def _paged(self, snapshot: Callable[[], list[Any]], page_size: int) -> Iterator[Any]:
        # Same observable behaviour as the SQL keyset pages: sorted by name, read lazily.
        last: bytes | None = None
        while True:
            with self._lock:
                page = [x for x in snapshot() if last is None or x.name > last][:page_size]
            yield from page
            if len(page) < page_size:
                return
            last = page[-1].name

    def iter_manifest(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        def snap() -> list[ManifestEntry]:
            return sorted(
                (e for e in self._entries.get(run_id, {}).values() if shard is None or e.shard == shard),
                key=lambda e: e.name,
            )

        return self._paged(snap, page_size)

    def record_copy(self, run_id: str, record: CopyRecord, *, fence: Fence | None = None) -> None:
        self.record_copies(run_id, [record], fence=fence)

    def record_copies(self, run_id: str, records: Sequence[CopyRecord], *, fence: Fence | None = None) -> None:
        if not records:
            return
        rows = [replace(r, name=bytes(r.name), status=member(CopyStatus, r.status, "copy status")) for r in records]
        with self._lock:
            run = self._run(run_id)
            self._fenced(fence, run.tenant_id)
            entries = self._entries.get(run_id, {})
            missing = [r.name for r in rows if r.name not in entries]
            if missing:
                raise StateError(
                    f"object(s) {', '.join(repr(n[:80]) for n in missing[:3])} not all in the manifest "
                    f"of run {run_id!r}; nothing recorded",
                    resource=f"run:{run_id}",
                )
            now = self._now()
            for r in rows:
                self._copies[run_id][r.name] = replace(r, updated_at=now)

    def get_copy(self, run_id: str, name: bytes) -> CopyRecord | None:
        with self._lock:
            return self._copies.get(run_id, {}).get(bytes(name))

    def iter_copies(
        self, run_id: str, *, status: CopyStatus | None = None, shard: int | None = None, page_size: int = 1000
    ) -> Iterator[CopyRecord]:
        def snap() -> list[CopyRecord]:
            with self._lock:
                entries = self._entries.get(run_id, {})
                return sorted(
                    (
                        c
                        for c in self._copies.get(run_id, {}).values()
                        if (status is None or c.status is status) and (shard is None or entries[c.name].shard == shard)
                    ),
                    key=lambda c: c.name,
                )

        return self._paged(snap, page_size)

    def copy_counts(self, run_id: str) -> dict[CopyStatus, int]:
        with self._lock:
            counts: dict[CopyStatus, int] = {}
            for c in self._copies.get(run_id, {}).values():
                counts[c.status] = counts.get(c.status, 0) + 1
            return counts

    def iter_uncopied(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        done = {CopyStatus.COPIED, CopyStatus.VERIFIED}

        def snap() -> list[ManifestEntry]:
            copies = self._copies.get(run_id, {})
            return sorted(
                (
                    e
                    for e in self._entries.get(run_id, {}).values()
                    if (shard is None or e.shard == shard)
                    and (e.name not in copies or copies[e.name].status not in done)
                ),
                key=lambda e: e.name,
            )

        return self._paged(snap, page_size)

    # --- leases --------------------------------------------------------------------------

    def acquire_lease(self, tenant_id: str, run_id: str, ttl: timedelta) -> Lease:
        check_id("run id", run_id, RUN_ID)
        if ttl <= timedelta(0):
            raise ValidationError("lease ttl must be positive")
        with self._lock:
            if tenant_id not in self._tenants:
                raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
            now = self._now()
            row = self._leases.get(tenant_id)
            if row is None:
                row = self._leases[tenant_id] = _LeaseRow(run_id, 1, now, now + ttl)
            elif row.expires_at <= now or row.released_at is not None or row.run_id == run_id:
                row = self._leases[tenant_id] = _LeaseRow(run_id, row.token + 1, now, now + ttl)
            else:
                raise LeaseHeldError(
                    f"tenant {tenant_id!r} is held by run {row.run_id!r} until {row.expires_at.isoformat()}",
                    resource=f"lease:{tenant_id}",
                )
            return Lease(tenant_id, row.run_id, row.token, row.acquired_at, row.expires_at)

    def renew_lease(self, lease: Lease, ttl: timedelta) -> Lease:
        if ttl <= timedelta(0):
            raise ValidationError("lease ttl must be positive")
        with self._lock:
            row = self._leases.get(lease.tenant_id)
            check_token(row, lease.tenant_id, lease.token)
            assert row is not None
            row.expires_at = self._now() + ttl
            return Lease(lease.tenant_id, row.run_id, row.token, row.acquired_at, row.expires_at)

    def release_lease(self, lease: Lease) -> bool:
        with self._lock:
            row = self._leases.get(lease.tenant_id)
            if row is None or row.token != lease.token or row.released_at is not None:
                return False
            row.released_at = self._now()
            return True

    def get_lease(self, tenant_id: str) -> Lease | None:
        with self._lock:
            row = self._leases.get(tenant_id)
            if row is None or row.released_at is not None:
                return None
            return Lease(tenant_id, row.run_id, row.token, row.acquired_at, row.expires_at)

    def check_fence(self, tenant_id: str, token: int) -> None:
        with self._lock:
            check_token(self._leases.get(tenant_id), tenant_id, token)

    # --- audit ---------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        check_id("audit actor", event.actor, 255)
        check_id("audit action", event.action, 128)
        if event.tenant_id is not None:
            check_id("tenant id", event.tenant_id, 128)
        if event.run_id is not None:
            check_id("run id", event.run_id, RUN_ID)
        details = json.loads(chain.canonical_json(dict(event.details)))
        with self._lock:
            head = self._heads.get(chain.GLOBAL_CHAIN)
            if head is None:
                raise StateError(
                    "the audit chain head is missing: run `archive-kms audit verify`", resource="audit:global"
                )
            t_name = None if event.tenant_id is None else chain.tenant_chain(event.tenant_id)
            t_head = None if t_name is None else self._heads.get(t_name)
            fields: dict[str, Any] = {
                "seq": head.count + 1,
                "ts": self._now(),
                "actor": event.actor,
                "action": event.action,
                "tenant_id": event.tenant_id,
                "run_id": event.run_id,
                "details": details,
                "prev_hash": head.head_hash,
                "tenant_seq": None if t_name is None else (t_head.count + 1 if t_head else 1),
                "tenant_prev_hash": None if t_name is None else (t_head.head_hash if t_head else chain.GENESIS),
            }
            rec = AuditRecord(**fields, hash=chain.record_hash(**fields))
            self._audit.append(rec)
            self._heads[chain.GLOBAL_CHAIN] = chain.seal_head(self._sealer, chain.GLOBAL_CHAIN, rec.seq, rec.hash)
            if t_name is not None:
                self._heads[t_name] = chain.seal_head(self._sealer, t_name, fields["tenant_seq"], rec.hash)
            return _copy_audit(rec)

    def iter_audit(
        self, *, tenant_id: str | None = None, after_seq: int = 0, page_size: int = 1000
    ) -> Iterator[AuditRecord]:
        with self._lock:
            recs = sorted(
                (r for r in self._audit if r.seq > after_seq and (tenant_id is None or r.tenant_id == tenant_id)),
                key=lambda r: r.seq,
            )
        return iter([_copy_audit(r) for r in recs])

    def verify_audit(self, *, tenant_id: str | None = None) -> AuditVerification:
        verifier = chain.ChainVerifier(tenant_id=tenant_id)
        with self._lock:
            recs = sorted(
                (r for r in self._audit if tenant_id is None or r.tenant_id == tenant_id), key=lambda r: r.seq
            )
            heads = (
                dict(self._heads)
                if tenant_id is None
                else {k: v for k, v in self._heads.items() if k == chain.tenant_chain(tenant_id)}
            )
        for rec in recs:
            if verifier.feed(rec) is not None:
                break
        return verifier.finish(heads, self._sealer)

    def reseal_audit_heads(self) -> AuditVerification:
        if self._sealer is None:
            raise ConfigurationError("reseal needs a head sealer: open the store with sealer=...")
        verifier = chain.ChainVerifier()
        with self._lock:
            for rec in sorted(self._audit, key=lambda r: r.seq):
                if verifier.feed(rec) is not None:
                    break
            outcome = verifier.finish(dict(self._heads), None)
            if not outcome.ok:
                return outcome
            for name, h in list(self._heads.items()):
                self._heads[name] = chain.seal_head(self._sealer, name, h.count, h.head_hash)
        return replace(outcome, sealed=True)

    def export_audit(self, tenant_id: str | None = None) -> Iterator[dict[str, Any]]:
        name = chain.GLOBAL_CHAIN if tenant_id is None else chain.tenant_chain(tenant_id)
        with self._lock:
            heads = dict(self._heads) if tenant_id is None else {k: v for k, v in self._heads.items() if k == name}
            heads.setdefault(name, chain.ChainHead(name, 0, chain.GENESIS))
            recs = sorted(
                (r for r in self._audit if tenant_id is None or r.tenant_id == tenant_id), key=lambda r: r.seq
            )
        limit = heads[name].count
        for rec in recs:
            position = rec.seq if tenant_id is None else rec.tenant_seq
            if position is not None and position > limit:
                break
            yield chain.record_to_json(_copy_audit(rec))
        for h in sorted(heads, key=lambda c: (c == chain.GLOBAL_CHAIN, c)):  # global last
            yield heads[h].to_json()


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
