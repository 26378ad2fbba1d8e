"""Archive-job leases, fencing and write journals on SQL (``JobLeaseRepo``, ADR 0020).

The lease rows are granted and consulted by the gate's admission (``SqlGateRepo``: a RUN
attempt gets a lease; a running attempt is taken over only once its lease expired); this
module adds what the writer, a migration's ``pause`` step and support call. Every write
of an attempt is checked against the ledger row in its own transaction: the attempt
number is the fencing token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from sqlalchemy import Connection, Row, delete, select, update

from archive_kms.errors import FencedError, StateError, ValidationError
from archive_kms.state._common import awaits_rollback, check_id
from archive_kms.state.port import (
    ABANDONED_PREFIX,
    MAX_OBJECT_NAME_BYTES,
    SUPERSEDED_PREFIX,
    ArchiveJob,
    JobState,
    parking_record,
)
from archive_kms.state.schema import JOB_ID, archive_job_writes, archive_jobs
from archive_kms.state.sql.gate import SqlGateRepo

__all__ = ["SqlJobLeaseRepo"]


class SqlJobLeaseRepo(SqlGateRepo):
    """``JobLeaseRepo`` (and ``GateRepo``, whose admission grants the leases) on SQL."""

    def _current_attempt(self, conn: Connection, job_id: str, attempt: int, what: str) -> Row:
        """The job's row if ``attempt`` is its running attempt and still holds the lease."""
        row = conn.execute(select(archive_jobs).where(archive_jobs.c.job_id == job_id)).one_or_none()
        if row is None:
            raise StateError(f"no archive job {job_id!r}", resource=f"job:{job_id}")
        if row.attempt != attempt or row.state != JobState.RUNNING.value:
            raise FencedError(
                f"archive job {job_id!r} attempt {attempt} may not {what}: it is no longer current (attempt "
                f"{row.attempt} is {row.state}{': ' + row.error if row.error else ''})",
                resource=f"job:{job_id}",
            )
        expires = self._job_expiry(conn, row)
        if expires <= self._now():
            raise FencedError(
                f"archive job {job_id!r} attempt {attempt} may not {what}: its lease expired at "
                f"{expires.isoformat(timespec='seconds')}",
                resource=f"job:{job_id}",
            )
        return row

    def renew_job_lease(self, job_id: str, attempt: int) -> datetime:
        with self._tx("renew archive job lease") as conn:
            self._current_attempt(conn, job_id, attempt, "renew its lease")
            now = self._now()
            self._grant_job_lease(conn, job_id, now)
            return now + self._job_stale_after

    def record_job_writes(self, job_id: str, attempt: int, names: Sequence[bytes]) -> None:
        rows = [{"job_id": job_id, "name": n} for n in dict.fromkeys(bytes(n) for n in names)]
        if any(not r["name"] or len(r["name"]) > MAX_OBJECT_NAME_BYTES for r in rows):
            raise ValidationError(f"object names are 1..{MAX_OBJECT_NAME_BYTES} bytes")
        with self._tx("journal archive job writes") as conn:
            self._current_attempt(conn, job_id, attempt, "journal writes")
            for i in range(0, len(rows), 500):
                conn.execute(
                    self._insert(archive_job_writes)
                    .values(rows[i : i + 500])
                    .on_conflict_do_nothing(index_elements=["job_id", "name"])
                )

    def job_writes(self, job_id: str) -> list[bytes]:
        w = archive_job_writes.c
        with self._tx("read archive job writes", write=False) as conn:
            return [bytes(n) for n in conn.execute(select(w.name).where(w.job_id == job_id).order_by(w.name)).scalars()]

    def clear_job_writes(self, job_id: str) -> None:
        with self._tx("clear archive job writes") as conn:
            conn.execute(delete(archive_job_writes).where(archive_job_writes.c.job_id == job_id))

    def jobs_to_roll_back(self, tenant_id: str) -> list[ArchiveJob]:
        j, w = archive_jobs.c, archive_job_writes.c
        with self._tx("list jobs to roll back", write=False) as conn:
            jobs = self._jobs_with_leases(
                conn,
                j.tenant_id == tenant_id,
                j.state == JobState.FAILED.value,
                j.job_id.in_(select(w.job_id).distinct()),
            )
            now = self._now()
        return [
            job
            for job in jobs
            if awaits_rollback(job.state.value, job.error)
            and (job.lease_expires_at is None or job.lease_expires_at <= now)
        ]

    def fence_expired_jobs(self, tenant_id: str, *, by: str) -> list[ArchiveJob]:
        check_id("fencer", by, 500)
        with self._tx("fence expired archive jobs") as conn:
            self._lock_gate(conn, tenant_id)
            now = self._now()
            fenced = []
            for job in self._jobs_with_leases(
                conn, archive_jobs.c.tenant_id == tenant_id, archive_jobs.c.state == JobState.RUNNING.value
            ):
                if job.lease_expires_at is None or job.lease_expires_at > now:
                    continue
                error = (
                    f"{SUPERSEDED_PREFIX}lease expired at {job.lease_expires_at.isoformat(timespec='seconds')}; "
                    f"fenced by {by}"
                )[:500]
                self._fail_running_job(conn, job.job_id, error, now)
                fenced.append(replace(job, state=JobState.FAILED, finished_at=now, error=error))
            return fenced

    def abandon_job(self, tenant_id: str, job_id: str, *, reason: str, actor: str) -> ArchiveJob:
        record = parking_record(reason, actor, self._now())  # the same bounds as parking
        check_id("job id", job_id, JOB_ID)
        with self._tx("abandon archive job") as conn:
            self._lock_gate(conn, tenant_id)
            found = self._jobs_with_leases(conn, archive_jobs.c.job_id == job_id)
            if not found or found[0].tenant_id != tenant_id:
                raise StateError(f"tenant {tenant_id!r} has no archive job {job_id!r}", resource=f"job:{job_id}")
            job = found[0]
            if job.state is not JobState.RUNNING:
                raise StateError(
                    f"archive job {job_id!r} is {job.state.value}, not running: nothing to abandon",
                    resource=f"job:{job_id}",
                )
            now = self._now()
            error = f"{ABANDONED_PREFIX}by {record['actor']}: {record['reason']}"[:500]
            self._fail_running_job(conn, job_id, error, now)
            return replace(job, state=JobState.FAILED, finished_at=now, error=error)

    def _fail_running_job(self, conn: Connection, job_id: str, error: str, now: datetime) -> None:
        # The lease row stays: until it expires the writer may still write, so nobody rolls
        # its output back before then (``jobs_to_roll_back``).
        conn.execute(
            update(archive_jobs)
            .where(archive_jobs.c.job_id == job_id, archive_jobs.c.state == JobState.RUNNING.value)
            .values(state=JobState.FAILED.value, finished_at=now, error=error)
        )
