"""Tenants in memory (``TenantRepo``)."""

from __future__ import annotations

from dataclasses import replace

from archive_kms.domain.tenants import TenantId
from archive_kms.errors import StateError, VersionConflictError
from archive_kms.state._common import json_object, member
from archive_kms.state.memory.tables import MemoryTables, _copy_tenant, _Gate
from archive_kms.state.port import Fence, GateState, KeyMode, TenantRecord

__all__ = ["MemoryTenantRepo"]


class MemoryTenantRepo(MemoryTables):
    """``TenantRepo`` in memory."""

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
