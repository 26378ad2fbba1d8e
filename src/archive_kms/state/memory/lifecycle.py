"""Retention policies, key rotations and last known key versions in memory (``LifecycleRepo``)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from archive_kms.errors import StateError
from archive_kms.state._common import (
    check_id,
    check_retention,
    check_rotation,
    check_rotation_changes,
    json_object,
    member,
    rotation_refusal,
)
from archive_kms.state.memory.tables import MemoryTables
from archive_kms.state.port import KeyRotation, KeyVersionMark, RetentionPolicy, RotationState

__all__ = ["MemoryLifecycleRepo"]


class MemoryLifecycleRepo(MemoryTables):
    """``LifecycleRepo`` in memory."""

    def _require_tenant(self, tenant_id: str) -> None:
        if tenant_id not in self._tenants:
            raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")

    def set_retention(self, tenant_id: str, retention_seconds: int, *, actor: str) -> RetentionPolicy:
        seconds = check_retention(retention_seconds, actor)
        with self._lock:
            self._require_tenant(tenant_id)
            policy = RetentionPolicy(tenant_id, seconds, actor, self._now())
            self._retention[tenant_id] = policy
            return policy

    def get_retention(self, tenant_id: str) -> RetentionPolicy | None:
        with self._lock:
            return self._retention.get(tenant_id)

    def list_retention(self) -> list[RetentionPolicy]:
        with self._lock:
            return [self._retention[t] for t in sorted(self._retention)]

    def clear_retention(self, tenant_id: str) -> bool:
        with self._lock:
            return self._retention.pop(tenant_id, None) is not None

    def record_key_version(self, tenant_id: str, key_ref: str, version: str | None) -> KeyVersionMark:
        check_id("key_ref", key_ref, 2048)
        if version is not None:
            check_id("version", version, 255)
        with self._lock:
            self._require_tenant(tenant_id)
            mark = KeyVersionMark(tenant_id, key_ref, version, self._now())
            self._key_versions[tenant_id] = mark
            return mark

    def get_key_version(self, tenant_id: str) -> KeyVersionMark | None:
        with self._lock:
            return self._key_versions.get(tenant_id)

    def _open_of(self, tenant_id: str) -> KeyRotation | None:
        return next((r for r in self._rotations.values() if r.tenant_id == tenant_id and r.open), None)

    def open_rotation(self, rotation: KeyRotation) -> tuple[KeyRotation, bool]:
        check_rotation(rotation)
        details = json_object(rotation.details, "rotation details")
        with self._lock:
            self._require_tenant(rotation.tenant_id)
            found = self._open_of(rotation.tenant_id)
            if found is not None:
                return _copy(found), False
            if rotation.rotation_id in self._rotations:
                raise StateError(f"rotation {rotation.rotation_id} exists", resource=f"rotation:{rotation.rotation_id}")
            now = self._now()
            stored = replace(
                rotation,
                state=RotationState.DETECTED,
                nonce=None,
                detected_at=now,
                updated_at=now,
                awaiting_since=None,
                confirmed_by=None,
                confirmed_at=None,
                completed_at=None,
                details=details,
            )
            self._rotations[rotation.rotation_id] = stored
            return _copy(stored), True

    def get_rotation(self, rotation_id: str) -> KeyRotation | None:
        with self._lock:
            found = self._rotations.get(rotation_id)
            return None if found is None else _copy(found)

    def find_open_rotation(self, tenant_id: str) -> KeyRotation | None:
        with self._lock:
            found = self._open_of(tenant_id)
            return None if found is None else _copy(found)

    def list_rotations(
        self, tenant_id: str | None = None, *, states: Iterable[RotationState] | None = None, limit: int = 100
    ) -> list[KeyRotation]:
        wanted = None if states is None else {member(RotationState, s, "rotation state") for s in states}
        with self._lock:
            rows = [
                r
                for r in self._rotations.values()
                if (tenant_id is None or r.tenant_id == tenant_id) and (wanted is None or r.state in wanted)
            ]
            rows.sort(key=lambda r: (r.detected_at, r.rotation_id), reverse=True)
            return [_copy(r) for r in rows[:limit]]

    def update_rotation(
        self,
        rotation_id: str,
        *,
        expect: Iterable[RotationState],
        match_nonce: str | None = None,
        **changes: Any,
    ) -> KeyRotation:
        wanted = [member(RotationState, s, "rotation state") for s in expect]
        values = check_rotation_changes(changes)
        with self._lock:
            current = self._rotations.get(rotation_id)
            if current is None:
                raise StateError(f"no rotation {rotation_id!r}", resource=f"rotation:{rotation_id}")
            nonce_ok = match_nonce is None or current.nonce == match_nonce
            if current.state not in wanted or not nonce_ok:
                raise rotation_refusal(rotation_id, current.state, wanted, nonce_ok)
            if "details" in values:
                values["details"] = {**copy.deepcopy(dict(current.details)), **values["details"]}
            updated = replace(current, **values, updated_at=self._now())
            if updated.open and not current.open and self._open_of(current.tenant_id) is not None:
                raise StateError(
                    f"rotation {rotation_id} cannot be reopened: its tenant has another open rotation",
                    resource=f"rotation:{rotation_id}",
                )
            self._rotations[rotation_id] = updated
            return _copy(updated)


def _copy(r: KeyRotation) -> KeyRotation:
    return replace(r, details=copy.deepcopy(dict(r.details)))
