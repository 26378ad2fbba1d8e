"""The keychain's repository on SQL: ``KeychainStore`` (``keys/keychain_store.py``) on the
state store's database.

Rows hold the keychain's canonical JSON bytes unchanged (``body``), as the in-memory
reference store does, so signatures verify over exactly what was written; ``level`` and
``workspace_id`` are copied from the record at commit only to index ``list_records``.
Holds no secrets: bodies carry wrapped keys only.

``commit`` is one transaction: compare-and-set on the head's version (the head row is
locked ``FOR UPDATE`` on PostgreSQL; SQLite write transactions are ``BEGIN IMMEDIATE``),
then upsert the records and the head. Two first commits racing for a tenant collide on
the head's primary key; the loser gets ``VersionConflictError`` like any stale writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import insert, select, update

from archive_kms.domain.keychain import KeyLevel, KeyRecord, TenantHead
from archive_kms.errors import StateError, VersionConflictError
from archive_kms.state.schema import keychain_heads, keychain_records
from archive_kms.state.sql.database import Conflict, SqlDatabase, retry_aborted_transactions

__all__ = ["SqlKeychainStore"]


class _OnDatabase(Protocol):
    """What the keychain store is opened on: a ``SqlStateStore`` (or anything sharing its
    database)."""

    @property
    def database(self) -> SqlDatabase: ...


@retry_aborted_transactions
class SqlKeychainStore:
    """``KeychainStore`` sharing a ``SqlStateStore``'s engine, transactions and error
    translation (``ServiceUnavailableError`` / ``TransientError`` for the database); a
    transaction the database aborted is run again, like the repositories'."""

    def __init__(self, state: _OnDatabase) -> None:
        self._state = state
        self._db: SqlDatabase = state.database

    def __repr__(self) -> str:
        return f"SqlKeychainStore({self._state!r})"

    def get_head(self, tenant_id: str) -> TenantHead | None:
        with self._db.tx("read keychain head", write=False) as conn:
            body = conn.execute(select(keychain_heads.c.body).where(keychain_heads.c.tenant_id == tenant_id)).scalar()
        return None if body is None else TenantHead.from_json(bytes(body))

    def get_record(self, tenant_id: str, record_id: str) -> KeyRecord | None:
        k = keychain_records.c
        with self._db.tx("read keychain record", write=False) as conn:
            body = conn.execute(select(k.body).where(k.tenant_id == tenant_id, k.record_id == record_id)).scalar()
        return None if body is None else KeyRecord.from_json(bytes(body))

    def list_records(
        self, tenant_id: str, *, level: KeyLevel | None = None, workspace_id: str | None = None
    ) -> list[KeyRecord]:
        k = keychain_records.c
        q = select(k.body).where(k.tenant_id == tenant_id)
        if level is not None:
            q = q.where(k.level == KeyLevel(level).value)
        if workspace_id is not None:
            q = q.where(k.workspace_id == workspace_id)
        with self._db.tx("list keychain records", write=False) as conn:
            bodies = conn.execute(q.order_by(k.record_id)).scalars().all()
        out = []
        for body in bodies:
            rec = KeyRecord.from_json(bytes(body))
            # The columns only narrow the query; the (verifiable) body decides.
            if (level is None or rec.level is level) and (workspace_id is None or rec.workspace_id == workspace_id):
                out.append(rec)
        return out

    def commit(
        self, tenant_id: str, *, head: TenantHead, records: Sequence[KeyRecord], expected_head_version: int | None
    ) -> None:
        if head.tenant_id != tenant_id or any(r.tenant_id != tenant_id for r in records):
            raise StateError(f"commit for tenant {tenant_id} carries another tenant's head or records")
        head_body = head.to_json()
        rows = [
            {
                "tenant_id": tenant_id,
                "record_id": r.record_id,
                "level": r.level.value,
                "workspace_id": r.workspace_id,
                "body": r.to_json(),
            }
            for r in records
        ]
        conflict = VersionConflictError(
            f"keychain head of tenant {tenant_id} changed since version {expected_head_version} was read",
            resource=f"keychain:{tenant_id}",
        )
        try:
            with self._db.tx("commit keychain") as conn:
                now = datetime.now(UTC)
                current = conn.execute(
                    select(keychain_heads.c.body).where(keychain_heads.c.tenant_id == tenant_id).with_for_update()
                ).scalar()
                current_version = None if current is None else TenantHead.from_json(bytes(current)).version
                if current_version != expected_head_version:
                    raise VersionConflictError(
                        f"keychain head of tenant {tenant_id} is at version {current_version}, "
                        f"expected {expected_head_version}",
                        resource=f"keychain:{tenant_id}",
                    )
                for row in rows:
                    stmt = self._db.insert(keychain_records).values(**row, updated_at=now)
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=["tenant_id", "record_id"],
                            set_={
                                "level": row["level"],
                                "workspace_id": row["workspace_id"],
                                "body": row["body"],
                                "updated_at": now,
                            },
                        )
                    )
                if current is None:
                    conn.execute(
                        insert(keychain_heads).values(
                            tenant_id=tenant_id, version=head.version, body=head_body, updated_at=now
                        )
                    )
                else:
                    conn.execute(
                        update(keychain_heads)
                        .where(keychain_heads.c.tenant_id == tenant_id)
                        .values(version=head.version, body=head_body, updated_at=now)
                    )
        except Conflict:
            raise conflict from None  # a concurrent first commit created the head
