"""Stored warnings (``WarningRepo``), key observations and grace policies (``KeyWatchRepo``)
in memory, held to the same contract as ``state.sql.key_lifecycle``."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from archive_kms.errors import StateError
from archive_kms.state._common import check_actor, check_warning, json_object
from archive_kms.state.memory.tables import MemoryTables
from archive_kms.state.port import GracePolicyRecord, ObservedKey, StoredWarning, warning_id

__all__ = ["MemoryKeyWatchRepo", "MemoryWarningRepo"]


def _copy(w: StoredWarning) -> StoredWarning:
    return replace(w, details=copy.deepcopy(dict(w.details)))


class MemoryWarningRepo(MemoryTables):
    """``WarningRepo`` in memory."""

    def _require_tenant(self, tenant_id: str) -> None:
        if tenant_id not in self._tenants:
            raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")

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
        with self._lock:
            self._require_tenant(tenant_id)
            now = self._now()
            found = self._warnings.get(wid)
            if found is not None and found.cleared_at is None:
                stored = replace(
                    found, severity=severity, message=message, details=clean, updated_at=now, count=found.count + 1
                )
                new = False
            else:
                stored = StoredWarning(wid, tenant_id, kind, severity, message, clean, now, now)
                new = True
            self._warnings[wid] = stored
            return _copy(stored), new

    def clear_warning(self, warning_id: str) -> StoredWarning | None:
        with self._lock:
            found = self._warnings.get(warning_id)
            if found is None or found.cleared_at is not None:
                return None
            self._warnings[warning_id] = replace(found, cleared_at=self._now())
            return _copy(self._warnings[warning_id])

    def acknowledge_warning(self, warning_id: str, *, actor: str) -> StoredWarning:
        who = check_actor(actor)
        with self._lock:
            found = self._warnings.get(warning_id)
            if found is None:
                raise StateError(f"no warning {warning_id!r}", resource=f"warning:{warning_id}")
            self._warnings[warning_id] = replace(found, acknowledged_by=who, acknowledged_at=self._now())
            return _copy(self._warnings[warning_id])

    def get_warning(self, warning_id: str) -> StoredWarning | None:
        with self._lock:
            found = self._warnings.get(warning_id)
            return None if found is None else _copy(found)

    def list_warnings(
        self, tenant_id: str | None = None, *, active: bool | None = True, kind: str | None = None, limit: int = 500
    ) -> list[StoredWarning]:
        with self._lock:
            rows = [
                w
                for w in self._warnings.values()
                if (tenant_id is None or w.tenant_id == tenant_id)
                and (active is None or w.active is active)
                and (kind is None or w.kind == kind)
            ]
            rows.sort(key=lambda w: w.warning_id)
            rows.sort(key=lambda w: w.updated_at, reverse=True)
            return [_copy(w) for w in rows[: max(1, min(limit, 10_000))]]


class MemoryKeyWatchRepo(MemoryTables):
    """``KeyWatchRepo`` in memory."""

    def record_key_observation(self, observation: ObservedKey) -> ObservedKey:
        with self._lock:
            if observation.tenant_id not in self._tenants:
                raise StateError(f"no tenant {observation.tenant_id!r}", resource=f"tenant:{observation.tenant_id}")
            stored = replace(observation, details=json_object(observation.details, "observation details"))
            self._observations[observation.tenant_id] = stored
            return replace(stored, details=copy.deepcopy(dict(stored.details)))

    def get_key_observation(self, tenant_id: str) -> ObservedKey | None:
        with self._lock:
            found = self._observations.get(tenant_id)
            return None if found is None else replace(found, details=copy.deepcopy(dict(found.details)))

    def list_key_observations(self) -> list[ObservedKey]:
        with self._lock:
            return [replace(o, details=copy.deepcopy(dict(o.details))) for _, o in sorted(self._observations.items())]

    def set_grace_policy(self, tenant_id: str, policy: str | None, *, actor: str) -> GracePolicyRecord | None:
        who = check_actor(actor)
        with self._lock:
            if tenant_id not in self._tenants:
                raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")
            if policy is None:
                self._grace.pop(tenant_id, None)
                return None
            self._grace[tenant_id] = GracePolicyRecord(tenant_id, policy, who, self._now())
            return self._grace[tenant_id]

    def get_grace_policy(self, tenant_id: str) -> GracePolicyRecord | None:
        with self._lock:
            return self._grace.get(tenant_id)
