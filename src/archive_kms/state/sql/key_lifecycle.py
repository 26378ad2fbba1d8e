"""Stored warnings (``WarningRepo``), the monitor's key observations and per-tenant grace
policies (``KeyWatchRepo``) on SQL: tables ``key_warnings``, ``key_observations`` and
``key_grace_policies`` (Alembic revision 0009)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from archive_kms.errors import StateError
from archive_kms.state._common import check_actor, check_warning, json_object
from archive_kms.state.port import GracePolicyRecord, ObservedKey, StoredWarning, warning_id
from archive_kms.state.schema import key_grace_policies, key_observations, key_warnings, tenants
from archive_kms.state.sql.database import SqlRepository

__all__ = ["SqlKeyWatchRepo", "SqlWarningRepo"]


def _require_tenant(conn: Connection, tenant_id: str) -> None:
    if conn.execute(select(tenants.c.tenant_id).where(tenants.c.tenant_id == tenant_id)).scalar() is None:
        raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")


class SqlWarningRepo(SqlRepository):
    """``WarningRepo`` on SQL."""

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
        clean = check_warning(kind, severity, message, subject, details)
        wid = warning_id(kind, tenant_id, subject)
        with self._tx("raise warning") as conn:
            _require_tenant(conn, tenant_id)
            now = self._now()
            row = conn.execute(select(key_warnings).where(key_warnings.c.warning_id == wid)).one_or_none()
            if row is not None and row.cleared_at is None:
                conn.execute(
                    update(key_warnings)
                    .where(key_warnings.c.warning_id == wid)
                    .values(severity=severity, message=message, details=clean, updated_at=now, count=row.count + 1)
                )
                new = False
            else:
                values = {
                    "severity": severity,
                    "message": message,
                    "details": clean,
                    "raised_at": now,
                    "updated_at": now,
                    "count": 1,
                    "cleared_at": None,
                    "acknowledged_by": None,
                    "acknowledged_at": None,
                }
                if row is None:
                    conn.execute(insert(key_warnings).values(warning_id=wid, tenant_id=tenant_id, kind=kind, **values))
                else:
                    conn.execute(update(key_warnings).where(key_warnings.c.warning_id == wid).values(**values))
                new = True
            stored = conn.execute(select(key_warnings).where(key_warnings.c.warning_id == wid)).one()
        return _warning(stored), new

    def clear_warning(self, warning_id: str) -> StoredWarning | None:
        with self._tx("clear warning") as conn:
            row = conn.execute(
                update(key_warnings)
                .where(key_warnings.c.warning_id == warning_id, key_warnings.c.cleared_at.is_(None))
                .values(cleared_at=self._now())
                .returning(*key_warnings.c)
            ).one_or_none()
        return None if row is None else _warning(row)

    def acknowledge_warning(self, warning_id: str, *, actor: str) -> StoredWarning:
        who = check_actor(actor)
        with self._tx("acknowledge warning") as conn:
            row = conn.execute(
                update(key_warnings)
                .where(key_warnings.c.warning_id == warning_id)
                .values(acknowledged_by=who, acknowledged_at=self._now())
                .returning(*key_warnings.c)
            ).one_or_none()
        if row is None:
            raise StateError(f"no warning {warning_id!r}", resource=f"warning:{warning_id}")
        return _warning(row)

    def get_warning(self, warning_id: str) -> StoredWarning | None:
        with self._tx("get warning", write=False) as conn:
            row = conn.execute(select(key_warnings).where(key_warnings.c.warning_id == warning_id)).one_or_none()
        return None if row is None else _warning(row)

    def list_warnings(
        self, tenant_id: str | None = None, *, active: bool | None = True, kind: str | None = None, limit: int = 500
    ) -> list[StoredWarning]:
        q = select(key_warnings)
        if tenant_id is not None:
            q = q.where(key_warnings.c.tenant_id == tenant_id)
        if active is True:
            q = q.where(key_warnings.c.cleared_at.is_(None))
        elif active is False:
            q = q.where(key_warnings.c.cleared_at.is_not(None))
        if kind is not None:
            q = q.where(key_warnings.c.kind == kind)
        q = q.order_by(key_warnings.c.updated_at.desc(), key_warnings.c.warning_id).limit(max(1, min(limit, 10_000)))
        with self._tx("list warnings", write=False) as conn:
            rows = conn.execute(q).all()
        return [_warning(r) for r in rows]


class SqlKeyWatchRepo(SqlRepository):
    """``KeyWatchRepo`` on SQL."""

    def record_key_observation(self, observation: ObservedKey) -> ObservedKey:
        o = observation
        values = {
            "key_ref": o.key_ref,
            "state": o.state,
            "key_version": o.key_version,
            "accepted_version": o.accepted_version,
            "outcome": o.outcome,
            "observed_at": o.observed_at,
            "expires_at": o.expires_at,
            "unreachable_since": o.unreachable_since,
            "details": json_object(o.details, "observation details"),
        }
        with self._tx("record key observation") as conn:
            _require_tenant(conn, o.tenant_id)
            conn.execute(delete(key_observations).where(key_observations.c.tenant_id == o.tenant_id))
            conn.execute(insert(key_observations).values(tenant_id=o.tenant_id, **values))
            row = conn.execute(select(key_observations).where(key_observations.c.tenant_id == o.tenant_id)).one()
        return _observation(row)

    def get_key_observation(self, tenant_id: str) -> ObservedKey | None:
        with self._tx("get key observation", write=False) as conn:
            row = conn.execute(select(key_observations).where(key_observations.c.tenant_id == tenant_id)).one_or_none()
        return None if row is None else _observation(row)

    def list_key_observations(self) -> list[ObservedKey]:
        with self._tx("list key observations", write=False) as conn:
            rows = conn.execute(select(key_observations).order_by(key_observations.c.tenant_id)).all()
        return [_observation(r) for r in rows]

    def set_grace_policy(self, tenant_id: str, policy: str | None, *, actor: str) -> GracePolicyRecord | None:
        who = check_actor(actor)
        with self._tx("set grace policy") as conn:
            _require_tenant(conn, tenant_id)
            conn.execute(delete(key_grace_policies).where(key_grace_policies.c.tenant_id == tenant_id))
            if policy is None:
                return None
            conn.execute(
                insert(key_grace_policies).values(
                    tenant_id=tenant_id, policy=policy, updated_by=who, updated_at=self._now()
                )
            )
            row = conn.execute(select(key_grace_policies).where(key_grace_policies.c.tenant_id == tenant_id)).one()
        return GracePolicyRecord(row.tenant_id, row.policy, row.updated_by, row.updated_at)

    def get_grace_policy(self, tenant_id: str) -> GracePolicyRecord | None:
        with self._tx("get grace policy", write=False) as conn:
            row = conn.execute(
                select(key_grace_policies).where(key_grace_policies.c.tenant_id == tenant_id)
            ).one_or_none()
        return None if row is None else GracePolicyRecord(row.tenant_id, row.policy, row.updated_by, row.updated_at)


def _warning(r: Row[Any]) -> StoredWarning:
    return StoredWarning(
        warning_id=r.warning_id,
        tenant_id=r.tenant_id,
        kind=r.kind,
        severity=r.severity,
        message=r.message,
        details=dict(r.details or {}),
        raised_at=r.raised_at,
        updated_at=r.updated_at,
        count=int(r.count),
        cleared_at=r.cleared_at,
        acknowledged_by=r.acknowledged_by,
        acknowledged_at=r.acknowledged_at,
    )


def _observation(r: Row[Any]) -> ObservedKey:
    return ObservedKey(
        tenant_id=r.tenant_id,
        key_ref=r.key_ref,
        state=r.state,
        key_version=r.key_version,
        accepted_version=r.accepted_version,
        outcome=r.outcome,
        observed_at=r.observed_at,
        expires_at=r.expires_at,
        unreachable_since=r.unreachable_since,
        details=dict(r.details or {}),
    )
