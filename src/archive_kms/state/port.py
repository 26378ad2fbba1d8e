"""The StateStore port: everything the flows, the archive-job writer, the CLI and the
console remember between processes.

It is split into small protocols, one per concern, so a caller can ask for only what it
uses (``TenantRepo``, ``GateRepo``, ``JobLeaseRepo``, ``RunRepo``, ``LedgerRepo``,
``LeaseRepo``, ``AuditLog``, ``LifecycleRepo``, ``WarningRepo``, ``KeyWatchRepo``); ``StateStore`` is all of them. Backends: ``state.sql`` (SQLite by default,
PostgreSQL by URL) and ``state.memory`` (in-process). Both are held to the same contract
suite, ``tests/contract/test_state_store_contract.py``. The design and the concurrency
model are described in ``docs/state-store.md``.

Contract shared by every method
-------------------------------
- Each method is one atomic transaction: it either happened completely or not at all.
- Records are immutable values (frozen dataclasses); datetimes are timezone-aware UTC.
- Conflicts raise ``StateError`` subclasses: ``VersionConflictError`` (stale optimistic
  version: reload and retry), ``LeaseHeldError`` (another run holds the tenant),
  ``FencedError`` (the caller's fencing token is stale: it lost its lease and must stop).
  An unknown tenant / run / job named in a write raises ``StateError``.
- The database not answering, being locked past the busy timeout, or a PostgreSQL
  serialization failure raise ``ServiceUnavailableError`` / ``TransientError``
  (retryable). Messages name the database with its password hidden.
- ``fence=`` on a write: when given, the write happens only if the fence's token is still
  the tenant's current lease token, checked *inside the same transaction* (a separate
  ``check_fence`` call followed by a write would leave a window).
- Nothing here stores key material: wrapped keys only (see the keychain store).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from archive_kms.config import setting_default

# The audit values live in domain/ (the keychain writes audit records without importing
# state); re-exported here, where callers have always found them.
from archive_kms.domain.audit import AuditEvent as AuditEvent
from archive_kms.domain.audit import AuditHead as AuditHead
from archive_kms.domain.audit import AuditRecord as AuditRecord
from archive_kms.domain.audit import AuditVerification as AuditVerification
from archive_kms.domain.search_generations import SearchGeneration as SearchGeneration
from archive_kms.errors import StateError, ValidationError

# --- tenants ---------------------------------------------------------------------------


class KeyMode(str, enum.Enum):
    """How a tenant's L1 key is held (product.md, "Who uses it")."""

    MANAGED = "managed"
    BYOK = "byok"
    BYOKMS = "byokms"
    BYOKV = "byokv"
    KMIP = "kmip"


@dataclass(frozen=True)
class TenantRecord:
    """A tenant's registry entry: its current storage, key binding and index.

    ``location`` is the storage location as JSON (``storage.Location.to_dict()``: cloud,
    kind, bucket or account/container, prefix, ...): the storage package owns its shape;
    the store keeps it verbatim. ``version`` is the optimistic-concurrency row version: 0 for a record not yet
    stored; ``update_tenant`` succeeds only if it equals the stored version and returns
    the record with ``version + 1``.
    """

    tenant_id: str
    key_mode: KeyMode
    location: Mapping[str, Any]
    key_ref: str | None = None
    index_alias: str | None = None
    index_generation: int = 0
    revoked: bool = False
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None


@runtime_checkable
class TenantRepo(Protocol):
    def create_tenant(self, tenant: TenantRecord) -> TenantRecord:
        """Store a new tenant (its archive gate starts ``open``); returns it with
        ``version == 1`` and timestamps set. ``StateError`` if the id exists."""
        ...

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        """The tenant, or None."""
        ...

    def list_tenants(self) -> list[TenantRecord]:
        """All tenants, ordered by id."""
        ...

    def update_tenant(self, tenant: TenantRecord, *, fence: Fence | None = None) -> TenantRecord:
        """Replace every mutable field with ``tenant``'s, if ``tenant.version`` is the
        stored version; returns the stored record (``version + 1``). Raises
        ``VersionConflictError`` if someone else updated it first, ``StateError`` if
        the tenant does not exist, ``FencedError`` for a stale ``fence``. Used for the
        atomic cutover: location, key binding and index generation change together."""
        ...


# --- archive gate, deferred jobs, archive-job ledger -----------------------------------


class GateState(str, enum.Enum):
    OPEN = "open"  # jobs run
    PAUSED = "paused"  # jobs are deferred durably
    DRAINING = "draining"  # resumed; deferred jobs are being replayed, new ones still queue behind them


@dataclass(frozen=True)
class GateStatus:
    tenant_id: str
    state: GateState
    paused_by_run: str | None
    since: datetime
    pending: int = 0  # deferred jobs not yet replayed


class DeferredState(str, enum.Enum):
    DEFERRED = "deferred"
    CLAIMED = "claimed"  # handed to a replayer; re-claimable after ``reclaim_after``
    REPLAYED = "replayed"


