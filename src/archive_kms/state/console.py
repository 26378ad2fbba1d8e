"""What the Archive Console remembers: dual-control approval requests with their votes,
and failed-token counters for the rate limit. SQL on the state store's own database
(SQLite or PostgreSQL), in tables of their own (``console_*`` in ``state.schema``, created
by Alembic revision 0002); nothing in the migration engine reads them.

Contract (``tests/contract/test_console_store_contract.py`` holds it, on SQLite and PostgreSQL):

- ``create_request`` stores a pending request whose requester's vote is its first vote.
- ``vote`` adds one vote per (request, voter) and returns the request with its votes; a
  second vote of the same voter changes nothing. It never decides.
- ``claim_approved`` moves a request pending -> approved exactly once (compare-and-set):
  of two approvers racing to be "the second", one gets True.
- ``finish`` records the outcome of an approved request (executed with its run id, or
  failed with the error).
- Expiry is decided by the caller (who passes ``now``); ``expire`` records it.
- Each method is one transaction; database errors are translated like the state store's.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, update

from archive_kms.errors import StateError, ValidationError
from archive_kms.state.schema import console_approval_requests, console_approval_votes, console_auth_failures
from archive_kms.state.sql import SqlStateStore
from archive_kms.state.sql.database import retry_aborted_transactions

__all__ = ["ApprovalRequest", "ApprovalState", "ApprovalVote", "ConsoleStore"]


class ApprovalState(str, enum.Enum):
    PENDING = "pending"  # waiting for a second, different approver
    APPROVED = "approved"  # enough approvers; the run is being started
    EXECUTED = "executed"  # the run started (``run_id``)
    FAILED = "failed"  # approved, but the run could not start (``error``)
    REJECTED = "rejected"  # an approver said no
    EXPIRED = "expired"  # not approved in time


@dataclass(frozen=True)
class ApprovalVote:
    voter: str
    role: str
    at: datetime


@dataclass(frozen=True)
class ApprovalRequest:
    request_id: str
    tenant_id: str
    action: str
    params: Mapping[str, Any]
    requested_by: str
    reason: str
    created_at: datetime
    expires_at: datetime
    state: ApprovalState
    votes: tuple[ApprovalVote, ...] = ()
    run_id: str | None = None
    decided_at: datetime | None = None
    error: str | None = None

    def expired(self, now: datetime) -> bool:
        return self.state is ApprovalState.PENDING and now >= self.expires_at

    @property
    def voters(self) -> set[str]:
        return {v.voter for v in self.votes}


requests_table = console_approval_requests
votes_table = console_approval_votes
auth_failures_table = console_auth_failures


@retry_aborted_transactions
class ConsoleStore:
    """The console's tables on a ``SqlStateStore``'s database (its engine, transactions and
    error translation; a transaction the database aborted is run again)."""

    def __init__(self, state: SqlStateStore) -> None:
        self._state = state
        self._db = state.database

    def __repr__(self) -> str:
        return f"ConsoleStore({self._state!r})"

    def _tx(self, op: str, *, write: bool = True) -> Any:
        return self._db.tx(op, write=write)

    # --- approval requests ----------------------------------------------------------------

    def create_request(
        self,
        *,
        tenant_id: str,
        action: str,
        params: Mapping[str, Any],
        requested_by: str,
        role: str,
        reason: str,
        now: datetime,
        ttl: timedelta,
    ) -> ApprovalRequest:
        request_id = f"apr-{uuid.uuid4().hex[:20]}"
        with self._tx("create approval request") as conn:
            conn.execute(
                insert(requests_table).values(
                    request_id=request_id,
                    tenant_id=tenant_id,
                    action=action,
                    params=dict(params),
                    requested_by=requested_by,
                    reason=reason,
                    created_at=now,
                    expires_at=now + ttl,
                    state=ApprovalState.PENDING.value,
                )
            )
            conn.execute(insert(votes_table).values(request_id=request_id, voter=requested_by, role=role, at=now))
            return self._load(conn, request_id)

    def get_request(self, request_id: str) -> ApprovalRequest | None:
        with self._tx("read approval request", write=False) as conn:
            return self._load(conn, request_id, missing_ok=True)

    def list_requests(
        self, *, tenant_ids: list[str] | None = None, state: ApprovalState | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        """Newest first; ``tenant_ids`` None = every tenant."""
        r = requests_table.c
        q = select(r.request_id)
        if tenant_ids is not None:
            q = q.where(r.tenant_id.in_(tenant_ids))
        if state is not None:
            q = q.where(r.state == state.value)
        with self._tx("list approval requests", write=False) as conn:
            ids = conn.execute(q.order_by(r.created_at.desc(), r.request_id).limit(limit)).scalars().all()
            return [self._load(conn, i) for i in ids]

    def vote(self, request_id: str, *, voter: str, role: str, now: datetime) -> ApprovalRequest:
        """Add ``voter``'s vote (once; a repeated vote changes nothing) to a pending request."""
        with self._tx("approve request") as conn:
            found = self._load(conn, request_id)
            if found.state is not ApprovalState.PENDING:
                raise StateError(f"approval request {request_id} is {found.state.value}", resource=request_id)
            if voter not in found.voters:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(votes_table).values(request_id=request_id, voter=voter, role=role, at=now))
                except sa_exc.IntegrityError:  # a racing identical vote: the primary key says it is there
                    pass
            return self._load(conn, request_id)

    def claim_approved(self, request_id: str, *, now: datetime) -> bool:
        """pending -> approved, once; True for the caller that moved it."""
        r = requests_table.c
        with self._tx("claim approved request") as conn:
            moved = conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.state == ApprovalState.PENDING.value)
                .values(state=ApprovalState.APPROVED.value, decided_at=now)
            ).rowcount
        return moved == 1

    def finish(self, request_id: str, *, run_id: str | None = None, error: str | None = None) -> ApprovalRequest:
        """approved -> executed (``run_id``) or failed (``error``)."""
        r = requests_table.c
        state = ApprovalState.FAILED if error is not None else ApprovalState.EXECUTED
        with self._tx("finish approval request") as conn:
            moved = conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.state == ApprovalState.APPROVED.value)
                .values(state=state.value, run_id=run_id, error=None if error is None else error[:1000])
            ).rowcount
            if moved != 1:
                raise StateError(f"approval request {request_id} is not approved", resource=request_id)
            return self._load(conn, request_id)

    def close_request(self, request_id: str, state: ApprovalState, *, now: datetime) -> ApprovalRequest:
        """pending -> rejected | expired; a request no longer pending is returned as it is."""
        if state not in (ApprovalState.REJECTED, ApprovalState.EXPIRED):
            raise ValidationError(f"a request is closed as rejected or expired, not {state.value}")
        r = requests_table.c
        with self._tx("close approval request") as conn:
            conn.execute(
                update(requests_table)
                .where(r.request_id == request_id, r.state == ApprovalState.PENDING.value)
                .values(state=state.value, decided_at=now)
            )
            return self._load(conn, request_id)

    def _load(self, conn: Any, request_id: str, *, missing_ok: bool = False) -> Any:
        row = conn.execute(select(requests_table).where(requests_table.c.request_id == request_id)).one_or_none()
        if row is None:
            if missing_ok:
                return None
            raise StateError(f"unknown approval request {request_id!r}", resource=request_id)
        votes = conn.execute(
            select(votes_table).where(votes_table.c.request_id == request_id).order_by(votes_table.c.at)
        ).all()
        return ApprovalRequest(
            request_id=row.request_id,
            tenant_id=row.tenant_id,
            action=row.action,
            params=dict(row.params),
            requested_by=row.requested_by,
            reason=row.reason,
            created_at=row.created_at,
            expires_at=row.expires_at,
            state=ApprovalState(row.state),
            votes=tuple(ApprovalVote(v.voter, v.role, v.at) for v in votes),
            run_id=row.run_id,
            decided_at=row.decided_at,
            error=row.error,
        )

    # --- token failures (rate limit) --------------------------------------------------------

    def auth_failures(self, client: str, *, now: datetime, window: timedelta) -> int:
        """Failed token checks of ``client`` in the current window."""
        with self._tx("read auth failures", write=False) as conn:
            row = conn.execute(
                select(auth_failures_table).where(auth_failures_table.c.client == client[:255])
            ).one_or_none()
        if row is None or now - row.window_start >= window:
            return 0
        return int(row.count)

    def record_auth_failure(self, client: str, *, now: datetime, window: timedelta) -> int:
        """Count one failed token check of ``client``; the count in the current window."""
        a = auth_failures_table.c
        key = client[:255]
        with self._tx("record auth failure") as conn:
            row = conn.execute(select(auth_failures_table).where(a.client == key)).one_or_none()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(auth_failures_table).values(client=key, window_start=now, count=1))
                    return 1
                except sa_exc.IntegrityError:  # a racing first failure of the same client
                    row = conn.execute(select(auth_failures_table).where(a.client == key)).one()
            if now - row.window_start >= window:
                conn.execute(update(auth_failures_table).where(a.client == key).values(window_start=now, count=1))
                return 1
            conn.execute(update(auth_failures_table).where(a.client == key).values(count=a.count + 1))
            return int(row.count) + 1
