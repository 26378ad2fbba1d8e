"""The archive gate, deferred jobs and the archive-job ledger on SQL (``GateRepo``).

Every operation of a tenant locks its gate row first (``FOR UPDATE`` on PostgreSQL): the
per-tenant mutex that makes "no job starts after the pause commits" true
(``docs/state-store.md``, "The archive gate and exactly-once replay")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, func, insert, or_, select, update

from archive_kms.errors import FencedError, StateError, ValidationError
from archive_kms.state._common import (
    ROLLBACK_PENDING,
    awaits_rollback,
    check_id,
    job_payload,
    pack_payload,
    unpack_payload,
)
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
from archive_kms.state.schema import (
    JOB_ID,
    RUN_ID,
    archive_gates,
    archive_job_leases,
    archive_job_writes,
    archive_jobs,
    deferred_jobs,
)
from archive_kms.state.sql.database import DEFAULT_JOB_STALE_AFTER, SqlDatabase, SqlRepository

__all__ = ["SqlGateRepo"]


class SqlGateRepo(SqlRepository):
    """``GateRepo`` on SQL. ``job_stale_after``: the job lease TTL, when a running job's
    attempt whose writer stopped renewing may be taken over (ADR 0020)."""

    def __init__(self, db: SqlDatabase, *, job_stale_after: timedelta = DEFAULT_JOB_STALE_AFTER) -> None:
        super().__init__(db)
        if job_stale_after <= timedelta(0):
            raise ValidationError("the job lease TTL must be positive")
        self._job_stale_after = job_stale_after

    def _lock_gate(self, conn: Connection, tenant_id: str) -> Row[Any]:
        row = conn.execute(
            select(archive_gates).where(archive_gates.c.tenant_id == tenant_id).with_for_update()
        ).one_or_none()
        if row is None:
            raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
        return row

    def _pending(self, conn: Connection, tenant_id: str) -> int:
        return int(
            conn.execute(
                select(func.count())
                .select_from(deferred_jobs)
                .where(deferred_jobs.c.tenant_id == tenant_id, deferred_jobs.c.state != DeferredState.REPLAYED.value)
            ).scalar_one()
        )

    def _gate_status(self, conn: Connection, row: Row[Any]) -> GateStatus:
        return GateStatus(
            row.tenant_id, GateState(row.state), row.paused_by_run, row.since, self._pending(conn, row.tenant_id)
        )

    def _set_gate(self, conn: Connection, tenant_id: str, state: GateState, run_id: str | None) -> Row[Any]:
        return conn.execute(
            update(archive_gates)
            .where(archive_gates.c.tenant_id == tenant_id)
            .values(state=state.value, paused_by_run=run_id, since=self._now())
            .returning(*archive_gates.c)
        ).one()

    def _open_if_drained(self, conn: Connection, gate: Row[Any]) -> Row[Any]:
        if gate.state == GateState.DRAINING.value and self._pending(conn, gate.tenant_id) == 0:
            return self._set_gate(conn, gate.tenant_id, GateState.OPEN, None)
        return gate

    def gate(self, tenant_id: str) -> GateStatus:
        with self._tx("read gate", write=False) as conn:
            row = conn.execute(select(archive_gates).where(archive_gates.c.tenant_id == tenant_id)).one_or_none()
            if row is None:
                raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
            return self._gate_status(conn, row)

    def pause(self, tenant_id: str, run_id: str, *, fence: Fence | None = None) -> GateStatus:
        check_id("run id", run_id, RUN_ID)
        with self._tx("pause archive jobs") as conn:
            self._fenced(conn, fence, tenant_id)
            gate = self._lock_gate(conn, tenant_id)
            if gate.state == GateState.PAUSED.value:
                if gate.paused_by_run != run_id:
                    raise StateError(
                        f"archive jobs of tenant {tenant_id!r} are already paused by run {gate.paused_by_run!r}",
                        resource=f"gate:{tenant_id}",
                    )
            else:
                gate = self._set_gate(conn, tenant_id, GateState.PAUSED, run_id)
            return self._gate_status(conn, gate)

    def _resume(self, conn: Connection, tenant_id: str, run_id: str, fence: Fence | None) -> Row[Any]:
        self._fenced(conn, fence, tenant_id)
        gate = self._lock_gate(conn, tenant_id)
        if gate.state != GateState.PAUSED.value:
            return gate  # already resumed (idempotent)
        if gate.paused_by_run != run_id:
            raise StateError(
                f"archive jobs of tenant {tenant_id!r} were paused by run {gate.paused_by_run!r}, not {run_id!r}",
                resource=f"gate:{tenant_id}",
            )
        gate = self._set_gate(conn, tenant_id, GateState.DRAINING, run_id)
        return self._open_if_drained(conn, gate)

    def resume(self, tenant_id: str, run_id: str, *, fence: Fence | None = None) -> GateStatus:
        with self._tx("resume archive jobs") as conn:
            return self._gate_status(conn, self._resume(conn, tenant_id, run_id, fence))

    def _queue(
        self, conn: Connection, gate: Row[Any], job_id: str, payload: Mapping[str, Any], sealed: bytes | None
    ) -> None:
        position = gate.next_position + 1
        conn.execute(
            update(archive_gates).where(archive_gates.c.tenant_id == gate.tenant_id).values(next_position=position)
        )
        conn.execute(
            insert(deferred_jobs).values(
                job_id=job_id,
                tenant_id=gate.tenant_id,
                position=position,
                payload=pack_payload(payload, sealed),
                received_at=self._now(),
                state=DeferredState.DEFERRED.value,
            )
        )

    def _known_deferred(
        self, conn: Connection, tenant_id: str, job_id: str, payload: Mapping[str, Any]
    ) -> Row[Any] | None:
        row = conn.execute(select(deferred_jobs).where(deferred_jobs.c.job_id == job_id)).one_or_none()
        stored = None if row is None else submitted_payload(unpack_payload(row.payload)[0])
        if row is not None and (row.tenant_id != tenant_id or stored != dict(payload)):
            raise StateError(
                f"job id {job_id!r} was already used for another tenant or payload", resource=f"job:{job_id}"
            )
        return row

    def _try_start(self, conn: Connection, tenant_id: str, job_id: str) -> Admission:
        """The ledger decision (caller holds the gate lock). A RUN attempt gets a fresh
        lease (ADR 0020)."""
        now = self._now()
        row = conn.execute(select(archive_jobs).where(archive_jobs.c.job_id == job_id)).one_or_none()
        if row is None:
            conn.execute(
                insert(archive_jobs).values(
                    job_id=job_id, tenant_id=tenant_id, state=JobState.RUNNING.value, attempt=1, started_at=now
                )
            )
            self._grant_job_lease(conn, job_id, now)
            return Admission(job_id, Decision.RUN, 1)
        if row.tenant_id != tenant_id:
            raise StateError(f"job id {job_id!r} belongs to another tenant", resource=f"job:{job_id}")
        if row.state == JobState.COMPLETED.value:
            self._mark_replayed(conn, job_id)
            return Admission(job_id, Decision.DUPLICATE, row.attempt)
        if row.state == JobState.RUNNING.value and self._job_expiry(conn, row) > now:
            return Admission(job_id, Decision.DUPLICATE, row.attempt)
        if awaits_rollback(row.state, row.error) and self._has_writes(conn, job_id):
            raise StateError(ROLLBACK_PENDING.format(job_id=job_id, tenant_id=tenant_id), resource=f"job:{job_id}")
        attempt = row.attempt + 1  # failed, or running but its lease expired (its writer died): take over
        conn.execute(
            update(archive_jobs)
            .where(archive_jobs.c.job_id == job_id)
            .values(state=JobState.RUNNING.value, attempt=attempt, started_at=now, finished_at=None, error=None)
        )
        self._grant_job_lease(conn, job_id, now)
        return Admission(job_id, Decision.RUN, attempt)

    def _job_is_settled(self, conn: Connection, job_id: str) -> bool:
        row = conn.execute(select(archive_jobs).where(archive_jobs.c.job_id == job_id)).one_or_none()
        if row is None:
            return False
        return row.state == JobState.COMPLETED.value or (
            row.state == JobState.RUNNING.value and self._job_expiry(conn, row) > self._now()
        )

    # --- the job's lease and journal rows, shared with SqlJobLeaseRepo (ADR 0020) -------------

    def _grant_job_lease(self, conn: Connection, job_id: str, now: datetime) -> None:
        conn.execute(delete(archive_job_leases).where(archive_job_leases.c.job_id == job_id))
        conn.execute(
            insert(archive_job_leases).values(job_id=job_id, expires_at=now + self._job_stale_after, renewed_at=now)
        )

    def _job_expiry(self, conn: Connection, row: Row[Any]) -> datetime:
        """Until when a running job's attempt holds it (a row from before leases: its start + TTL)."""
        expires = conn.execute(
            select(archive_job_leases.c.expires_at).where(archive_job_leases.c.job_id == row.job_id)
        ).scalar()
        return expires if expires is not None else row.started_at + self._job_stale_after

    def _has_writes(self, conn: Connection, job_id: str) -> bool:
        w = archive_job_writes.c
        return conn.execute(select(w.name).where(w.job_id == job_id).limit(1)).first() is not None

    def _jobs_with_leases(self, conn: Connection, *where: Any) -> list[ArchiveJob]:
        j, lease = archive_jobs.c, archive_job_leases.c
        rows = conn.execute(
            select(archive_jobs, lease.expires_at.label("lease_expires_at"))
            .select_from(archive_jobs.outerjoin(archive_job_leases, lease.job_id == j.job_id))
            .where(*where)
            .order_by(j.started_at, j.job_id)
        ).all()
        out = []
        for r in rows:
            job = _job(r)
            if job.state is JobState.RUNNING:
                job = replace(job, lease_expires_at=r.lease_expires_at or r.started_at + self._job_stale_after)
            elif r.lease_expires_at is not None:  # fenced or abandoned: the lease its writer had
                job = replace(job, lease_expires_at=r.lease_expires_at)
            out.append(job)
        return out

    def admit_job(
        self, tenant_id: str, job_id: str, payload: Mapping[str, Any], *, sealed: bytes | None = None
    ) -> Admission:
        check_id("job id", job_id, JOB_ID)
        payload, sealed = job_payload(payload, sealed)
        with self._tx("admit archive job") as conn:
            gate = self._lock_gate(conn, tenant_id)
            if self._known_deferred(conn, tenant_id, job_id, payload) is not None:
                return Admission(job_id, Decision.DUPLICATE)
            if self._job_is_settled(conn, job_id):
                return self._try_start(conn, tenant_id, job_id)  # DUPLICATE (checks the tenant too)
            if gate.state != GateState.OPEN.value:
                self._queue(conn, gate, job_id, payload, sealed)
                return Admission(job_id, Decision.DEFERRED)
            return self._try_start(conn, tenant_id, job_id)

    def defer(self, job: DeferredJob) -> bool:
        check_id("job id", job.job_id, JOB_ID)
        payload, sealed = job_payload(job.payload, job.sealed)
        with self._tx("defer archive job") as conn:
            gate = self._lock_gate(conn, job.tenant_id)
            if self._known_deferred(conn, job.tenant_id, job.job_id, payload) is not None:
                return False
            self._queue(conn, gate, job.job_id, payload, sealed)
            return True

    def _claim(self, conn: Connection, tenant_id: str, limit: int, reclaim_after: timedelta) -> list[DeferredJob]:
        now = self._now()
        d = deferred_jobs.c
        rows = conn.execute(
            select(deferred_jobs)
            .where(
                d.tenant_id == tenant_id,
                or_(
                    d.state == DeferredState.DEFERRED.value,
                    and_(d.state == DeferredState.CLAIMED.value, d.claimed_at <= now - reclaim_after),
                ),
            )
            .order_by(d.position)
            .limit(limit)
        ).all()
        if rows:
            conn.execute(
                update(deferred_jobs)
                .where(d.job_id.in_([r.job_id for r in rows]))
                .values(state=DeferredState.CLAIMED.value, claimed_at=now)
            )
        return [_deferred(r, state=DeferredState.CLAIMED, claimed_at=now) for r in rows]

    def claim_deferred(
        self, tenant_id: str, limit: int = 100, *, reclaim_after: timedelta = timedelta(minutes=5)
    ) -> list[DeferredJob]:
        if limit < 1:
            raise ValidationError("claim limit must be at least 1")
        with self._tx("claim deferred jobs") as conn:
            gate = self._lock_gate(conn, tenant_id)
            if gate.state == GateState.PAUSED.value:
                return []
            jobs = self._claim(conn, tenant_id, limit, reclaim_after)
            if not jobs:
                self._open_if_drained(conn, gate)
            return jobs

    def resume_and_drain(
        self, tenant_id: str, run_id: str, *, limit: int = 1000, fence: Fence | None = None
    ) -> list[DeferredJob]:
        with self._tx("resume and drain archive jobs") as conn:
            gate = self._resume(conn, tenant_id, run_id, fence)
            jobs = self._claim(conn, tenant_id, limit, timedelta(minutes=5))
            if not jobs:
                self._open_if_drained(conn, gate)
            return jobs

    def _mark_replayed(self, conn: Connection, job_id: str) -> bool:
        """Mark the queued copy replayed and purge its sealed content (the document is
        rewritten without it); the clear payload stays for resent ids."""
        d = deferred_jobs.c
        document = conn.execute(
            select(d.payload).where(d.job_id == job_id, d.state != DeferredState.REPLAYED.value)
        ).scalar_one_or_none()
        if document is None:
            return False
        res = conn.execute(
            update(deferred_jobs)
            .where(d.job_id == job_id, d.state != DeferredState.REPLAYED.value)
            .values(state=DeferredState.REPLAYED.value, replayed_at=self._now(), payload=unpack_payload(document)[0])
        )
        return res.rowcount > 0

    def mark_replayed(self, job_id: str) -> None:
        with self._tx("mark job replayed") as conn:
            tenant_id = conn.execute(select(deferred_jobs.c.tenant_id).where(deferred_jobs.c.job_id == job_id)).scalar()
            if tenant_id is None:
                raise StateError(f"no deferred job {job_id!r}", resource=f"job:{job_id}")
            gate = self._lock_gate(conn, tenant_id)
            if self._mark_replayed(conn, job_id):
                self._open_if_drained(conn, gate)

    def park_deferred(self, tenant_id: str, job_id: str, *, reason: str, actor: str) -> DeferredJob:
        now = self._now()
        parking = parking_record(reason, actor, now)
        with self._tx("park deferred job") as conn:
            gate = self._lock_gate(conn, tenant_id)
            d = deferred_jobs.c
            row = conn.execute(select(deferred_jobs).where(d.job_id == job_id)).one_or_none()
            check_parkable(tenant_id, job_id, None if row is None else _deferred(row))
            # Replayed without running. The stored document is kept as it is, seal included
            # (verbatim, even an edited one: it is the evidence), plus the parking record.
            parked = conn.execute(
                update(deferred_jobs)
                .where(d.job_id == job_id)
                .values(
                    state=DeferredState.REPLAYED.value, replayed_at=now, payload={**row.payload, PARKED_MEMBER: parking}
                )
                .returning(*deferred_jobs.c)
            ).one()
            self._open_if_drained(conn, gate)
            return _deferred(parked)

    def start_job(self, tenant_id: str, job_id: str) -> Admission:
        check_id("job id", job_id, JOB_ID)
        with self._tx("start archive job") as conn:
            gate = self._lock_gate(conn, tenant_id)
            if gate.state == GateState.PAUSED.value:
                raise StateError(
                    f"archive jobs of tenant {tenant_id!r} are paused by run {gate.paused_by_run!r}: "
                    "stop replaying; the job stays queued",
                    resource=f"gate:{tenant_id}",
                )
            return self._try_start(conn, tenant_id, job_id)

    def finish_job(
        self, job_id: str, attempt: int, *, object_count: int | None = None, error: str | None = None
    ) -> ArchiveJob:
        state = JobState.FAILED if error is not None else JobState.COMPLETED
        with self._tx("finish archive job") as conn:
            tenant_id = conn.execute(select(archive_jobs.c.tenant_id).where(archive_jobs.c.job_id == job_id)).scalar()
            if tenant_id is None:
                raise StateError(f"no archive job {job_id!r}", resource=f"job:{job_id}")
            gate = self._lock_gate(conn, tenant_id)
            row = conn.execute(select(archive_jobs).where(archive_jobs.c.job_id == job_id)).one()
            if row.attempt == attempt and row.state == state.value:
                return _job(row)  # a retried finish: same outcome already recorded
            if row.attempt != attempt or row.state != JobState.RUNNING.value:
                raise FencedError(
                    f"archive job {job_id!r} attempt {attempt} is no longer current "
                    f"(attempt {row.attempt} is {row.state})",
                    resource=f"job:{job_id}",
                )
            row = conn.execute(
                update(archive_jobs)
                .where(archive_jobs.c.job_id == job_id)
                .values(state=state.value, finished_at=self._now(), object_count=object_count, error=error)
                .returning(*archive_jobs.c)
            ).one()
            conn.execute(delete(archive_job_leases).where(archive_job_leases.c.job_id == job_id))
            if state is JobState.COMPLETED:
                # A completed job keeps what it wrote: nothing to roll back any more.
                conn.execute(delete(archive_job_writes).where(archive_job_writes.c.job_id == job_id))
                if self._mark_replayed(conn, job_id):
                    self._open_if_drained(conn, gate)
            return _job(row)

    def get_job(self, job_id: str) -> ArchiveJob | None:
        with self._tx("get archive job", write=False) as conn:
            found = self._jobs_with_leases(conn, archive_jobs.c.job_id == job_id)
        return found[0] if found else None

    def running_jobs(self, tenant_id: str) -> list[ArchiveJob]:
        with self._tx("list running jobs", write=False) as conn:
            return self._jobs_with_leases(
                conn, archive_jobs.c.tenant_id == tenant_id, archive_jobs.c.state == JobState.RUNNING.value
            )

    def list_deferred(self, tenant_id: str, *, include_replayed: bool = False) -> list[DeferredJob]:
        q = select(deferred_jobs).where(deferred_jobs.c.tenant_id == tenant_id)
        if not include_replayed:
            q = q.where(deferred_jobs.c.state != DeferredState.REPLAYED.value)
        with self._tx("list deferred jobs", write=False) as conn:
            rows = conn.execute(q.order_by(deferred_jobs.c.position)).all()
        return [_deferred(r) for r in rows]


def _deferred(r: Row[Any], **override: Any) -> DeferredJob:
    payload, sealed = unpack_payload(r.payload)
    values = {
        "job_id": r.job_id,
        "tenant_id": r.tenant_id,
        "payload": payload,
        "sealed": sealed,
        "received_at": r.received_at,
        "state": DeferredState(r.state),
        "position": int(r.position),
        "claimed_at": r.claimed_at,
        "replayed_at": r.replayed_at,
    }
    return DeferredJob(**(values | override))


def _job(r: Row[Any]) -> ArchiveJob:
    return ArchiveJob(
        job_id=r.job_id,
        tenant_id=r.tenant_id,
        state=JobState(r.state),
        attempt=r.attempt,
        started_at=r.started_at,
        finished_at=r.finished_at,
        object_count=None if r.object_count is None else int(r.object_count),
        error=r.error,
    )
