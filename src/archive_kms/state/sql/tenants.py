"""Tenants on SQL: the registry row and, created with it, the tenant's archive gate
row (``TenantRepo``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, insert, select, update

from archive_kms.domain.tenants import TenantId
from archive_kms.errors import StateError, VersionConflictError
from archive_kms.state._common import json_object, member
from archive_kms.state.port import Fence, GateState, KeyMode, TenantRecord
from archive_kms.state.schema import archive_gates, tenants
from archive_kms.state.sql.database import Conflict, SqlRepository

__all__ = ["SqlTenantRepo"]


class SqlTenantRepo(SqlRepository):
    """``TenantRepo`` on SQL."""

    def create_tenant(self, tenant: TenantRecord) -> TenantRecord:
        TenantId(tenant.tenant_id)
        now = self._now()
        values = _tenant_values(tenant) | {"version": 1, "created_at": now, "updated_at": now}
        try:
            with self._tx("create tenant") as conn:
                conn.execute(insert(tenants).values(**values))
                conn.execute(
                    insert(archive_gates).values(
                        tenant_id=tenant.tenant_id, state=GateState.OPEN.value, since=now, next_position=0
                    )
                )
                row = conn.execute(select(tenants).where(tenants.c.tenant_id == tenant.tenant_id)).one()
        except Conflict:
            raise StateError(
                f"tenant {tenant.tenant_id!r} already exists", resource=f"tenant:{tenant.tenant_id}"
            ) from None
        return _tenant(row)

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._tx("get tenant", write=False) as conn:
            row = conn.execute(select(tenants).where(tenants.c.tenant_id == tenant_id)).one_or_none()
        return None if row is None else _tenant(row)

    def list_tenants(self) -> list[TenantRecord]:
        with self._tx("list tenants", write=False) as conn:
            rows = conn.execute(select(tenants).order_by(tenants.c.tenant_id)).all()
        return [_tenant(r) for r in rows]

    def update_tenant(self, tenant: TenantRecord, *, fence: Fence | None = None) -> TenantRecord:
        tid = tenant.tenant_id
        with self._tx("update tenant") as conn:
            self._fenced(conn, fence, tid)
            row = conn.execute(
                update(tenants)
                .where(tenants.c.tenant_id == tid, tenants.c.version == tenant.version)
                .values(**_tenant_values(tenant), version=tenant.version + 1, updated_at=self._now())
                .returning(*tenants.c)
            ).one_or_none()
            if row is None:
                current = conn.execute(select(tenants.c.version).where(tenants.c.tenant_id == tid)).scalar()
                if current is None:
                    raise StateError(f"no tenant {tid!r}", resource=f"tenant:{tid}")
                raise VersionConflictError(
                    f"tenant {tid!r} is at version {current}; this update was based on version {tenant.version}: "
                    "re-read and retry",
                    resource=f"tenant:{tid}",
                )
        return _tenant(row)


def _tenant_values(t: TenantRecord) -> dict[str, Any]:
    return {
        "tenant_id": t.tenant_id,
        "key_mode": member(KeyMode, t.key_mode, "key mode").value,
        "key_ref": t.key_ref,
        "location": json_object(t.location, "tenant location"),
        "index_alias": t.index_alias,
        "index_generation": t.index_generation,
        "revoked": bool(t.revoked),
    }


def _tenant(r: Row[Any]) -> TenantRecord:
    return TenantRecord(
        tenant_id=r.tenant_id,
        key_mode=KeyMode(r.key_mode),
        location=dict(r.location),
        key_ref=r.key_ref,
        index_alias=r.index_alias,
        index_generation=r.index_generation,
        revoked=bool(r.revoked),
        version=r.version,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )
