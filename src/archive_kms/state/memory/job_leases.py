"""Archive-job leases, fencing and write journals in memory (``JobLeaseRepo``, ADR 0020)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from archive_kms.errors import FencedError, StateError, ValidationError
from archive_kms.state._common import awaits_rollback, check_id
from archive_kms.state.memory.gate import MemoryGateRepo
from archive_kms.state.port import (
    ABANDONED_PREFIX,
    MAX_OBJECT_NAME_BYTES,
    SUPERSEDED_PREFIX,
    ArchiveJob,
    JobState,
    parking_record,
)
from archive_kms.state.schema import JOB_ID

__all__ = ["MemoryJobLeaseRepo"]


class MemoryJobLeaseRepo(MemoryGateRepo):
    """``JobLeaseRepo`` (and ``GateRepo``, whose admission grants the leases) in memory."""

    def _current_attempt(self, job_id: str, attempt: int, what: str) -> ArchiveJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise StateError(f"no archive job {job_id!r}", resource=f"job:{job_id}")
        if job.attempt != attempt or job.state is not JobState.RUNNING:
            raise FencedError(
                f"archive job {job_id!r} attempt {attempt} may not {what}: it is no longer current (attempt "
                f"{job.attempt} is {job.state.value}{': ' + job.error if job.error else ''})",
                resource=f"job:{job_id}",
            )
        expires = self._job_expiry(job)
        if expires <= self._now():
            raise FencedError(
                f"archive job {job_id!r} attempt {attempt} may not {what}: its lease expired at "
                f"{expires.isoformat(timespec='seconds')}",
                resource=f"job:{job_id}",
            )
        return job

    def renew_job_lease(self, job_id: str, attempt: int) -> datetime:
        with self._lock:
            self._current_attempt(job_id, attempt, "renew its lease")
            expires = self._now() + self._job_stale_after
            self._job_leases[job_id] = expires
            return expires

    def record_job_writes(self, job_id: str, attempt: int, names: Sequence[bytes]) -> None:
        wanted = [bytes(n) for n in names]
        if any(not n or len(n) > MAX_OBJECT_NAME_BYTES for n in wanted):
            raise ValidationError(f"object names are 1..{MAX_OBJECT_NAME_BYTES} bytes")
        with self._lock:
            self._current_attempt(job_id, attempt, "journal writes")
            self._job_writes.setdefault(job_id, set()).update(wanted)

    def job_writes(self, job_id: str) -> list[bytes]:
        with self._lock:
            return sorted(self._job_writes.get(job_id, ()))

    def clear_job_writes(self, job_id: str) -> None:
        with self._lock:
            self._job_writes.pop(job_id, None)

    def _fail_running_job(self, job: ArchiveJob, error: str, now: datetime) -> ArchiveJob:
        failed = replace(job, state=JobState.FAILED, finished_at=now, error=error)
        self._jobs[job.job_id] = failed
        # The lease entry stays: until it expires the writer may still write (jobs_to_roll_back).
        self._job_leases[job.job_id] = self._job_expiry(job)
        return failed

    def jobs_to_roll_back(self, tenant_id: str) -> list[ArchiveJob]:
        with self._lock:
            now = self._now()
            return sorted(
                (
                    self._with_lease(j)
                    for j in self._jobs.values()
                    if j.tenant_id == tenant_id
                    and awaits_rollback(j.state.value, j.error)
                    and self._job_writes.get(j.job_id)
                    and self._job_leases.get(j.job_id, now) <= now
                ),
                key=lambda j: (j.started_at, j.job_id),
            )

    def fence_expired_jobs(self, tenant_id: str, *, by: str) -> list[ArchiveJob]:
        check_id("fencer", by, 500)
        with self._lock:
            self._gate(tenant_id)
            now = self._now()
            fenced = []
            for job in self.running_jobs(tenant_id):
                if job.lease_expires_at is None or job.lease_expires_at > now:
                    continue
                error = (
                    f"{SUPERSEDED_PREFIX}lease expired at {job.lease_expires_at.isoformat(timespec='seconds')}; "
                    f"fenced by {by}"
                )[:500]
                self._fail_running_job(self._jobs[job.job_id], error, now)
                fenced.append(replace(job, state=JobState.FAILED, finished_at=now, error=error))
            return fenced

    def abandon_job(self, tenant_id: str, job_id: str, *, reason: str, actor: str) -> ArchiveJob:
        record = parking_record(reason, actor, self._now())
        check_id("job id", job_id, JOB_ID)
        with self._lock:
            self._gate(tenant_id)
            job = self._jobs.get(job_id)
            if job is None or job.tenant_id != tenant_id:
                raise StateError(f"tenant {tenant_id!r} has no archive job {job_id!r}", resource=f"job:{job_id}")
            if job.state is not JobState.RUNNING:
                raise StateError(
                    f"archive job {job_id!r} is {job.state.value}, not running: nothing to abandon",
                    resource=f"job:{job_id}",
                )
            held = self._with_lease(job)
            now = self._now()
            error = f"{ABANDONED_PREFIX}by {record['actor']}: {record['reason']}"[:500]
            self._fail_running_job(job, error, now)
            return replace(held, state=JobState.FAILED, finished_at=now, error=error)
