"""The archive gate, deferred jobs and the archive-job ledger in memory (``GateRepo``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from archive_kms.errors import FencedError, StateError, ValidationError
from archive_kms.state._common import ROLLBACK_PENDING, awaits_rollback, check_id, job_payload
from archive_kms.state.memory.tables import MemoryTables, _copy_job
from archive_kms.state.port import (
    PARKED_MEMBER,
    Admission,
    ArchiveJob,
    Decision,
    DeferredJob,
    DeferredState,
    Fence,
    GateState,
    GateStatus,
    JobState,
    check_parkable,
    parking_record,
    submitted_payload,
)
from archive_kms.state.schema import JOB_ID, RUN_ID

__all__ = ["MemoryGateRepo"]


class MemoryGateRepo(MemoryTables):
    """``GateRepo`` in memory."""

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
            self._job_leases[job_id] = now + self._job_stale_after
            return Admission(job_id, Decision.RUN, 1)
        if job.tenant_id != tenant_id:
            raise StateError(f"job id {job_id!r} belongs to another tenant", resource=f"job:{job_id}")
        if job.state is JobState.COMPLETED:
            self._mark_replayed(job_id)
            return Admission(job_id, Decision.DUPLICATE, job.attempt)
        if job.state is JobState.RUNNING and self._job_expiry(job) > now:
            return Admission(job_id, Decision.DUPLICATE, job.attempt)
        if awaits_rollback(job.state.value, job.error) and self._job_writes.get(job_id):
            raise StateError(ROLLBACK_PENDING.format(job_id=job_id, tenant_id=tenant_id), resource=f"job:{job_id}")
        attempt = job.attempt + 1  # failed, or running but its lease expired: take over
        self._jobs[job_id] = ArchiveJob(job_id, tenant_id, JobState.RUNNING, attempt, now)
        self._job_leases[job_id] = now + self._job_stale_after
        return Admission(job_id, Decision.RUN, attempt)

    def _job_expiry(self, job: ArchiveJob) -> datetime:
        return self._job_leases.get(job.job_id) or job.started_at + self._job_stale_after

    def _with_lease(self, job: ArchiveJob) -> ArchiveJob:
        if job.state is JobState.RUNNING:
            return replace(job, lease_expires_at=self._job_expiry(job))
        held = self._job_leases.get(job.job_id)  # fenced or abandoned: the lease its writer had
        return replace(job, lease_expires_at=held) if held is not None else job

    def _job_is_settled(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None:
            return False
        return job.state is JobState.COMPLETED or (
            job.state is JobState.RUNNING and self._job_expiry(job) > self._now()
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
            self._job_leases.pop(job_id, None)
            if state is JobState.COMPLETED:
                self._job_writes.pop(job_id, None)  # a completed job keeps what it wrote
                if self._mark_replayed(job_id):
                    self._open_if_drained(job.tenant_id)
            return job

    def get_job(self, job_id: str) -> ArchiveJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else self._with_lease(job)

    def running_jobs(self, tenant_id: str) -> list[ArchiveJob]:
        with self._lock:
            return sorted(
                (
                    self._with_lease(j)
                    for j in self._jobs.values()
                    if j.tenant_id == tenant_id and j.state is JobState.RUNNING
                ),
                key=lambda j: (j.started_at, j.job_id),
            )

    def list_deferred(self, tenant_id: str, *, include_replayed: bool = False) -> list[DeferredJob]:
        with self._lock:
            return [
                _copy_job(j)
                for j in sorted(self._deferred.values(), key=lambda j: j.position)
                if j.tenant_id == tenant_id and (include_replayed or j.state is not DeferredState.REPLAYED)
            ]
