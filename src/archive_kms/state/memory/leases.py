"""Tenant leases and fencing tokens in memory (``LeaseRepo``)."""

from __future__ import annotations

from datetime import timedelta

from archive_kms.errors import LeaseHeldError, StateError, ValidationError
from archive_kms.state._common import check_id, check_token
from archive_kms.state.memory.tables import MemoryTables, _LeaseRow
from archive_kms.state.port import Lease
from archive_kms.state.schema import RUN_ID

__all__ = ["MemoryLeaseRepo"]


class MemoryLeaseRepo(MemoryTables):
    """``LeaseRepo`` in memory."""

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
