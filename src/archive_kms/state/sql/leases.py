"""Tenant leases and fencing tokens on SQL (``LeaseRepo``): one row per tenant; a
conditional ``UPDATE ... RETURNING`` picks exactly one winner among concurrent takers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Row, or_, select, update

from archive_kms.errors import FencedError, LeaseHeldError, StateError, ValidationError
from archive_kms.state._common import check_id, check_token
from archive_kms.state.port import Lease
from archive_kms.state.schema import RUN_ID, tenant_leases
from archive_kms.state.sql.database import Conflict, SqlRepository

__all__ = ["SqlLeaseRepo"]


class SqlLeaseRepo(SqlRepository):
    """``LeaseRepo`` on SQL."""

    def acquire_lease(self, tenant_id: str, run_id: str, ttl: timedelta) -> Lease:
        check_id("run id", run_id, RUN_ID)
        if ttl <= timedelta(0):
            raise ValidationError("lease ttl must be positive")
        L = tenant_leases.c  # noqa: N806 - the table's columns, as in SQLAlchemy docs
        try:
            with self._tx("acquire lease") as conn:
                now = self._now()
                row = conn.execute(
                    self._insert(tenant_leases)
                    .values(tenant_id=tenant_id, run_id=run_id, token=1, acquired_at=now, expires_at=now + ttl)
                    .on_conflict_do_nothing(index_elements=["tenant_id"])
                    .returning(*tenant_leases.c)
                ).one_or_none()
                if row is None:
                    # Conditional takeover: PostgreSQL re-checks the WHERE on the newest row
                    # version after waiting for a concurrent taker, so exactly one wins.
                    row = conn.execute(
                        update(tenant_leases)
                        .where(
                            L.tenant_id == tenant_id,
                            or_(L.expires_at <= now, L.released_at.is_not(None), L.run_id == run_id),
                        )
                        .values(
                            run_id=run_id, token=L.token + 1, acquired_at=now, expires_at=now + ttl, released_at=None
                        )
                        .returning(*tenant_leases.c)
                    ).one_or_none()
                if row is None:
                    holder = conn.execute(select(tenant_leases).where(L.tenant_id == tenant_id)).one()
                    raise LeaseHeldError(
                        f"tenant {tenant_id!r} is held by run {holder.run_id!r} until {holder.expires_at.isoformat()}",
                        resource=f"lease:{tenant_id}",
                    )
                return _lease(row)
        except Conflict:
            raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}") from None

    def renew_lease(self, lease: Lease, ttl: timedelta) -> Lease:
        if ttl <= timedelta(0):
            raise ValidationError("lease ttl must be positive")
        L = tenant_leases.c  # noqa: N806 - the table's columns, as in SQLAlchemy docs
        with self._tx("renew lease") as conn:
            row = conn.execute(
                update(tenant_leases)
                .where(L.tenant_id == lease.tenant_id, L.token == lease.token, L.released_at.is_(None))
                .values(expires_at=self._now() + ttl)
                .returning(*tenant_leases.c)
            ).one_or_none()
            if row is None:
                current = conn.execute(select(tenant_leases).where(L.tenant_id == lease.tenant_id)).one_or_none()
                check_token(current, lease.tenant_id, lease.token)  # raises: the UPDATE matched nothing
                raise FencedError(
                    f"lease of tenant {lease.tenant_id!r} token {lease.token} is gone",
                    resource=f"lease:{lease.tenant_id}",
                )
            return _lease(row)

    def release_lease(self, lease: Lease) -> bool:
        L = tenant_leases.c  # noqa: N806 - the table's columns, as in SQLAlchemy docs
        with self._tx("release lease") as conn:
            res = conn.execute(
                update(tenant_leases)
                .where(L.tenant_id == lease.tenant_id, L.token == lease.token, L.released_at.is_(None))
                .values(released_at=self._now())
            )
            return res.rowcount > 0

    def get_lease(self, tenant_id: str) -> Lease | None:
        with self._tx("read lease", write=False) as conn:
            row = conn.execute(
                select(tenant_leases).where(
                    tenant_leases.c.tenant_id == tenant_id, tenant_leases.c.released_at.is_(None)
                )
            ).one_or_none()
        return None if row is None else _lease(row)

    def check_fence(self, tenant_id: str, token: int) -> None:
        with self._tx("check fence", write=False) as conn:
            row = conn.execute(select(tenant_leases).where(tenant_leases.c.tenant_id == tenant_id)).one_or_none()
            check_token(row, tenant_id, token)


def _lease(r: Row[Any]) -> Lease:
    return Lease(
        tenant_id=r.tenant_id, run_id=r.run_id, token=int(r.token), acquired_at=r.acquired_at, expires_at=r.expires_at
    )