@dataclass(frozen=True)
class DeferredJob:
    """An archive job received while the tenant's gate was not open. ``job_id`` is the
    job's idempotency id, unique across all tenants.

    ``payload`` is what the store may keep in clear for as long as it keeps the row: the
    caller's metadata (kind, counts, a keyed digest of the content), never record content.
    ``sealed`` is the job's content sealed by the caller under the tenant's keychain
    (``operations.archive`` seals it as an envelope bound to tenant and job id); opaque
    bytes to the store. It is purged (``None``) in the transaction that marks the job
    ``replayed``; ``payload`` stays, so a resent job id is still recognised."""

    job_id: str
    tenant_id: str
    payload: Mapping[str, Any]
    received_at: datetime | None = None
    state: DeferredState = DeferredState.DEFERRED
    position: int = 0  # FIFO position within the tenant
    claimed_at: datetime | None = None
    replayed_at: datetime | None = None
    sealed: bytes | None = field(default=None, repr=False)

    @property
    def parked(self) -> Mapping[str, Any] | None:
        """``{"reason", "actor", "at"}`` if support parked the job (``park_deferred``)."""
        record = self.payload.get(PARKED_MEMBER)
        return record if isinstance(record, Mapping) else None


# Parking is recorded in the clear payload under this key (no schema change: the row's
# state is ``replayed``); it is not part of the payload as submitted, so a resent id of
# a parked job is still recognised.
PARKED_MEMBER = "parked"
MAX_PARK_TEXT = 500


def submitted_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A stored clear payload without the parking record: what the job writer sent."""
    return {k: v for k, v in payload.items() if k != PARKED_MEMBER}


def parking_record(reason: str, actor: str, at: datetime) -> dict[str, str]:
    """The parking record kept in a parked job's payload; reason and actor are required."""
    for what, text in (("reason", reason), ("actor", actor)):
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_PARK_TEXT:
            raise ValidationError(f"parking a job needs a {what} of 1..{MAX_PARK_TEXT} characters")
    return {"reason": reason.strip(), "actor": actor.strip(), "at": at.isoformat()}


def check_parkable(tenant_id: str, job_id: str, found: DeferredJob | None) -> DeferredJob:
    """``found`` (the stored row of ``job_id``) if it may be parked for ``tenant_id``;
    otherwise ``StateError`` saying why (unknown, another tenant's, already parked/replayed)."""
    if found is None:
        raise StateError(f"tenant {tenant_id!r} has no queued job {job_id!r}", resource=f"job:{job_id}")
    if found.tenant_id != tenant_id:
        raise StateError(f"job {job_id!r} is queued for another tenant, not {tenant_id!r}", resource=f"job:{job_id}")
    if found.parked is not None:
        raise StateError(
            f"job {job_id!r} was already parked by {found.parked.get('actor')} at {found.parked.get('at')}",
            resource=f"job:{job_id}",
        )
    if found.state is DeferredState.REPLAYED:
        raise StateError(
            f"job {job_id!r} was already replayed at {found.replayed_at}: nothing to park", resource=f"job:{job_id}"
        )
    return found


