"""The repository port that persists the keychain, and its reference implementation.

The stored values (:class:`KeyRecord`, :class:`TenantHead`, ...) are in
``domain.keychain`` (shared with the state store's SQL tables) and re-exported here. The
port, :class:`KeychainStore`, is four methods; :class:`InMemoryKeychainStore` is the
reference implementation (it keeps the JSON bytes, exactly as a database row would);
``state.sql`` implements it on the state database.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from archive_kms.domain.keychain import (
    AuditedChange,
    KeyLevel,
    KeyRecord,
    KeyRecordState,
    RecordRef,
    SignedJson,
    TenantHead,
    WorkspaceHead,
)
from archive_kms.errors import StateError, VersionConflictError

__all__ = [
    "AuditedChange",
    "InMemoryKeychainStore",
    "KeyLevel",
    "KeyRecord",
    "KeyRecordState",
    "KeychainStore",
    "RecordRef",
    "SignedJson",
    "TenantHead",
    "WorkspaceHead",
]


# --- the port ---------------------------------------------------------------------------


@runtime_checkable
class KeychainStore(Protocol):
    """Where keychain heads and records live (the state store). Holds no secrets.

    Contract
    --------
    - ``commit`` is atomic: either every record in ``records`` is upserted (by
      ``(tenant_id, record_id)``) *and* the head replaced, or nothing changes. It succeeds
      only if the stored head's version equals ``expected_head_version`` (``None``: no head
      stored yet); otherwise it raises ``VersionConflictError`` (retryable). This is the
      one write: the keychain never writes a record without advancing the head.
    - Reads need no transaction: the keychain checks records against a head read before
      them and re-reads the head when they disagree.
    - The store does not verify signatures (it has no key); it returns what it holds. Rows
      it cannot parse raise ``KeychainTamperedError`` (``KeyRecord.from_json`` does that).
    - ``list_records`` returns records sorted by ``record_id``.
    - Transport failures raise ``ServiceUnavailableError`` (retryable), never vendor errors.
    """

    def get_head(self, tenant_id: str) -> TenantHead | None:
        """The tenant's head, or ``None`` if the tenant has no keychain."""
        ...

    def get_record(self, tenant_id: str, record_id: str) -> KeyRecord | None:
        """One record, or ``None``."""
        ...

    def list_records(
        self, tenant_id: str, *, level: KeyLevel | None = None, workspace_id: str | None = None
    ) -> list[KeyRecord]:
        """The tenant's records, optionally only one level and/or one workspace."""
        ...

    def commit(
        self,
        tenant_id: str,
        *,
        head: TenantHead,
        records: Sequence[KeyRecord],
        expected_head_version: int | None,
    ) -> None:
        """Atomically upsert ``records`` and replace the head (compare-and-set on its version)."""
        ...


class InMemoryKeychainStore:
    """The reference :class:`KeychainStore`: a dict of JSON bytes under one lock.

    ``heads`` and ``records`` are the raw rows (``tenant -> bytes`` and
    ``(tenant, record_id) -> bytes``); tests edit them to play an attacker with write
    access to the database.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.heads: dict[str, bytes] = {}
        self.records: dict[tuple[str, str], bytes] = {}
        self.commits = 0
        self._versions: dict[str, int] = {}  # the head version "column" the compare-and-set reads

    def get_head(self, tenant_id: str) -> TenantHead | None:
        with self._lock:
            raw = self.heads.get(tenant_id)
        return None if raw is None else TenantHead.from_json(raw)

    def get_record(self, tenant_id: str, record_id: str) -> KeyRecord | None:
        with self._lock:
            raw = self.records.get((tenant_id, record_id))
        return None if raw is None else KeyRecord.from_json(raw)

    def list_records(
        self, tenant_id: str, *, level: KeyLevel | None = None, workspace_id: str | None = None
    ) -> list[KeyRecord]:
        with self._lock:
            rows = sorted((rid, raw) for (t, rid), raw in self.records.items() if t == tenant_id)
        out = []
        for _, raw in rows:
            rec = KeyRecord.from_json(raw)
            if level is not None and rec.level is not level:
                continue
            if workspace_id is not None and rec.workspace_id != workspace_id:
                continue
            out.append(rec)
        return out

    def commit(
        self,
        tenant_id: str,
        *,
        head: TenantHead,
        records: Sequence[KeyRecord],
        expected_head_version: int | None,
    ) -> None:
        if head.tenant_id != tenant_id or any(r.tenant_id != tenant_id for r in records):
            raise StateError(f"commit for tenant {tenant_id} carries another tenant's head or records")
        head_row = head.to_json()
        rows = {(tenant_id, r.record_id): r.to_json() for r in records}
        with self._lock:
            current_version = self._versions.get(tenant_id)
            if current_version != expected_head_version:
                raise VersionConflictError(
                    f"keychain head of tenant {tenant_id} is at version {current_version}, "
                    f"expected {expected_head_version}",
                    resource=f"keychain:{tenant_id}",
                )
            self.records.update(rows)
            self.heads[tenant_id] = head_row
            self._versions[tenant_id] = head.version
            self.commits += 1
