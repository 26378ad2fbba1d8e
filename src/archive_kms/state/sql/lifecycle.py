"""Retention policies, key rotations and last known key versions on SQL (``LifecycleRepo``).
One open rotation per tenant is a partial unique index; ``update_rotation`` is one
conditional ``UPDATE ... RETURNING`` (compare-and-set on state and challenge)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Row, delete, select, update

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
from archive_kms.state.port import (
    OPEN_ROTATION_STATES,
    KeyRotation,
    KeyVersionMark,
    RetentionPolicy,
    RotationState,
)
from archive_kms.state.schema import key_rotations, key_versions, retention_policies, tenants
from archive_kms.state.sql.database import Conflict, SqlRepository

__all__ = ["SqlLifecycleRepo"]


class SqlLifecycleRepo(SqlRepository):
    """``LifecycleRepo`` on SQL."""

    def _require_tenant(self, conn: Any, tenant_id: str) -> None:
        if conn.execute(select(tenants.c.tenant_id).where(tenants.c.tenant_id == tenant_id)).scalar() is None:
            raise StateError(f"no tenant {tenant_id!r}", resource=f"tenant:{tenant_id}")

    # --- retention -----------------------------------------------------------------------

    def set_retention(self, tenant_id: str, retention_seconds: int, *, actor: str) -> RetentionPolicy:
        seconds = check_retention(retention_seconds, actor)
        with self._tx("set retention") as conn:
            self._require_tenant(conn, tenant_id)
            values = {"retention_seconds": seconds, "updated_by": actor, "updated_at": self._now()}
            row = conn.execute(
                self._insert(retention_policies)
                .values(tenant_id=tenant_id, **values)
                .on_conflict_do_update(index_elements=["tenant_id"], set_=values)
                .returning(*retention_policies.c)
            ).one()
        return _policy(row)

    def get_retention(self, tenant_id: str) -> RetentionPolicy | None:
        with self._tx("get retention", write=False) as conn:
            row = conn.execute(
                select(retention_policies).where(retention_policies.c.tenant_id == tenant_id)
            ).one_or_none()
        return None if row is None else _policy(row)

    def list_retention(self) -> list[RetentionPolicy]:
        with self._tx("list retention", write=False) as conn:
            rows = conn.execute(select(retention_policies).order_by(retention_policies.c.tenant_id)).all()
        return [_policy(r) for r in rows]

    def clear_retention(self, tenant_id: str) -> bool:
        with self._tx("clear retention") as conn:
            done = conn.execute(delete(retention_policies).where(retention_policies.c.tenant_id == tenant_id))
        return bool(done.rowcount)

    # --- key versions ----------------------------------------------------------------------

    def record_key_version(self, tenant_id: str, key_ref: str, version: str | None) -> KeyVersionMark:
        check_id("key_ref", key_ref, 2048)
        if version is not None:
            check_id("version", version, 255)
        with self._tx("record key version") as conn:
            self._require_tenant(conn, tenant_id)
            values = {"key_ref": key_ref, "version": version, "observed_at": self._now()}
            row = conn.execute(
                self._insert(key_versions)
                .values(tenant_id=tenant_id, **values)
                .on_conflict_do_update(index_elements=["tenant_id"], set_=values)
                .returning(*key_versions.c)
            ).one()
        return KeyVersionMark(row.tenant_id, row.key_ref, row.version, row.observed_at)

    def get_key_version(self, tenant_id: str) -> KeyVersionMark | None:
        with self._tx("get key version", write=False) as conn:
            row = conn.execute(select(key_versions).where(key_versions.c.tenant_id == tenant_id)).one_or_none()
        return None if row is None else KeyVersionMark(row.tenant_id, row.key_ref, row.version, row.observed_at)

    # --- rotations -------------------------------------------------------------------------

    def _open_rotation_row(self, conn: Any, tenant_id: str) -> Row[Any] | None:
        return conn.execute(
            select(key_rotations).where(
                key_rotations.c.tenant_id == tenant_id,
                key_rotations.c.state.in_([s.value for s in OPEN_ROTATION_STATES]),
            )
        ).one_or_none()

    def open_rotation(self, rotation: KeyRotation) -> tuple[KeyRotation, bool]:
        check_rotation(rotation)
        details = json_object(rotation.details, "rotation details")
        try:
            with self._tx("open rotation") as conn:
                self._require_tenant(conn, rotation.tenant_id)
                found = self._open_rotation_row(conn, rotation.tenant_id)
                if found is not None:
                    return _rotation(found), False
                now = self._now()
                row = conn.execute(
                    self._insert(key_rotations)
                    .values(
                        rotation_id=rotation.rotation_id,
                        tenant_id=rotation.tenant_id,
                        kind=rotation.kind,
                        key_ref=rotation.key_ref,
                        previous_key_ref=rotation.previous_key_ref,
                        previous_version=rotation.previous_version,
                        observed_version=rotation.observed_version,
                        state=RotationState.DETECTED.value,
                        run_id=rotation.run_id,
                        nonce=None,
                        detected_at=now,
                        updated_at=now,
                        details=details,
                    )
                    .returning(*key_rotations.c)
                ).one()
                return _rotation(row), True
        except Conflict:
            # A concurrent detection of the same tenant won (the partial unique index):
            # return its rotation, as a second trigger returns the running run.
            with self._tx("open rotation (lost race)", write=False) as conn:
                found = self._open_rotation_row(conn, rotation.tenant_id)
            if found is None:
                raise StateError(
                    f"rotation {rotation.rotation_id} could not be stored", resource=f"tenant:{rotation.tenant_id}"
                ) from None
            return _rotation(found), False

    def get_rotation(self, rotation_id: str) -> KeyRotation | None:
        with self._tx("get rotation", write=False) as conn:
            row = conn.execute(select(key_rotations).where(key_rotations.c.rotation_id == rotation_id)).one_or_none()
        return None if row is None else _rotation(row)

    def find_open_rotation(self, tenant_id: str) -> KeyRotation | None:
        with self._tx("find open rotation", write=False) as conn:
            row = self._open_rotation_row(conn, tenant_id)
        return None if row is None else _rotation(row)

    def list_rotations(
        self, tenant_id: str | None = None, *, states: Iterable[RotationState] | None = None, limit: int = 100
    ) -> list[KeyRotation]:
        q = select(key_rotations)
        if tenant_id is not None:
            q = q.where(key_rotations.c.tenant_id == tenant_id)
        if states is not None:
            q = q.where(key_rotations.c.state.in_([member(RotationState, s, "rotation state").value for s in states]))
        q = q.order_by(key_rotations.c.detected_at.desc(), key_rotations.c.rotation_id.desc()).limit(limit)
        with self._tx("list rotations", write=False) as conn:
            rows = conn.execute(q).all()
        return [_rotation(r) for r in rows]

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
        K = key_rotations.c  # noqa: N806 - the table's columns, as in SQLAlchemy docs
        try:
            with self._tx("update rotation") as conn:
                current = conn.execute(select(key_rotations).where(K.rotation_id == rotation_id)).one_or_none()
                if current is None:
                    raise StateError(f"no rotation {rotation_id!r}", resource=f"rotation:{rotation_id}")
                if "details" in values:
                    values["details"] = {**dict(current.details or {}), **values["details"]}
                if "state" in values:
                    values["state"] = values["state"].value
                conds = [K.rotation_id == rotation_id, K.state.in_([s.value for s in wanted])]
                if match_nonce is not None:
                    conds.append(K.nonce == match_nonce)
                row = conn.execute(
                    update(key_rotations)
                    .where(*conds)
                    .values(**values, updated_at=self._now())
                    .returning(*key_rotations.c)
                ).one_or_none()
                if row is None:
                    nonce_ok = match_nonce is None or current.nonce == match_nonce
                    raise rotation_refusal(rotation_id, RotationState(current.state), wanted, nonce_ok)
                return _rotation(row)
        except Conflict:
            raise StateError(
                f"rotation {rotation_id} cannot be reopened: its tenant has another open rotation",
                resource=f"rotation:{rotation_id}",
            ) from None


def _policy(r: Row[Any]) -> RetentionPolicy:
    return RetentionPolicy(r.tenant_id, int(r.retention_seconds), r.updated_by, r.updated_at)


def _rotation(r: Row[Any]) -> KeyRotation:
    return KeyRotation(
        rotation_id=r.rotation_id,
        tenant_id=r.tenant_id,
        kind=r.kind,
        key_ref=r.key_ref,
        previous_key_ref=r.previous_key_ref,
        previous_version=r.previous_version,
        observed_version=r.observed_version,
        state=RotationState(r.state),
        run_id=r.run_id,
        nonce=r.nonce,
        detected_at=r.detected_at,
        updated_at=r.updated_at,
        awaiting_since=r.awaiting_since,
        confirmed_by=r.confirmed_by,
        confirmed_at=r.confirmed_at,
        completed_at=r.completed_at,
        details=dict(r.details or {}),
    )