class JobState(str, enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class ArchiveJob:
    """One row of the archive-job ledger (unique ``job_id``: a job archives once)."""

    job_id: str
    tenant_id: str
    state: JobState
    attempt: int
    started_at: datetime
    finished_at: datetime | None = None
    object_count: int | None = None
    error: str | None = None
    #: Until when the running attempt's writer holds the job (its lease, renewed by its
    #: heartbeat); None when not running. An attempt whose lease expired may be taken over
    #: (a retry), fenced (``fence_expired_jobs``) or abandoned by support.
    lease_expires_at: datetime | None = None


#: How long an admitted attempt holds its job without a heartbeat (``renew_job_lease``):
#: ``settings.job_lease_ttl_seconds``'s default.
DEFAULT_JOB_LEASE_TTL = timedelta(seconds=setting_default("job_lease_ttl_seconds"))
#: What ``fence_expired_jobs`` / ``abandon_job`` record as the error of a fenced attempt.
SUPERSEDED_PREFIX = "superseded: "
ABANDONED_PREFIX = "abandoned: "


class Decision(str, enum.Enum):
    RUN = "run"  # run it now, as ``attempt``; then ``finish_job(job_id, attempt, ...)``
    DEFERRED = "deferred"  # durably queued; it will be replayed after resume
    DUPLICATE = "duplicate"  # already completed, running, or queued: do nothing


@dataclass(frozen=True)
class Admission:
    job_id: str
    decision: Decision
    attempt: int | None = None


@runtime_checkable
class GateRepo(Protocol):
    """Pausing a tenant's archive jobs and replaying them exactly once.

    A tenant's gate is ``open``, ``paused`` (by one run) or ``draining``. Every method
    here serialises on the tenant's gate, so a job is either admitted before a pause
    commits (and then listed by ``running_jobs``) or deferred after it: none slips
    through. Exactly-once: the job ledger has one row per ``job_id``; a job runs only
    when ``admit_job``/``start_job`` says ``RUN``, and ``finish_job`` marks a replayed
    job ``replayed`` in the same transaction that records its completion. A replayer
    that crashes between its work and ``finish_job`` gets the job again (the claim
    expires) and ``start_job`` decides from the ledger whether it still has to run.
    """

    def gate(self, tenant_id: str) -> GateStatus:
        """The gate now. ``StateError`` for an unknown tenant."""
        ...

    def pause(self, tenant_id: str, run_id: str, *, fence: Fence | None = None) -> GateStatus:
        """Close the gate for ``run_id``: jobs admitted from now on are deferred.
        Idempotent for the same run; ``StateError`` naming the holder if another run
        paused it. Jobs already admitted keep running: wait until ``running_jobs`` is
        empty before relying on the storage being quiet."""
        ...

    def resume(self, tenant_id: str, run_id: str, *, fence: Fence | None = None) -> GateStatus:
        """Paused by ``run_id`` → ``draining`` (or ``open`` if nothing is queued).
        Idempotent when already draining/open; ``StateError`` if another run paused it."""
        ...

    def admit_job(
        self, tenant_id: str, job_id: str, payload: Mapping[str, Any], *, sealed: bytes | None = None
    ) -> Admission:
        """The archive-job writer's entry point. Gate open: ``RUN`` (ledger row created,
        attempt 1, or a later attempt if a previous one failed or went stale; ``sealed``
        is not kept). Gate paused/draining: ``DEFERRED`` (queued in FIFO order with
        ``payload`` and ``sealed``, see ``DeferredJob``). Known id (queued, running,
        completed): ``DUPLICATE``. Reusing a job id for another tenant or payload
        raises ``StateError``; ``sealed`` is not compared (a fresh seal differs every
        time: the payload carries the content's digest). ``ValidationError`` if the
        payload uses the reserved key ``"sealed"`` or ``sealed`` is not non-empty bytes."""
        ...

    def defer(self, job: DeferredJob) -> bool:
        """Queue ``job`` (with ``job.sealed``) whatever the gate says; True if newly
        queued, False if this job id is already queued (same tenant and payload; the
        stored seal is kept). ``StateError`` if the id is queued with another tenant or
        payload."""
        ...

    def claim_deferred(
        self, tenant_id: str, limit: int = 100, *, reclaim_after: timedelta = timedelta(minutes=5)
    ) -> list[DeferredJob]:
        """Hand out up to ``limit`` queued jobs in FIFO order and mark them claimed
        (nothing while the gate is paused). Claims older than ``reclaim_after`` that were never replayed are handed out
        again (the replayer crashed). When the gate is ``draining`` and nothing is left
        unreplayed, the gate becomes ``open`` in this same transaction."""
        ...

    def mark_replayed(self, job_id: str) -> None:
        """Mark a claimed job replayed and purge its sealed content, in one transaction
        (idempotent). ``finish_job`` does this for you."""
        ...

    def park_deferred(self, tenant_id: str, job_id: str, *, reason: str, actor: str) -> DeferredJob:
        """Support gives up on a queued (deferred or claimed) job that cannot be replayed:
        it is marked ``replayed`` without running, its seal is *kept* (forensics), and
        ``parking_record(reason, actor, now)`` is stored under ``payload["parked"]``; the
        gate opens if that drained it. The job ledger row, if any, is left as it is
        (failed). A resent id of a parked job is a ``DUPLICATE``. ``StateError`` if the
        tenant has no such job, the job belongs to another tenant, or it was already
        replayed or parked; ``ValidationError`` for an empty or overlong reason/actor."""
        ...

    def resume_and_drain(
        self, tenant_id: str, run_id: str, *, limit: int = 1000, fence: Fence | None = None
    ) -> list[DeferredJob]:
        """``resume`` then ``claim_deferred(limit)``. A second call returns only jobs
        queued since, or whose claim expired."""
        ...

    def start_job(self, tenant_id: str, job_id: str) -> Admission:
        """The replayer's ledger check for a claimed job: ``RUN`` with the attempt number
        if it must run now (never run, failed, or its running attempt went stale);
        ``DUPLICATE`` if it completed (its queued copy is then marked replayed and its
        sealed content purged in this transaction) or another attempt is running. ``StateError`` if the gate is
        paused again: stop replaying, the job stays queued."""
        ...

    def finish_job(
        self, job_id: str, attempt: int, *, object_count: int | None = None, error: str | None = None
    ) -> ArchiveJob:
        """Record the end of ``attempt`` (completed, or failed if ``error``). A queued
        copy of the job is marked ``replayed`` and its sealed content purged in the
        same transaction when it completed; a failed job keeps both, to be replayed
        again or examined by support. ``FencedError`` if a newer attempt took the job
        over."""
        ...

    def get_job(self, job_id: str) -> ArchiveJob | None: ...

    def running_jobs(self, tenant_id: str) -> list[ArchiveJob]:
        """Jobs admitted and not finished (pause waits for these)."""
        ...

    def list_deferred(self, tenant_id: str, *, include_replayed: bool = False) -> list[DeferredJob]:
        """Queued jobs in FIFO order (for status screens); replayed ones have ``sealed=None``."""
        ...


@runtime_checkable
class JobLeaseRepo(Protocol):
    """Leases of running archive jobs, and the names an attempt may create (ADR 0020).

    ``admit_job`` / ``start_job`` give a RUN attempt a lease of the store's job lease TTL
    (``DEFAULT_JOB_LEASE_TTL`` unless configured); the writer renews it from a heartbeat.
    The attempt number is the fencing token: once an attempt is superseded (taken over by
    a retry after its lease expired, fenced by ``fence_expired_jobs``, or abandoned by
    support) every write it makes through this port raises ``FencedError``. Before its
    first object, a writer records the names it may create (``record_job_writes``), so
    whoever fences it can roll back what it left (``job_writes``)."""

    def renew_job_lease(self, job_id: str, attempt: int) -> datetime:
        """Extend ``attempt``'s lease by the TTL from now; the new expiry. ``FencedError``
        if the attempt is no longer the job's running attempt or its lease already
        expired (a lost lease is never renewed: the writer must stop)."""
        ...

    def record_job_writes(self, job_id: str, attempt: int, names: Sequence[bytes]) -> None:
        """Add ``names`` (object names the attempt may create) to the job's journal, in
        one transaction, if ``attempt`` is the running attempt and its lease has not
        expired; ``FencedError`` otherwise. Re-adding a name is a no-op."""
        ...

    def job_writes(self, job_id: str) -> list[bytes]:
        """The job's journaled names, sorted (empty when none)."""
        ...

    def clear_job_writes(self, job_id: str) -> None:
        """Forget the job's journal (after its partial output was rolled back).
        ``finish_job`` of a completed attempt clears it in its own transaction."""
        ...

    def jobs_to_roll_back(self, tenant_id: str) -> list[ArchiveJob]:
        """Jobs of the tenant that were fenced or abandoned, whose writer's lease has run
        out, and that still have journaled names: their partial output awaits a rollback
        (``clear_job_writes`` ends it). While such a job has journaled names, ``admit_job``
        / ``start_job`` refuse to start it again (``StateError``), so a retry never races
        the rollback."""
        ...

    def fence_expired_jobs(self, tenant_id: str, *, by: str) -> list[ArchiveJob]:
        """Under the tenant's gate: every running job whose lease expired is marked
        failed with error ``"superseded: lease expired at T; fenced by <by>"`` and returned
        (its journal is kept for the caller's rollback). Its writer can no longer renew,
        journal or finish."""
        ...

    def abandon_job(self, tenant_id: str, job_id: str, *, reason: str, actor: str) -> ArchiveJob:
        """Support gives up a running job by hand: it is marked failed (``"abandoned:
        by <actor>: <reason>"``) whatever its lease says, and returned with the lease
        expiry it had (its writer may write until then; the fenced and abandoned keep that
        expiry in ``lease_expires_at``). ``StateError`` for an unknown
        job, another tenant's, or one not running; ``ValidationError`` for an empty or
        overlong reason/actor."""
        ...


# --- migration runs, steps, checkpoints -------------------------------------------------


class Flow(str, enum.Enum):
    ENABLE = "enable"
    REMOVE = "remove"
    ROTATE = "rotate"
    REVOKE = "revoke"
    RESTORE = "restore"
    ERASE = "erase"


class RunState(str, enum.Enum):
    RUNNING = "running"
    FAILED = "failed"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class StepState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StepRecord:
    run_id: str
    name: str
    ordinal: int
    state: StepState = StepState.PENDING
    attempt: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class MigrationRun:
    run_id: str
    tenant_id: str
    flow: Flow
    mode: str
    state: RunState
    params: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime
    steps: tuple[StepRecord, ...] = ()

    def step(self, name: str) -> StepRecord:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


@runtime_checkable
class RunRepo(Protocol):
    """Migration runs: one ``running`` run per tenant, enforced by a unique index."""

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
        """Create a ``running`` run with ``steps`` pending, or — if the tenant already
        has a running run — return that one. The bool says whether this call created
        it. ``StateError`` for an unknown tenant or a reused ``run_id``."""
        ...

    def find_active_run(self, tenant_id: str) -> MigrationRun | None:
        """The tenant's ``running`` run, or None."""
        ...

    def get_run(self, run_id: str) -> MigrationRun | None: ...

    def list_runs(
        self, tenant_id: str | None = None, *, states: Iterable[RunState] | None = None, limit: int = 100
    ) -> list[MigrationRun]:
        """Newest first."""
        ...

    def set_run_state(self, run_id: str, state: RunState, *, fence: Fence | None = None) -> MigrationRun:
        """Move a run: running → failed|completed|cancelled, failed → running (resume) |
        cancelled. Same-state is a no-op. Other moves raise ``StateError``; resuming
        while another run of the tenant is running raises ``StateError``."""
        ...

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
        """Record a step transition. → running increments ``attempt`` and sets
        ``started_at``; → completed/failed/skipped sets ``finished_at`` (and ``result``
        / ``error``). ``StateError`` for an unknown run or step."""
        ...

    def reset_steps(self, run_id: str, from_step: str, *, fence: Fence | None = None) -> MigrationRun:
        """Support rerun: ``from_step`` and every later step back to pending (attempt
        counts kept, checkpoints of those steps deleted)."""
        ...

    def save_checkpoint(
        self, run_id: str, step: str, shard: int, cursor: Mapping[str, Any], *, fence: Fence | None = None
    ) -> None:
        """Upsert the cursor of one shard of a step."""
        ...

    def load_checkpoints(self, run_id: str, step: str) -> dict[int, dict[str, Any]]:
        """Shard → cursor for the step (empty if none)."""
        ...


# --- manifests and the copy ledger ------------------------------------------------------


MAX_OBJECT_NAME_BYTES = 1024  # S3's key limit; Azure's is larger but we use the tighter one


@dataclass(frozen=True)
class ManifestEntry:
    """One source object. ``name`` is opaque bytes (never decoded or normalised)."""

    name: bytes
    size: int
    shard: int = 0
    etag: str | None = None
    plaintext_sha256: str | None = None  # hex; known once read, or from the source's own record


@dataclass(frozen=True)
class ManifestSummary:
    run_id: str
    tenant_id: str
    source: Mapping[str, Any]  # storage location JSON, as given to create_manifest
    created_at: datetime
    entries: int
    total_bytes: int
    shards: int


class CopyStatus(str, enum.Enum):
    COPIED = "copied"  # written at the destination, not yet verified
    VERIFIED = "verified"  # read back: size and plaintext digest match the manifest
    FAILED = "failed"  # retryable failure recorded
    QUARANTINED = "quarantined"  # poison object, reported, excluded from cutover until waived


@dataclass(frozen=True)
class CopyRecord:
    name: bytes
    status: CopyStatus
    dest_etag: str | None = None
    dest_size: int | None = None
    plaintext_sha256: str | None = None
    error: str | None = None
    updated_at: datetime | None = None


@runtime_checkable
class LedgerRepo(Protocol):
    """The manifest of source objects per run, and the copy ledger against it. A copy
    row exists only for a name in the run's manifest (foreign key)."""

    def create_manifest(self, run_id: str, source: Mapping[str, Any], *, fence: Fence | None = None) -> None:
        """Start the run's manifest of the objects at ``source`` (a storage location as
        JSON). Idempotent for the same source; ``StateError`` for another source or an
        unknown run."""
        ...

    def add_manifest_entries(self, run_id: str, entries: Iterable[ManifestEntry], *, fence: Fence | None = None) -> int:
        """Add entries (one transaction per call; send pages of ~1000). Re-adding an
        identical entry is a no-op (rerun of a listing); the same name with another
        size/etag/shard raises ``StateError``. Returns how many were new."""
        ...

    def manifest_summary(self, run_id: str) -> ManifestSummary | None: ...

    def iter_manifest(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        """Entries ordered by name, read in pages (no transaction held between pages)."""
        ...

    def record_copy(self, run_id: str, record: CopyRecord, *, fence: Fence | None = None) -> None:
        """Upsert the ledger row for ``record.name``. ``StateError`` if the name is not
        in the run's manifest."""
        ...

    def record_copies(self, run_id: str, records: Sequence[CopyRecord], *, fence: Fence | None = None) -> None:
        """``record_copy`` for several names in one transaction (all or none): the copy
        shards flush their ledger rows in small batches."""
        ...

    def get_copy(self, run_id: str, name: bytes) -> CopyRecord | None: ...

    def iter_copies(
        self, run_id: str, *, status: CopyStatus | None = None, shard: int | None = None, page_size: int = 1000
    ) -> Iterator[CopyRecord]:
        """Ledger rows ordered by name (of one manifest shard, if given)."""
        ...

    def copy_counts(self, run_id: str) -> dict[CopyStatus, int]:
        """Rows per status (statuses with no rows are absent)."""
        ...

    def iter_uncopied(self, run_id: str, *, shard: int | None = None, page_size: int = 1000) -> Iterator[ManifestEntry]:
        """Manifest entries with no ledger row in ``copied`` or ``verified``: what a
        resumed copy step still has to do."""
        ...


# --- leases and fencing -----------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """What a write carries to prove its writer still holds the tenant."""

    tenant_id: str
    token: int


@dataclass(frozen=True)
class Lease:
    tenant_id: str
    run_id: str
    token: int  # fencing token: strictly increases each time the lease changes hands
    acquired_at: datetime
    expires_at: datetime

    @property
    def fence(self) -> Fence:
        return Fence(self.tenant_id, self.token)


@runtime_checkable
class LeaseRepo(Protocol):
    """One lease row per tenant. Safety never depends on clocks: expiry only decides
    when a takeover is *allowed*; every takeover bumps the token, and fenced writes
    with an older token are refused."""

    def acquire_lease(self, tenant_id: str, run_id: str, ttl: timedelta) -> Lease:
        """Take the tenant's lease for ``ttl``. Succeeds if nobody holds it, it expired,
        it was released, or ``run_id`` already holds it (a restarted incarnation of the
        same run: it gets a new token, fencing the old one). Among concurrent callers
        exactly one wins. Raises ``LeaseHeldError`` naming the holder otherwise."""
        ...

    def renew_lease(self, lease: Lease, ttl: timedelta) -> Lease:
        """Extend; ``FencedError`` if the lease was taken over or released."""
        ...

    def release_lease(self, lease: Lease) -> bool:
        """Release; False (no error) if it had already been taken over or released."""
        ...

    def get_lease(self, tenant_id: str) -> Lease | None:
        """The current (possibly expired) unreleased lease, or None."""
        ...

    def check_fence(self, tenant_id: str, token: int) -> None:
        """``FencedError`` unless ``token`` is the tenant's current unreleased lease
        token. Prefer ``fence=`` on the write itself (checked in its transaction)."""
        ...


# --- audit log --------------------------------------------------------------------------


@runtime_checkable
class AuditLog(Protocol):
    """Append-only, hash-chained audit log (``docs/state-store.md`` has the threat model)."""

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        """Append one record; concurrent appends are serialised into one chain.
        ``ValidationError`` if ``details`` is not canonical JSON."""
        ...

    def iter_audit(
        self, *, tenant_id: str | None = None, after_seq: int = 0, page_size: int = 1000
    ) -> Iterator[AuditRecord]:
        """Records in ``seq`` order (one tenant's, or all)."""
        ...

    def verify_audit(self, *, tenant_id: str | None = None) -> AuditVerification:
        """Recompute and check the chain(s): every record's hash, every link, no gap,
        heads (count, hash, seal) match the last record. ``tenant_id`` checks that
        tenant's chain only. Never raises for a broken chain: returns ``ok=False`` with
        the first bad ``seq`` and why."""
        ...

    def audit_head(self, *, tenant_id: str | None = None) -> AuditHead | None:
        """The stored head of the tenant's chain (or the global chain): count, head hash,
        and whether its seal verifies with this store's sealer (``seal_ok`` None when the
        store does not seal). None if the chain has no head (no record yet)."""
        ...

    def reseal_audit_heads(self) -> AuditVerification:
        """Verify every chain's links (seals not checked), then seal every head with the
        configured sealer: after sealing is first enabled or its key rotated. It trusts
        what it verifies, so verify with the old key or an anchor first if in doubt.
        Returns the verification; heads are resealed only if it is ok.
        ``ConfigurationError`` if the store has no sealer."""
        ...

    def export_audit(self, tenant_id: str | None = None) -> Iterator[dict[str, Any]]:
        """JSON-ready dicts (one per line of a JSONL export): every record of the tenant,
        then one ``{"type": "head", ...}`` line with its chain head and seal; or, with
        no tenant, every record then every chain's head (``global`` included).
        ``state.audit.verify_export`` verifies either offline."""
        ...


# --- search generations ------------------------------------------------------------------


@runtime_checkable
class SearchGenerationRepo(Protocol):
    """The registry of index generations the platform created (signed records; the
    store keeps them byte for byte and never checks signatures: ``operations.search_guard``
    does). A generation is recorded once and never changed or deleted."""

    def record_search_generation(self, record: SearchGeneration) -> SearchGeneration:
        """Store ``record`` unless ``(tenant_id, generation)`` is recorded already; returns
        what is stored now (the earlier record if there was one: the caller compares)."""
        ...

    def search_generations(self, tenant_id: str) -> list[SearchGeneration]:
        """Every recorded generation of the tenant, oldest first (``IntegrityError`` for a
        row that does not parse)."""
        ...


# --- key lifecycle: retention, rotations, observed key versions -------------------------


@dataclass(frozen=True)
class RetentionPolicy:
    """How long a tenant's archived data is kept: the DEKs of every time bucket that ended
    more than ``retention_seconds`` ago are crypto-erased (with what they encrypted) by the
    scheduled erase (``docs/key-lifecycle.md``)."""

    tenant_id: str
    retention_seconds: int
    updated_by: str
    updated_at: datetime | None = None


MAX_RETENTION_SECONDS = 100 * 366 * 86_400  # a century: anything longer is a typo


class RotationState(str, enum.Enum):
    """A rotation of a tenant's master key, from detection to the old version being free."""

    DETECTED = "detected"  # the key's version changed (or a BYOK upload arrived); a rotate run is triggered
    AWAITING = "awaiting"  # the tenant is paused; a confirmation is asked for (challenge ``nonce``)
    CONFIRMED = "confirmed"  # a valid confirmation consumed the challenge (single use)
    COMPLETED = "completed"  # L2 wrapped under the new version, index rebuilt, jobs resumed
    CANCELLED = "cancelled"  # the run was cancelled before it re-wrapped anything


OPEN_ROTATION_STATES = (RotationState.DETECTED, RotationState.AWAITING, RotationState.CONFIRMED)


@dataclass(frozen=True)
class KeyRotation:
    """One rotation of a tenant's L1 key. ``kind``: ``customer`` (the customer rotated
    their KMS key / Key Vault key / KMIP key; confirmed in the console) or ``byok`` (the
    customer uploaded new material: a new imported key). ``key_ref``: the key whose new
    version the L2 is re-wrapped under (BYOK: the new key); ``previous_*``: what the L2 was
    wrapped under before. ``nonce``: the confirmation challenge, consumed exactly once
    (``update_rotation(..., match_nonce=)``). ``details``: what the rotation proved and did
    (ids, versions, counts; never key material)."""

    rotation_id: str
    tenant_id: str
    kind: str
    key_ref: str
    previous_key_ref: str
    previous_version: str | None
    observed_version: str | None
    state: RotationState = RotationState.DETECTED
    run_id: str | None = None
    nonce: str | None = field(default=None, repr=False)
    detected_at: datetime | None = None
    updated_at: datetime | None = None
    awaiting_since: datetime | None = None
    confirmed_by: str | None = None
    confirmed_at: datetime | None = None
    completed_at: datetime | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return self.state in OPEN_ROTATION_STATES


@dataclass(frozen=True)
class KeyVersionMark:
    """The L1 key version a tenant's L2 was last known to be wrapped under (what the
    rotation detector compares the provider's current version with)."""

    tenant_id: str
    key_ref: str
    version: str | None
    observed_at: datetime | None = None


ROTATION_KINDS = ("customer", "byok")


@runtime_checkable
class LifecycleRepo(Protocol):
    """Retention policies, key rotations and the last known key version per tenant.
    A tenant has at most one open rotation (detected, awaiting or confirmed): a unique
    index in SQL, as for running runs."""

    def set_retention(self, tenant_id: str, retention_seconds: int, *, actor: str) -> RetentionPolicy:
        """Create or replace the tenant's policy; ``ValidationError`` outside
        1..``MAX_RETENTION_SECONDS``; ``StateError`` for an unknown tenant."""
        ...

    def get_retention(self, tenant_id: str) -> RetentionPolicy | None: ...

    def list_retention(self) -> list[RetentionPolicy]:
        """Every policy, by tenant id."""
        ...

    def clear_retention(self, tenant_id: str) -> bool:
        """Remove the policy; False if there was none."""
        ...

    def record_key_version(self, tenant_id: str, key_ref: str, version: str | None) -> KeyVersionMark:
        """Upsert the tenant's last known key version."""
        ...

    def get_key_version(self, tenant_id: str) -> KeyVersionMark | None: ...

    def open_rotation(self, rotation: KeyRotation) -> tuple[KeyRotation, bool]:
        """Store a new rotation (state ``detected``), or return the tenant's open one
        (False). ``StateError`` for an unknown tenant; ``ValidationError`` for a bad kind."""
        ...

    def get_rotation(self, rotation_id: str) -> KeyRotation | None: ...

    def find_open_rotation(self, tenant_id: str) -> KeyRotation | None: ...

    def list_rotations(
        self, tenant_id: str | None = None, *, states: Iterable[RotationState] | None = None, limit: int = 100
    ) -> list[KeyRotation]:
        """Newest first."""
        ...

    def update_rotation(
        self,
        rotation_id: str,
        *,
        expect: Iterable[RotationState],
        match_nonce: str | None = None,
        **changes: Any,
    ) -> KeyRotation:
        """Compare-and-set: apply ``changes`` (``state``, ``run_id``, ``nonce``,
        ``awaiting_since``, ``confirmed_by``, ``confirmed_at``, ``completed_at``; ``details``
        is merged into the stored details) only if the rotation is in one of ``expect`` and,
        with ``match_nonce``, its challenge is exactly that. Otherwise ``StateError`` saying
        what it is (so a second consumer of one challenge is refused: single use)."""
        ...


# --- key lifecycle: warnings, observed master keys, grace policies -----------------------
#
# What the key-state monitor, revocation runs, the console and the rotation flow share
# (docs/key-lifecycle.md; ADR 0022). Warnings are stored, raised and cleared by the
# library, never computed on the fly, so every process and the console see the same ones.


class WarningKind(str, enum.Enum):
    """Kinds of stored warnings (``StoredWarning.kind``); the store accepts any kind of
    lowercase letters and ``_`` so later flows can add their own."""

    KEY_UNAVAILABLE = "key_unavailable"  # the key service does not answer (an outage, not a revocation)
    KEY_DISABLED = "key_disabled"  # the customer disabled / deleted / expired the key: the tenant was revoked
    ROTATION_DETECTED = "rotation_detected"  # the customer rotated the key; the rotate flow acts on it
    RUN_FAILED = "run_failed"  # a revoke / restore / monitor run failed
    TENANT_REVOKED = "tenant_revoked"  # key access revoked (by an operator or the monitor) until restored


WARNING_SEVERITIES = ("critical", "warning", "info")
MAX_WARNING_MESSAGE = 1000


@dataclass(frozen=True)
class StoredWarning:
    """A warning as the store keeps it; one row per ``warning_id``.

    ``warning_id`` is ``<kind>:<tenant>`` or ``<kind>:<tenant>:<subject>``: stable while
    the condition lasts, so raising it again updates it (``count`` + 1, new message and
    details) rather than adding one. A cleared warning raised again starts a new episode
    (``raised_at`` now, ``count`` 1, acknowledgement reset)."""

    warning_id: str
    tenant_id: str
    kind: str
    severity: str  # critical | warning | info
    message: str
    details: Mapping[str, Any]
    raised_at: datetime
    updated_at: datetime
    count: int = 1
    cleared_at: datetime | None = None
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.cleared_at is None

    def to_dict(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat(timespec="seconds") if t else None

        return {
            "id": self.warning_id,
            "tenant": self.tenant_id,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "details": dict(self.details),
            "raised_at": iso(self.raised_at),
            "updated_at": iso(self.updated_at),
            "count": self.count,
            "active": self.active,
            "cleared_at": iso(self.cleared_at),
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": iso(self.acknowledged_at),
        }


def warning_id(kind: str, tenant_id: str, subject: str | None = None) -> str:
    """The stable id of a warning (see ``StoredWarning``)."""
    return f"{kind}:{tenant_id}" + (f":{subject}" if subject else "")


@runtime_checkable
class WarningRepo(Protocol):
    """Stored warnings per tenant (raise, clear, acknowledge, list)."""

    def raise_warning(
        self,
        tenant_id: str,
        kind: str,
        *,
        severity: str,
        message: str,
        subject: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> tuple[StoredWarning, bool]:
        """Raise (or raise again) ``warning_id(kind, tenant, subject)``; the bool says
        whether this started a new episode (it was not active). ``StateError`` for an
        unknown tenant; ``ValidationError`` for a bad kind (``[a-z_]{1,32}``), severity,
        subject (``[A-Za-z0-9._:@/-]{1,128}``), an empty or overlong message (1..1000), or
        details that are not plain JSON."""
        ...

    def clear_warning(self, warning_id: str) -> StoredWarning | None:
        """Clear an active warning; returns it cleared, or None if it was not active."""
        ...

    def acknowledge_warning(self, warning_id: str, *, actor: str) -> StoredWarning:
        """Record who acknowledged the warning (it stays active until cleared).
        ``StateError`` if there is no such warning."""
        ...

    def get_warning(self, warning_id: str) -> StoredWarning | None: ...

    def list_warnings(
        self, tenant_id: str | None = None, *, active: bool | None = True, kind: str | None = None, limit: int = 500
    ) -> list[StoredWarning]:
        """Warnings (active only by default; ``active=None``: all), newest ``updated_at`` first."""
        ...


@dataclass(frozen=True)
class ObservedKey:
    """What the key-state monitor last saw of a tenant's master key at its provider.

    ``state`` is a ``keys.port.KeyState`` value, or ``unreachable``. ``accepted_version``
    is the key version (KMS ``CurrentKeyMaterialId``, Key Vault version, KMIP UID) the
    tenant's keychain is known to be on: a provider reporting another one is a customer
    rotation, until the rotation flow accepts the new version. ``outcome``: what the
    monitor made of the observation (``ok``, ``rotation``, ``revoked``, ``unreachable``)."""

    tenant_id: str
    key_ref: str
    state: str
    key_version: str | None
    accepted_version: str | None
    outcome: str
    observed_at: datetime
    expires_at: datetime | None = None
    unreachable_since: datetime | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GracePolicyRecord:
    """A tenant's own grace policy (``keys.keychain.access.GracePolicy`` as text)."""

    tenant_id: str
    policy: str
    updated_by: str
    updated_at: datetime


@runtime_checkable
class KeyWatchRepo(Protocol):
    """The monitor's observations of each tenant's master key, and per-tenant grace policies."""

    def record_key_observation(self, observation: ObservedKey) -> ObservedKey:
        """Store the tenant's latest observation (replacing the previous one); returns it
        as stored. ``StateError`` for an unknown tenant."""
        ...

    def get_key_observation(self, tenant_id: str) -> ObservedKey | None: ...

    def list_key_observations(self) -> list[ObservedKey]:
        """Every tenant's latest observation, by tenant id."""
        ...

    def set_grace_policy(self, tenant_id: str, policy: str | None, *, actor: str) -> GracePolicyRecord | None:
        """Set the tenant's grace policy text (checked by the caller), or with None drop it
        (the settings' default applies again). ``StateError`` for an unknown tenant."""
        ...

    def get_grace_policy(self, tenant_id: str) -> GracePolicyRecord | None:
        """The tenant's own policy, or None (the default applies)."""
        ...


# --- the whole store --------------------------------------------------------------------


@runtime_checkable
class StateStore(
    TenantRepo,
    GateRepo,
    JobLeaseRepo,
    RunRepo,
    LedgerRepo,
    LeaseRepo,
    AuditLog,
    SearchGenerationRepo,
    LifecycleRepo,
    WarningRepo,
    KeyWatchRepo,
    Protocol,
):
    """Every concern above in one object (what ``open_state`` returns)."""

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...
